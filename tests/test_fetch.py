import hashlib
import os
import tarfile

import pytest
from conftest import tar_bytes

from petpipe.fetch import FetchError, download, extract, fetch, local_path


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_repo_path_is_verified_and_extracted_without_its_top_folder(tmp_path, dataset_tarball):
    dest = tmp_path / "out" / "dataset"
    result = fetch(str(dataset_tarball.relative_to(tmp_path)), sha(dataset_tarball), dest=dest, root=tmp_path, downloads=tmp_path / "dl")
    assert (dest / "train" / "red" / "0.png").is_file()
    assert result.files == 33 and result.sha256 == sha(dataset_tarball)
    assert dataset_tarball.exists()  # a local archive is never deleted


def test_file_url(tmp_path, dataset_tarball):
    dest = tmp_path / "dataset"
    fetch(dataset_tarball.as_uri(), None, dest=dest, root=tmp_path, downloads=tmp_path / "dl")
    assert (dest / "valid" / "blue" / "2.png").is_file()


def test_http_download_then_extract(tmp_path, dataset_tarball, http_server):
    www, base = http_server
    (www / "tiny.tgz").write_bytes(dataset_tarball.read_bytes())
    dest, downloads = tmp_path / "dataset", tmp_path / "dl"
    result = fetch(f"{base}/tiny.tgz", sha(dataset_tarball), dest=dest, root=tmp_path, downloads=downloads)
    assert result.files == 33 and (dest / "train" / "green").is_dir()
    assert [p.name for p in downloads.iterdir()] == ["tiny.tgz"]  # kept: a re-run does not download again
    (www / "tiny.tgz").unlink()
    fetch(f"{base}/tiny.tgz", sha(dataset_tarball), dest=dest, root=tmp_path, downloads=downloads)  # offline re-run works


def test_download_resumes_from_a_part_file(tmp_path, http_server):
    www, base = http_server
    payload = bytes(range(256)) * 4096
    (www / "blob.bin").write_bytes(payload)
    target = tmp_path / "blob.bin"
    # An earlier, interrupted try; zeros instead of the real bytes prove the start is not fetched again.
    target.with_name("blob.bin.part").write_bytes(bytes(300_000))
    download(f"{base}/blob.bin", target)
    assert target.read_bytes() == bytes(300_000) + payload[300_000:]
    assert not target.with_name("blob.bin.part").exists()


def test_checksum_mismatch_names_url_and_digests_and_writes_nothing(tmp_path, dataset_tarball, http_server):
    www, base = http_server
    (www / "tiny.tgz").write_bytes(dataset_tarball.read_bytes())
    dest, downloads = tmp_path / "dataset", tmp_path / "dl"
    with pytest.raises(FetchError, match=rf"data.sha256: the archive from {base}/tiny.tgz has SHA-256 {sha(dataset_tarball)}, params expect 0{{64}}"):
        fetch(f"{base}/tiny.tgz", "0" * 64, dest=dest, root=tmp_path, downloads=downloads)
    assert not dest.exists()
    assert not (downloads / "tiny.tgz").exists()  # a bad download is not trusted next time


def test_missing_local_archive_and_http_404_name_the_url(tmp_path, http_server):
    _, base = http_server
    with pytest.raises(FetchError, match=r"data.url: 'assets/none.tgz' -> .*none.tgz does not exist"):
        fetch("assets/none.tgz", None, dest=tmp_path / "d", root=tmp_path, downloads=tmp_path / "dl")
    with pytest.raises(FetchError, match=rf"data.url: {base}/missing.tgz answered HTTP 404"):
        fetch(f"{base}/missing.tgz", None, dest=tmp_path / "d", root=tmp_path, downloads=tmp_path / "dl")


def test_unsupported_scheme(tmp_path):
    with pytest.raises(FetchError, match="scheme 'ftp'"):
        local_path("ftp://example.org/x.tgz", tmp_path)


def test_unreachable_host_names_the_url(tmp_path):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/x.tgz"  # nothing listens there
    with pytest.raises(FetchError, match=f"cannot reach {url}"):
        download(url, tmp_path / "x.tgz", timeout=5)


def test_not_an_archive(tmp_path):
    bogus = tmp_path / "bogus.tgz"
    bogus.write_text("not an archive")
    with pytest.raises(FetchError, match="neither a tar nor a zip"):
        extract(bogus, tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()


def test_path_traversal_is_refused_and_leaves_nothing(tmp_path):
    evil = tmp_path / "evil.tgz"
    evil.write_bytes(tar_bytes({"../escape.txt": b"x", "ok/a.txt": b"y"}))
    with pytest.raises(FetchError, match="cannot extract"):
        extract(evil, tmp_path / "out" / "dataset")
    assert not (tmp_path / "out" / "escape.txt").exists()
    assert not (tmp_path / "out" / "dataset").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no staging folder left behind


def test_failed_extraction_keeps_the_previous_dataset(tmp_path):
    dest = tmp_path / "dataset"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    broken = tmp_path / "broken.tgz"
    whole = tar_bytes({"a/b.png": os.urandom(20_000), "a/c.png": os.urandom(20_000)})
    broken.write_bytes(whole[: len(whole) // 2])  # cut off mid-archive
    with pytest.raises(FetchError):
        extract(broken, dest)
    assert (dest / "keep.txt").read_text() == "old"


def test_zip_archives_work(tmp_path):
    import zipfile

    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/train/a/1.png", b"x")
        zf.writestr("top/train/b/1.png", b"y")
    assert extract(archive, tmp_path / "dataset") == 2
    assert (tmp_path / "dataset" / "train" / "a" / "1.png").is_file()


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
