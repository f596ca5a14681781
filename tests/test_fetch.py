"""Downloads against a real HTTP server on 127.0.0.1 (one that misbehaves on cue), the download
cache, verification and safe extraction of tar and zip archives generated here."""

import copy
import hashlib
import io
import os
import tarfile
import time
import zipfile

import pytest
from conftest import free_port, tar_bytes
from http_faults import FaultyServer
from small_disk import SmallDisk

from petpipe import fetch as fetch_module
from petpipe.config import ConfigError, parse_config
from petpipe.errors import DiskFullError
from petpipe.fetch import ArchiveLimitError, FetchError, Network, cache_dir, cached_archive, download, extract, fetch, local_path, progress_meter

FAST = Network(tries=3, connect_timeout=2.0, read_timeout=2.0, backoff=0.01, max_backoff=0.05)


def sha(path_or_bytes):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("PETPIPE_CACHE_DIR", str(path))
    return path


@pytest.fixture
def server():
    srv = FaultyServer()
    yield srv
    srv.close()


@pytest.fixture
def archive_bytes(dataset_tarball):
    return dataset_tarball.read_bytes()


def fetch_url(url, tmp_path, **kwargs):
    return fetch(url, dest=tmp_path / "dataset", root=tmp_path, network=FAST, **kwargs)


# --- local archives ----------------------------------------------------------------------------


def test_repo_path_is_verified_and_extracted_without_its_top_folder(tmp_path, dataset_tarball, cache):
    dest = tmp_path / "out" / "dataset"
    result = fetch(str(dataset_tarball.relative_to(tmp_path)), dest=dest, root=tmp_path, sha256=sha(dataset_tarball), size=dataset_tarball.stat().st_size)
    assert (dest / "train" / "red" / "0.png").is_file()
    assert (result.files, result.sha256, result.downloaded) == (33, sha(dataset_tarball), False)
    assert dataset_tarball.exists() and not cache.exists()  # a local archive is never copied or deleted


def test_file_url(tmp_path, dataset_tarball):
    dest = tmp_path / "dataset"
    fetch(dataset_tarball.as_uri(), dest=dest, root=tmp_path)
    assert (dest / "valid" / "blue" / "2.png").is_file()


def test_local_archive_failing_a_check_is_kept_and_named(tmp_path, dataset_tarball):
    with pytest.raises(FetchError, match=r"data.md5: the archive from .*tiny.tgz has MD5 [0-9a-f]{32}, params expect 0{32}"):
        fetch(str(dataset_tarball), dest=tmp_path / "d", root=tmp_path, md5="0" * 32)
    with pytest.raises(FetchError, match=r"data.size: the archive from .* has [\d,]+ bytes, params expect 12"):
        fetch(str(dataset_tarball), dest=tmp_path / "d", root=tmp_path, size=12)
    assert dataset_tarball.exists() and not (tmp_path / "d").exists()


def test_missing_local_archive_and_unsupported_scheme(tmp_path):
    with pytest.raises(FetchError, match=r"data.url: 'assets/none.tgz' -> .*none.tgz does not exist"):
        fetch("assets/none.tgz", dest=tmp_path / "d", root=tmp_path)
    with pytest.raises(FetchError, match="scheme 'ftp'"):
        local_path("ftp://example.org/x.tgz", tmp_path)


# --- the cache ---------------------------------------------------------------------------------


def test_cache_folder_comes_from_the_environment(tmp_path):
    assert cache_dir({"PETPIPE_CACHE_DIR": str(tmp_path / "c"), "XDG_CACHE_HOME": "/x"}) == tmp_path / "c"
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "petpipe" / "downloads"
    assert cache_dir({}).parts[-3:] == (".cache", "petpipe", "downloads")


