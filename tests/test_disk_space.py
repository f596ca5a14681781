"""A stage on a small disk, run as DVC runs it (its own process): a store that cannot fit stops presize
before any work, and a disk that fills anyway mid-write ends in one line naming the file, never a
traceback, with nothing half-written left. The disk is a real tmpfs where the machine lets an
unprivileged user mount one in a namespace of its own, else a simulated one (tests/small_disk.py,
which the unit tests of files and presize use as well)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, folder_table, stage_env, write_folder_dataset, write_params
from small_disk import can_mount_tmpfs, simulated_command, tmpfs_command

from petpipe.data.presize import store_bytes
from petpipe.data.table import write_table

DISK = 256 * 1024  # bytes: the small disk's size and free space
PLENTY = 10**12
FULL = "no space left on device while writing it; free space on its disk and run the stage again"


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> str:
    """``tmpfs`` where this machine allows it, else ``simulated``."""
    return "tmpfs" if can_mount_tmpfs(tmp_path_factory.mktemp("probe") / "disk") else "simulated"


@pytest.fixture
def inputs(tmp_path, mlflow_store):
    """33 images of 16 px in three classes, their labels table, and params for a 64 px store (about 400 KB)."""
    dataset = write_folder_dataset(tmp_path / "ds")
    table = folder_table(dataset)
    write_table(table, tmp_path / "labels")
    params = yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())
    params["presize"]["size"] = 64
    params_file = write_params(tmp_path / "params.yaml", params)
    return {"dataset": dataset, "table": table, "params": params_file, "mlflow": mlflow_store}


def run_on_disk(
    disk: str,
    folder: Path,
    stage_args: list[str],
    *,
    mlflow: str,
    reports_free: int | None = None,
    full: bool = False,
    size: int = DISK,
) -> tuple[int, str, list[str]]:
    """The stage script ``stage_args[0]`` with ``folder`` on a disk of ``size`` bytes (``full``: full from the
    start); ``reports_free``: the free space the stage reads instead, a disk that fills after the check.
    Returns (exit code, the last line of stderr, the files left on the disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    if disk == "tmpfs":  # the kernel's own ENOSPC and free space
        inner = [sys.executable, *stage_args]
        if reports_free is not None:
            inner = simulated_command(folder, PLENTY, reports_free, *stage_args)
        command = tmpfs_command(folder, size, inner, fill=full)
    else:
        free = reports_free if reports_free is not None else 0 if full else size
        command = simulated_command(folder, 0 if full else size, free, *stage_args)
    env = stage_env(MLFLOW_TRACKING_URI=mlflow)
    done = subprocess.run(command, cwd=folder.parent, env=env, capture_output=True, text=True, timeout=300, check=False)
    if disk == "tmpfs":
        left = done.stdout.strip().splitlines()[-1].removeprefix("files left on the disk:").split()
    else:
        left = [str(p) for p in folder.rglob("*") if p.is_file()]
    *before, last = done.stderr.splitlines() or [""]
    assert "Traceback" not in done.stderr and not any(line.startswith("error:") for line in before), done.stderr
    return done.returncode, last, left  # before the error line: at most presize's progress bar


def presize_args(inputs, out, tmp_path) -> list[str]:
    return [
        str(ROOT / "stages/presize.py"),
        "--params",
        inputs["params"],
        "--dataset",
        str(inputs["dataset"]),
        "--table-csv",
        str(tmp_path / "labels/table.csv"),
        "--classes-json",
        str(tmp_path / "labels/classes.json"),
        "--out-dir",
        str(out),
        "--metrics",
        str(tmp_path / "presize.json"),
    ]


def test_presize_stops_before_any_work_when_the_store_cannot_fit(disk, inputs, tmp_path):
    out = tmp_path / "disk/presized"
    code, line, left = run_on_disk(disk, out.parent, presize_args(inputs, out, tmp_path), mlflow=inputs["mlflow"])
    needed = store_bytes(33 * 64 * 64 * 3, [item.path for item in inputs["table"].items], inputs["table"].classes)
    assert line == (
        f"error: presize: the store {out} at presize.size 64 needs {needed:,} bytes ({needed / 2**20:.1f} MiB) "
        f"but its disk has {DISK:,} bytes (0.2 MiB) free; free space on it, lower presize.size "
        "(the store grows with its square), or move the DVC cache to another disk (dvc cache dir PATH)"
    )
    assert code == 2 and left == [] and not (tmp_path / "presize.json").exists()


def test_a_disk_that_fills_mid_write_ends_presize_in_one_line_naming_the_file(disk, inputs, tmp_path):
    out = tmp_path / "disk/presized"
    args = presize_args(inputs, out, tmp_path)
    small = 16 * 1024  # the 33 JPEGs at 64 px take ~40 KB: the disk fills in images.jpg, the first file written
    code, line, left = run_on_disk(
        disk, out.parent, args, mlflow=inputs["mlflow"], reports_free=PLENTY, size=small
    )  # the check passes
    assert (code, line, left) == (2, f"error: {out}/images.jpg: {FULL}", [])


def test_a_full_disk_ends_labels_in_one_line_naming_the_file(disk, inputs, tmp_path):
    out = tmp_path / "disk/labels"
    args = [
        str(ROOT / "stages/labels.py"),
        "--params",
        inputs["params"],
        "--dataset",
        str(inputs["dataset"]),
        "--out-dir",
        str(out),
        "--metrics",
        str(tmp_path / "labels.json"),
    ]
    code, line, left = run_on_disk(disk, out.parent, args, mlflow=inputs["mlflow"], full=True)
    assert (code, line, left) == (2, f"error: {out}/table.csv: {FULL}", [])
