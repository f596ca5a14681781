import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
from small_disk import SmallDisk

from petpipe.run.errors import DiskFullError, NoRoomError, check_room
from petpipe.run.files import atomic_open, current_umask, free_bytes, replace_dir, staged_dir, write_json, write_text


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"accuracy": 0.5})
    write_text(target, '{"accuracy": 0.9}\n')
    assert target.read_text() == '{"accuracy": 0.9}\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()  # not mkstemp's 0600
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_interrupted_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target) as f:
            f.write("half of the new")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["table.csv"]


def test_replace_dir_swaps_folders(tmp_path):
    old, new = tmp_path / "dataset", tmp_path / "staging"
    old.mkdir()
    (old / "old.txt").write_text("x")
    new.mkdir(mode=0o700)
    (new / "new.txt").write_text("y")
    replace_dir(new, old)
    assert [p.name for p in old.iterdir()] == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["dataset"]
    assert stat.S_IMODE(old.stat().st_mode) == 0o777 & ~current_umask()


def test_staged_dir_replaces_the_folder_only_when_the_block_succeeds(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(dest) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dest / "old.txt").read_text() == "old"
    with staged_dir(dest, promote=lambda staging: staging / "top") as staging:
        (staging / "top").mkdir()
        (staging / "top" / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in dest.iterdir()] == ["new.txt"]
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o777 & ~current_umask()


FULL = "no space left on device while writing it; free space on its disk and run the stage again"


def test_check_room_is_one_line_naming_what_where_the_bytes_and_the_fix():
    check_room(100, 100, what="the store x", where="its disk", fix="make room")  # fits exactly: no error
    with pytest.raises(NoRoomError) as caught:
        check_room(3 * 2**20, 40_000, what="the store x", where="its disk", fix="make room")
    assert str(caught.value) == (
        "the store x needs 3,145,728 bytes (3.0 MiB) but its disk has 40,000 bytes (0.0 MiB) free; make room"
    )


def test_free_bytes_of_a_folder_yet_to_be_made_are_its_nearest_existing_parents(tmp_path, monkeypatch):
    asked = []
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("shutil.disk_usage", lambda path: asked.append(Path(path)) or real._replace(free=5))
    assert free_bytes(tmp_path / "not" / "yet") == 5 and asked == [tmp_path]


def test_a_full_disk_in_atomic_open_names_the_file_not_its_temp_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    SmallDisk(tmp_path, fills_after=10, free=10).install(monkeypatch)
    with pytest.raises(DiskFullError) as caught:
        write_text(target, "a new table longer than ten bytes\n")
    assert str(caught.value) == f"{target}: {FULL}" and caught.value.path == target
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["table.csv"]


def test_a_full_disk_under_a_library_error_is_found_and_other_errors_pass(tmp_path):
    with pytest.raises(DiskFullError, match=f"model.pt: {FULL}"):
        with atomic_open(tmp_path / "model.pt", "wb"):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904 (torch.save's way)
    with pytest.raises(PermissionError):
        with atomic_open(tmp_path / "model.pt", "wb"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert os.listdir(tmp_path) == []


def write_plainly(staging):
    with open(staging / "sub/pixels.bin", "wb") as f:
        f.write(bytes(20))  # the OS names no file


def fail_to_create(staging):
    raise OSError(errno.ENOSPC, "No space left on device", str(staging / "sub/pixels.bin"))  # the OS names the file


def write_atomically(staging):
    write_json(staging / "sub/meta.json", {"n": list(range(20))})  # atomic_open names it, at its temp's folder


@pytest.mark.parametrize(
    "write, named", [(write_plainly, ""), (fail_to_create, "sub/pixels.bin"), (write_atomically, "sub/meta.json")]
)
def test_a_full_disk_in_a_staged_folder_names_the_final_place_and_keeps_the_old_one(
    tmp_path, monkeypatch, write, named
):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    SmallDisk(tmp_path, fills_after=5, free=5).install(monkeypatch)
    with pytest.raises(DiskFullError) as caught:
        with staged_dir(dest) as staging:
            (staging / "sub").mkdir()
            write(staging)
    assert str(caught.value) == f"{dest / named if named else dest}: {FULL}"
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(dest) == ["old.txt"]