def test_download_is_cached_per_url_and_reused_offline(tmp_path, server, archive_bytes, cache):
    server.files["/tiny.tgz"] = archive_bytes
    url = server.url("/tiny.tgz")
    result = fetch_url(url, tmp_path, sha256=sha(archive_bytes), size=len(archive_bytes))
    assert result.downloaded and result.files == 33 and (tmp_path / "dataset" / "train" / "green").is_dir()
    assert result.archive == cache / hashlib.sha256(url.encode()).hexdigest() / "tiny.tgz" and result.archive.read_bytes() == archive_bytes
    assert (result.archive.parent / "url").read_text() == url + "\n"
    server.close()  # offline from here on
    again = fetch_url(url, tmp_path, sha256=sha(archive_bytes))
    assert not again.downloaded and again.files == 33


def test_two_urls_ending_in_the_same_name_get_different_archives(tmp_path, server, cache):
    first, second = tar_bytes({"top/a/1.png": b"first", "top/b/1.png": b"1"}), tar_bytes({"top/a/1.png": b"second", "top/b/1.png": b"2"})
    server.files["/v1/data.tgz"], server.files["/v2/data.tgz"] = first, second
    fetch_url(server.url("/v1/data.tgz"), tmp_path)
    assert (tmp_path / "dataset" / "a" / "1.png").read_bytes() == b"first"
    fetch_url(server.url("/v2/data.tgz"), tmp_path)
    assert (tmp_path / "dataset" / "a" / "1.png").read_bytes() == b"second"
    assert server.requests("/v2/data.tgz") == [None]
    assert cached_archive(server.url("/v1/data.tgz"), cache) != cached_archive(server.url("/v2/data.tgz"), cache)


def test_html_page_instead_of_the_archive_fails_clearly_then_downloads_again(tmp_path, server, archive_bytes, cache):
    """A captive portal answers 200 with a page: with data.sha256 null, extraction is what catches it."""
    server.files["/tiny.tgz"] = archive_bytes
    server.plan("/tiny.tgz", ("html",))
    with pytest.raises(FetchError, match=r"neither a tar nor a zip archive \(it is an HTML page.*\); it was deleted from the cache, so the next run downloads"):
        fetch_url(server.url("/tiny.tgz"), tmp_path)
    assert not cached_archive(server.url("/tiny.tgz"), cache).exists() and not (tmp_path / "dataset").exists()
    result = fetch_url(server.url("/tiny.tgz"), tmp_path)  # the server works again
    assert result.downloaded and result.files == 33 and server.requests("/tiny.tgz") == [None, None]


def test_html_page_is_caught_by_data_size_before_its_body(tmp_path, server, archive_bytes, cache):
    server.files["/tiny.tgz"] = archive_bytes
    server.plan("/tiny.tgz", ("html",))
    with pytest.raises(FetchError, match=r"data.size: .*/tiny.tgz is \d+ bytes \(an HTML page: an error, login or proxy page\?\), params expect"):
        fetch_url(server.url("/tiny.tgz"), tmp_path, size=len(archive_bytes))
    assert not list(cache.rglob("tiny.tgz*"))
    assert fetch_url(server.url("/tiny.tgz"), tmp_path, size=len(archive_bytes)).files == 33


def test_checksum_mismatch_names_url_and_digests_and_deletes_the_download(tmp_path, server, archive_bytes, cache):
    server.files["/tiny.tgz"] = archive_bytes
    url = server.url("/tiny.tgz")
    with pytest.raises(FetchError, match=rf"data.sha256: the archive from {url} has SHA-256 {sha(archive_bytes)}, params expect 0{{64}}.*the download was deleted"):
        fetch_url(url, tmp_path, sha256="0" * 64)
    assert not (tmp_path / "dataset").exists() and not cached_archive(url, cache).exists()


