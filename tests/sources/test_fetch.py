"""petpipe.sources.fetch against a real HTTP server on 127.0.0.1 (one that misbehaves on cue): local archives, the
download cache (reused while it verifies, deleted when it fails) and the data.* params."""

import copy
import hashlib

import pytest
from conftest import tar_bytes
from test_download import FAST

from petpipe.run.config import ConfigError, parse_config
from petpipe.sources.archive import ArchiveError, ArchiveLimitError
from petpipe.sources.download import DownloadError, cached_archive
from petpipe.sources.fetch import FetchError, fetch, local_path


def sha(path_or_bytes):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def archive_bytes(dataset_tarball):
    return dataset_tarball.read_bytes()


def fetch_url(url, tmp_path, **kwargs):
    return fetch(url, dest=tmp_path / "dataset", root=tmp_path, network=FAST, **kwargs)


# --- local archives --------------------------------------------------------------------------


def test_repo_path_is_verified_and_extracted_without_its_top_folder(tmp_path, dataset_tarball, cache):
    dest = tmp_path / "out" / "dataset"
    result = fetch(
        str(dataset_tarball.relative_to(tmp_path)),
        dest=dest,
        root=tmp_path,
        sha256=sha(dataset_tarball),
        size=dataset_tarball.stat().st_size,
    )
    assert (dest / "train" / "red" / "0.png").is_file()
    assert (result.files, result.sha256, result.downloaded) == (33, sha(dataset_tarball), False)
    assert dataset_tarball.exists() and not cache.exists()  # a local archive is never copied or deleted


def test_file_url(tmp_path, dataset_tarball):
    dest = tmp_path / "dataset"
    fetch(dataset_tarball.as_uri(), dest=dest, root=tmp_path)
    assert (dest / "valid" / "blue" / "2.png").is_file()


def test_local_archive_failing_a_check_is_kept_and_named(tmp_path, dataset_tarball):
    with pytest.raises(
        ArchiveError, match=r"data.md5: the archive from .*tiny.tgz has MD5 [0-9a-f]{32}, params expect 0{32}"
    ):
        fetch(str(dataset_tarball), dest=tmp_path / "d", root=tmp_path, md5="0" * 32)
    with pytest.raises(ArchiveError, match=r"data.size: the archive from .* has [\d,]+ bytes, params expect 12"):
        fetch(str(dataset_tarball), dest=tmp_path / "d", root=tmp_path, size=12)
    assert dataset_tarball.exists() and not (tmp_path / "d").exists()


def test_missing_local_archive_and_unsupported_scheme(tmp_path):
    with pytest.raises(FetchError, match=r"data.url: 'assets/none.tgz' -> .*none.tgz does not exist"):
        fetch("assets/none.tgz", dest=tmp_path / "d", root=tmp_path)
    with pytest.raises(FetchError, match="scheme 'ftp'"):
        local_path("ftp://example.org/x.tgz", tmp_path)


# --- the cache -------------------------------------------------------------------------------


def test_download_is_cached_per_url_and_reused_offline(tmp_path, server, archive_bytes, cache):
    server.files["/tiny.tgz"] = archive_bytes
    url = server.url("/tiny.tgz")
    result = fetch_url(url, tmp_path, sha256=sha(archive_bytes), size=len(archive_bytes))
    assert result.downloaded and result.files == 33 and (tmp_path / "dataset" / "train" / "green").is_dir()
    assert (
        result.archive == cache / hashlib.sha256(url.encode()).hexdigest() / "tiny.tgz"
        and result.archive.read_bytes() == archive_bytes
    )
    assert (result.archive.parent / "url").read_text() == url + "\n"
    server.close()  # offline from here on
    again = fetch_url(url, tmp_path, sha256=sha(archive_bytes))
    assert not again.downloaded and again.files == 33


def test_two_urls_ending_in_the_same_name_get_different_archives(tmp_path, server, cache):
    first, second = (
        tar_bytes({"top/a/1.png": b"first", "top/b/1.png": b"1"}),
        tar_bytes({"top/a/1.png": b"second", "top/b/1.png": b"2"}),
    )
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
    with pytest.raises(
        ArchiveError,
        match=r"neither a tar nor a zip archive \(it is an HTML page.*\); it was deleted from the cache, so the next "
        r"run downloads",
    ):
        fetch_url(server.url("/tiny.tgz"), tmp_path)
    assert not cached_archive(server.url("/tiny.tgz"), cache).exists() and not (tmp_path / "dataset").exists()
    result = fetch_url(server.url("/tiny.tgz"), tmp_path)  # the server works again
    assert result.downloaded and result.files == 33 and server.requests("/tiny.tgz") == [None, None]


def test_html_page_is_caught_by_data_size_before_its_body(tmp_path, server, archive_bytes, cache):
    server.files["/tiny.tgz"] = archive_bytes
    server.plan("/tiny.tgz", ("html",))
    with pytest.raises(
        DownloadError,
        match=r"data.size: .*/tiny.tgz is \d+ bytes \(an HTML page: an error, login or proxy page\?\), params expect",
    ):
        fetch_url(server.url("/tiny.tgz"), tmp_path, size=len(archive_bytes))
    assert not list(cache.rglob("tiny.tgz*"))
    assert fetch_url(server.url("/tiny.tgz"), tmp_path, size=len(archive_bytes)).files == 33


def test_checksum_mismatch_names_url_and_digests_and_deletes_the_download(tmp_path, server, archive_bytes, cache):
    server.files["/tiny.tgz"] = archive_bytes
    url = server.url("/tiny.tgz")
    with pytest.raises(
        ArchiveError,
        match=rf"data.sha256: the archive from {url} has SHA-256 {sha(archive_bytes)}, params expect 0{{64}}.*the "
        r"download was deleted",
    ):
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
    assert cached_archive(
        server.url("/tiny.tgz"), cache
    ).exists()  # not corrupt: no second download after raising the cap
    with pytest.raises(
        ArchiveLimitError, match=r"data.max_unpacked_bytes: archive .* unpacks to more than 1,000 bytes"
    ):
        fetch_url(server.url("/tiny.tgz"), tmp_path, max_unpacked_bytes=1000)
    assert fetch_url(server.url("/tiny.tgz"), tmp_path, max_members=100, max_unpacked_bytes=10**6).files == 33
    assert server.requests("/tiny.tgz") == [None]


def test_http_503_twice_then_the_file(tmp_path, server, archive_bytes, cache, capsys):
    server.files["/tiny.tgz"] = archive_bytes
    server.plan("/tiny.tgz", ("status", 503), ("status", 503, 0))
    result = fetch_url(server.url("/tiny.tgz"), tmp_path, sha256=sha(archive_bytes))
    assert result.files == 33 and len(server.requests("/tiny.tgz")) == 3
    assert "answered HTTP 503 Service Unavailable; try 2 in 0 s" in capsys.readouterr().err


def test_size_announced_by_the_server_differs_from_data_size(tmp_path, server, archive_bytes, cache):
    server.files["/tiny.tgz"] = archive_bytes
    with pytest.raises(
        DownloadError, match=rf"data.size: {server.url('/tiny.tgz')} is [\d,]+ bytes, params expect 811,706,944"
    ):
        fetch_url(server.url("/tiny.tgz"), tmp_path, size=811_706_944)
    assert len(server.requests("/tiny.tgz")) == 1 and not list(cache.rglob("*.part"))


# --- params ----------------------------------------------------------------------------------


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
