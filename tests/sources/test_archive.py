"""petpipe.sources.archive: safe extraction of tar and zip archives generated here (unsafe entries, caps, atomicity)."""

import io
import os
import tarfile
import zipfile

import pytest
from conftest import tar_bytes

from petpipe.sources.archive import ArchiveError, ArchiveLimitError, extract


def test_not_an_archive_says_what_it_is(tmp_path):
    bogus = tmp_path / "bogus.tgz"
    bogus.write_text("not an archive")
    with pytest.raises(ArchiveError, match=r"neither a tar nor a zip archive \(it starts with b'not an archive'\)"):
        extract(bogus, tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()


def test_tar_path_traversal_is_refused_and_leaves_nothing(tmp_path):
    evil = tmp_path / "evil.tgz"
    evil.write_bytes(tar_bytes({"ok/a.txt": b"y", "../escape.txt": b"x"}))
    with pytest.raises(ArchiveError, match=r"unsafe entry \(a path outside its folder\): '../escape.txt'"):
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
    with pytest.raises(ArchiveError, match=rf"unsafe entry \(({message})\)"):
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
    with pytest.raises(ArchiveError, match="unsafe entry"):
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
    with pytest.raises(ArchiveError, match="cannot extract"):
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


@pytest.mark.parametrize(
    "name", ["../escape.txt", "top/../../escape.txt", "/abs/escape.txt", "C:/escape.txt", "..\\escape.txt"]
)
def test_zip_with_an_unsafe_member_is_refused_and_writes_nothing_outside(tmp_path, name):
    archive = write_zip(tmp_path / "evil.zip", {"top/a/1.png": b"1", name: b"x"})
    with pytest.raises(ArchiveError, match=r"unsafe entry \(a path outside its folder\)"):
        extract(archive, tmp_path / "out" / "dataset")
    assert not list(tmp_path.rglob("escape.txt")) and [p.name for p in (tmp_path / "out").iterdir()] == []


def test_zip_caps(tmp_path):
    archive = write_zip(tmp_path / "big.zip", {f"top/a/{i}.png": bytes(1000) for i in range(5)})
    with pytest.raises(ArchiveLimitError, match="data.max_unpacked_bytes"):
        extract(archive, tmp_path / "dataset", max_unpacked_bytes=4999)
    with pytest.raises(ArchiveLimitError, match="data.max_members"):
        extract(archive, tmp_path / "dataset", max_members=4)
    assert extract(archive, tmp_path / "dataset", max_members=5, max_unpacked_bytes=5000) == 5