def test_cached_archive_failing_the_new_checksum_is_downloaded_again(tmp_path, server, cache):
    old, new = tar_bytes({"t/a/1.png": b"old", "t/b/1.png": b"x"}), tar_bytes({"t/a/1.png": b"new", "t/b/1.png": b"x"})
    server.files["/d.tgz"] = old
    fetch_url(server.url("/d.tgz"), tmp_path)
    server.files["/d.tgz"] = new  # upstream changed and the params pin the new digest
    fetch_url(server.url("/d.tgz"), tmp_path, sha256=sha(new))
    assert (tmp_path / "dataset" / "a" / "1.png").read_bytes() == b"new" and len(server.requests("/d.tgz")) == 2


def test_archive_over_the_caps_is_refused_but_stays_cached(tmp_path, server, archive_bytes, cache):
    server.files["/tiny.tgz"] = archive_bytes
    with pytest.raises(ArchiveLimitError, match=r"data.max_members: archive .* has more than 10 entries"):
        fetch_url(server.url("/tiny.tgz"), tmp_path, max_members=10)
    assert cached_archive(server.url("/tiny.tgz"), cache).exists()  # not corrupt: no second download after raising the cap
    with pytest.raises(ArchiveLimitError, match=r"data.max_unpacked_bytes: archive .* unpacks to more than 1,000 bytes"):
        fetch_url(server.url("/tiny.tgz"), tmp_path, max_unpacked_bytes=1000)
    assert fetch_url(server.url("/tiny.tgz"), tmp_path, max_members=100, max_unpacked_bytes=10**6).files == 33
    assert server.requests("/tiny.tgz") == [None]


# --- network trouble ---------------------------------------------------------------------------


def test_http_503_twice_then_the_file(tmp_path, server, archive_bytes, cache, capsys):
    server.files["/tiny.tgz"] = archive_bytes
    server.plan("/tiny.tgz", ("status", 503), ("status", 503, 0))
    result = fetch_url(server.url("/tiny.tgz"), tmp_path, sha256=sha(archive_bytes))
    assert result.files == 33 and len(server.requests("/tiny.tgz")) == 3
    assert "answered HTTP 503 Service Unavailable; try 2 in 0 s" in capsys.readouterr().err


def test_dropped_connection_resumes_with_range(tmp_path, server, cache):
    payload = os.urandom(300_000)
    server.files["/blob.bin"] = payload
    server.plan("/blob.bin", ("drop", 100_000), ("drop", 50_000))
    target = tmp_path / "blob.bin"
    download(server.url("/blob.bin"), target, network=FAST)
    assert target.read_bytes() == payload and not target.with_name("blob.bin.part").exists()
    assert server.requests("/blob.bin") == [None, "bytes=100000-", "bytes=150000-"]


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


def test_size_announced_by_the_server_differs_from_data_size(tmp_path, server, archive_bytes, cache):
    server.files["/tiny.tgz"] = archive_bytes
    with pytest.raises(FetchError, match=rf"data.size: {server.url('/tiny.tgz')} is [\d,]+ bytes, params expect 811,706,944"):
        fetch_url(server.url("/tiny.tgz"), tmp_path, size=811_706_944)
    assert len(server.requests("/tiny.tgz")) == 1 and not list(cache.rglob("*.part"))


def test_gives_up_after_the_tries_naming_url_status_and_count(tmp_path, server):
    server.files["/x.tgz"] = b"x"
    server.plan("/x.tgz", *[("status", 502)] * 5)
    with pytest.raises(FetchError, match=rf"data.url: giving up on {server.url('/x.tgz')} after 3 tries; the last one: .*HTTP 502 Bad Gateway"):
        download(server.url("/x.tgz"), tmp_path / "x.tgz", network=FAST)


def test_http_404_is_final_at_once(tmp_path, server):
    with pytest.raises(FetchError, match=rf"data.url: {server.url('/missing.tgz')} answered HTTP 404"):
        download(server.url("/missing.tgz"), tmp_path / "m.tgz", network=FAST)
    assert len(server.requests("/missing.tgz")) == 1


