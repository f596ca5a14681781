"""petpipe.sources.download against a real HTTP server on 127.0.0.1 that misbehaves on cue: resumes, retries, timeouts,
the cache folder and the progress meter."""

import io
import os
import time

import pytest
from conftest import free_port
from small_disk import SmallDisk

from petpipe.run.errors import DiskFullError
from petpipe.sources import download as download_module
from petpipe.sources.download import DownloadError, Network, cache_dir, download, progress_meter

FAST = Network(tries=3, connect_timeout=2.0, read_timeout=2.0, backoff=0.01, max_backoff=0.05)


def test_cache_folder_comes_from_the_environment(tmp_path):
    assert cache_dir({"PETPIPE_CACHE_DIR": str(tmp_path / "c"), "XDG_CACHE_HOME": "/x"}) == tmp_path / "c"
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "petpipe" / "downloads"
    assert cache_dir({}).parts[-3:] == (".cache", "petpipe", "downloads")


# --- network trouble -------------------------------------------------------------------------


def test_dropped_connection_resumes_with_range(tmp_path, server, cache):
    payload = os.urandom(300_000)
    server.files["/blob.bin"] = payload
    server.plan("/blob.bin", ("drop", 100_000), ("drop", 50_000))
    target = tmp_path / "blob.bin"
    download(server.url("/blob.bin"), target, network=FAST)
    assert target.read_bytes() == payload and not target.with_name("blob.bin.part").exists()
    assert server.requests("/blob.bin") == [None, "bytes=100000-", "bytes=150000-"]


def test_download_resumes_from_an_earlier_part_file(tmp_path, server):
    payload = bytes(range(256)) * 4096
    server.files["/blob.bin"] = payload
    target = tmp_path / "blob.bin"
    # An earlier, interrupted run; zeros instead of the real bytes prove the start is not fetched again.
    target.with_name("blob.bin.part").write_bytes(bytes(300_000))
    download(server.url("/blob.bin"), target, network=FAST)
    assert target.read_bytes() == bytes(300_000) + payload[300_000:]


def test_part_file_is_promoted_only_when_its_size_is_the_servers(tmp_path, server):
    payload = os.urandom(50_000)
    server.files["/blob.bin"] = payload
    complete, too_long = tmp_path / "a" / "blob.bin", tmp_path / "b" / "blob.bin"
    for target, part in ((complete, payload), (too_long, payload + b"junk")):
        target.parent.mkdir()
        target.with_name("blob.bin.part").write_bytes(part)
        download(server.url("/blob.bin"), target, network=FAST)  # both get HTTP 416
        assert target.read_bytes() == payload
    assert server.requests("/blob.bin") == ["bytes=50000-", "bytes=50004-", None]  # the long one started over


def test_gives_up_after_the_tries_naming_url_status_and_count(tmp_path, server):
    server.files["/x.tgz"] = b"x"
    server.plan("/x.tgz", *[("status", 502)] * 5)
    with pytest.raises(
        DownloadError,
        match=rf"data.url: giving up on {server.url('/x.tgz')} after 3 tries; the last one: .*HTTP 502 Bad Gateway",
    ):
        download(server.url("/x.tgz"), tmp_path / "x.tgz", network=FAST)


def test_http_404_is_final_at_once(tmp_path, server):
    with pytest.raises(DownloadError, match=rf"data.url: {server.url('/missing.tgz')} answered HTTP 404"):
        download(server.url("/missing.tgz"), tmp_path / "m.tgz", network=FAST)
    assert len(server.requests("/missing.tgz")) == 1


def test_unreachable_host_names_the_url_and_gives_up_within_a_minute(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/x.tgz"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(DownloadError, match=f"giving up on {url} after 3 tries; the last one: cannot reach {url}"):
        download(url, tmp_path / "x.tgz", network=FAST)
    assert time.monotonic() - started < 5
    # The defaults: a host that never answers costs `tries` connect timeouts plus the pauses.
    net = download_module.NETWORK
    pauses = sum(min(net.backoff * 2**i, net.max_backoff) for i in range(net.tries - 1))
    assert net.tries * net.connect_timeout + pauses < 60


def test_stalled_server_hits_the_read_timeout_and_the_retry_resumes(tmp_path, server):
    payload = os.urandom(40_000)
    server.files["/slow.bin"] = payload
    server.plan("/slow.bin", ("stall", 10_000, 3))
    started = time.monotonic()
    download(
        server.url("/slow.bin"),
        tmp_path / "slow.bin",
        network=Network(tries=2, connect_timeout=5, read_timeout=0.3, backoff=0.01),
    )
    assert (tmp_path / "slow.bin").read_bytes() == payload and time.monotonic() - started < 2.5
    assert server.requests("/slow.bin") == [None, "bytes=10000-"]


# --- progress --------------------------------------------------------------------------------


def test_progress_is_a_bar_on_a_terminal_and_lines_in_logs(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, terminal = io.StringIO(), Terminal()
    monkeypatch.setattr(download_module, "LOG_EVERY", 0.0)
    with progress_meter("x.tgz", 4_000_000, 1_000_000, stream=log) as update:
        update(1_000_000)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("download x.tgz: 2.0 MB of 4.0 MB (50%), ") and "MB/s, ETA 0:" in lines[0]
    assert lines[-1].startswith("download x.tgz: 2.0 MB of 4.0 MB (50%), ") and " in 0:00" in lines[-1]
    with progress_meter("x.tgz", 4_000_000, 0, stream=terminal) as update:
        update(4_000_000)
    assert "download x.tgz: 100%" in terminal.getvalue() and "B/s" in terminal.getvalue()


def test_a_full_disk_stops_the_download_at_once_naming_the_part_file_it_keeps(tmp_path, server, monkeypatch):
    server.files["/blob.bin"] = os.urandom(300_000)
    target = tmp_path / "disk/blob.bin"
    target.parent.mkdir()
    SmallDisk(target.parent, fills_after=100_000, free=100_000).install(monkeypatch)
    with pytest.raises(DiskFullError) as caught:
        download(server.url("/blob.bin"), target, network=FAST)
    part = target.with_name("blob.bin.part")
    assert str(caught.value) == (
        f"{part}: no space left on device while writing it; "
        "the partial download is kept: free space on its disk and run the stage again to resume it"
    )
    assert server.requests("/blob.bin") == [None] and part.exists()  # not retried as a network failure
