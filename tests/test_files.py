import os
import stat

import pytest

from petpipe.files import atomic_open, current_umask, replace_dir, staged_dir, write_json, write_text


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
