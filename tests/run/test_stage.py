import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

from petpipe.run.stage import stage_main

SRC = Path(__file__).resolve().parents[2] / "src"


def test_exit_process_keeps_the_exit_code_the_atexit_handlers_and_unflushed_output():
    script = textwrap.dedent(
        """
        import atexit, gc, sys
        sys.path.insert(0, sys.argv[1])
        from petpipe.run.stage import exit_process
        atexit.register(lambda: print("atexit ran, frozen:", gc.get_freeze_count() > 0, end=""))
        print("no newline yet", end=" ")
        print("stderr too", end="", file=sys.stderr)
        exit_process(3)
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(SRC)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "no newline yet atexit ran, frozen: True"
    assert done.stderr == "stderr too"


def full_disk_under_a_library(cfg, *, out):
    try:
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "artifact.bin"))
    except OSError:
        raise RuntimeError("a library's wrapper of the error")  # noqa: B904 (as torch.save does: implicit chaining)


def full_disk_in_a_copy(cfg, *, out):  # shutil.copyfile names the source first, the file it was writing second
    raise OSError(errno.ENOSPC, "No space left on device", "skipped.csv", None, str(out / "artifacts/skipped.csv"))


def full_disk_unnamed(cfg, *, out):
    raise OSError(errno.EDQUOT, "Disk quota exceeded")


def permission_denied(cfg, *, out):
    raise PermissionError(errno.EACCES, "Permission denied", str(out))


@pytest.mark.parametrize(
    "run, line",
    [
        (full_disk_under_a_library, "{out}/artifact.bin: no space left on device while writing it"),
        (full_disk_in_a_copy, "{out}/artifacts/skipped.csv: no space left on device while writing it"),
        (full_disk_unnamed, "a file: disk quota exceeded while writing it"),
    ],
)
def test_a_disk_filling_under_any_library_ends_in_one_line(tmp_path, capsys, run, line):
    argv = ["--params", str(ROOT / "profiles/digits.yaml"), "--out", str(tmp_path)]
    assert stage_main(run, [("out", "output folder")], "a stage", argv=argv) == 2
    then = "free space on its disk and run the stage again"
    assert capsys.readouterr().err == f"error: {line.format(out=tmp_path)}; {then}\n"
    with pytest.raises(PermissionError):  # any other error keeps its traceback
        stage_main(permission_denied, [("out", "output folder")], "a stage", argv=argv)