def test_unreachable_host_names_the_url_and_gives_up_within_a_minute(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/x.tgz"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(FetchError, match=f"giving up on {url} after 3 tries; the last one: cannot reach {url}"):
        download(url, tmp_path / "x.tgz", network=FAST)
    assert time.monotonic() - started < 5
    # The defaults: a host that never answers costs `tries` connect timeouts plus the pauses.
    net = fetch_module.NETWORK
    pauses = sum(min(net.backoff * 2**i, net.max_backoff) for i in range(net.tries - 1))
    assert net.tries * net.connect_timeout + pauses < 60


def test_stalled_server_hits_the_read_timeout_and_the_retry_resumes(tmp_path, server):
    payload = os.urandom(40_000)
    server.files["/slow.bin"] = payload
    server.plan("/slow.bin", ("stall", 10_000, 3))
    started = time.monotonic()
    download(server.url("/slow.bin"), tmp_path / "slow.bin", network=Network(tries=2, connect_timeout=5, read_timeout=0.3, backoff=0.01))
    assert (tmp_path / "slow.bin").read_bytes() == payload and time.monotonic() - started < 2.5
    assert server.requests("/slow.bin") == [None, "bytes=10000-"]


def test_progress_is_a_bar_on_a_terminal_and_lines_in_logs(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, terminal = io.StringIO(), Terminal()
    monkeypatch.setattr(fetch_module, "LOG_EVERY", 0.0)
    with progress_meter("x.tgz", 4_000_000, 1_000_000, stream=log) as update:
        update(1_000_000)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("download x.tgz: 2.0 MB of 4.0 MB (50%), ") and "MB/s, ETA 0:" in lines[0]
    assert lines[-1].startswith("download x.tgz: 2.0 MB of 4.0 MB (50%), ") and " in 0:00" in lines[-1]
    with progress_meter("x.tgz", 4_000_000, 0, stream=terminal) as update:
        update(4_000_000)
    assert "download x.tgz: 100%" in terminal.getvalue() and "B/s" in terminal.getvalue()


# --- extraction --------------------------------------------------------------------------------


def test_not_an_archive_says_what_it_is(tmp_path):
    bogus = tmp_path / "bogus.tgz"
    bogus.write_text("not an archive")
    with pytest.raises(FetchError, match=r"neither a tar nor a zip archive \(it starts with b'not an archive'\)"):
        extract(bogus, tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()


def test_tar_path_traversal_is_refused_and_leaves_nothing(tmp_path):
    evil = tmp_path / "evil.tgz"
    evil.write_bytes(tar_bytes({"ok/a.txt": b"y", "../escape.txt": b"x"}))
    with pytest.raises(FetchError, match=r"unsafe entry \(a path outside its folder\): '../escape.txt'"):
        extract(evil, tmp_path / "out" / "dataset")
    assert not (tmp_path / "out" / "escape.txt").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no staging folder left behind


def tar_with(member: tarfile.TarInfo) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("top/a/1.png")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
        tar.addfile(member)
    return raw.getvalue()


@pytest.mark.parametrize(
    "kind, linkname, message",
    [
        (tarfile.SYMTYPE, "../../../outside", "a link out of its folder"),
        (tarfile.SYMTYPE, "/etc/passwd", "a link out of its folder"),
        (tarfile.LNKTYPE, "../x", "a link out of its folder"),
        (tarfile.CHRTYPE, "", "a device or pipe"),
        (tarfile.FIFOTYPE, "", "a device or pipe"),
    ],
)
def test_tar_links_out_and_devices_are_refused(tmp_path, kind, linkname, message):
    member = tarfile.TarInfo("top/a/link")
    member.type, member.linkname = kind, linkname
    archive = tmp_path / "evil.tgz"
    archive.write_bytes(tar_with(member))
    with pytest.raises(FetchError, match=rf"unsafe entry \(({message})\)"):
        extract(archive, tmp_path / "out" / "dataset")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_links_inside_the_archive_are_fine(tmp_path):
    member = tarfile.TarInfo("top/b/1.png")
    member.type, member.linkname = tarfile.SYMTYPE, "../a/1.png"
    archive = tmp_path / "ok.tgz"
    archive.write_bytes(tar_with(member))
    extract(archive, tmp_path / "dataset")
    assert (tmp_path / "dataset" / "b" / "1.png").read_bytes() == b"1"


def test_path_traversal_is_refused_without_tar_filters_too(tmp_path, monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter")  # as on Python < 3.11.4
    evil = tmp_path / "evil.tgz"
    evil.write_bytes(tar_bytes({"top/ok.txt": b"y", "top/../../escape.txt": b"x"}))
    with pytest.raises(FetchError, match="unsafe entry"):
        extract(evil, tmp_path / "out" / "dataset")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "dataset").exists()
    good = tmp_path / "good.tgz"
    good.write_bytes(tar_bytes({"top/a/1.png": b"1", "top/b/2.png": b"2"}))
    assert extract(good, tmp_path / "out" / "dataset") == 2


def test_failed_extraction_keeps_the_previous_dataset(tmp_path):
    dest = tmp_path / "dataset"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    broken = tmp_path / "broken.tgz"
    whole = tar_bytes({"a/b.png": os.urandom(20_000), "a/c.png": os.urandom(20_000)})
    broken.write_bytes(whole[: len(whole) // 2])  # cut off mid-archive
    with pytest.raises(FetchError, match="cannot extract"):
        extract(broken, dest)
    assert (dest / "keep.txt").read_text() == "old"


def write_zip(path, entries):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_zip_archives_work(tmp_path):
    archive = write_zip(tmp_path / "d.zip", {"top/train/a/1.png": b"x", "top/train/b/1.png": b"y"})
    assert extract(archive, tmp_path / "dataset") == 2
    assert (tmp_path / "dataset" / "train" / "a" / "1.png").is_file()


@pytest.mark.parametrize("name", ["../escape.txt", "top/../../escape.txt", "/abs/escape.txt", "C:/escape.txt", "..\\escape.txt"])
def test_zip_with_an_unsafe_member_is_refused_and_writes_nothing_outside(tmp_path, name):
    archive = write_zip(tmp_path / "evil.zip", {"top/a/1.png": b"1", name: b"x"})
    with pytest.raises(FetchError, match=r"unsafe entry \(a path outside its folder\)"):
        extract(archive, tmp_path / "out" / "dataset")
    assert not list(tmp_path.rglob("escape.txt")) and [p.name for p in (tmp_path / "out").iterdir()] == []


def test_zip_caps(tmp_path):
    archive = write_zip(tmp_path / "big.zip", {f"top/a/{i}.png": bytes(1000) for i in range(5)})
    with pytest.raises(ArchiveLimitError, match="data.max_unpacked_bytes"):
        extract(archive, tmp_path / "dataset", max_unpacked_bytes=4999)
    with pytest.raises(ArchiveLimitError, match="data.max_members"):
        extract(archive, tmp_path / "dataset", max_members=4)
    assert extract(archive, tmp_path / "dataset", max_members=5, max_unpacked_bytes=5000) == 5


# --- params ------------------------------------------------------------------------------------


def test_data_params_are_checked(tmp_path):
    import yaml
    from conftest import ROOT

    digits = yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())
    for key, value, message in [
        ("md5", "xyz", r"^data.md5: 'xyz': string should match pattern"),
        ("size", 0, r"^data.size: 0: input should be greater than or equal to 1$"),
        ("size", "811706944", r"^data.size: '811706944' is not an integer$"),
        ("max_members", 0, r"^data.max_members: 0: input should be greater than or equal to 1$"),
        ("max_unpacked_bytes", 1.5, r"^data.max_unpacked_bytes: 1.5 is not an integer$"),
    ]:
        raw = copy.deepcopy(digits)
        raw["data"][key] = value
        with pytest.raises(ConfigError, match=message):
            parse_config(raw)
