"""benchmarks/lesson_pipeline.py: its measures on small trees, and the CPU dry variant end to end through the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import lesson_pipeline  # noqa: E402

STAGES = ["fetch", "labels", "presize", "train_frozen", "lr_find", "choose_lr", "finetune", "report"]


def test_disk_bytes_counts_a_hard_link_once_and_leaves_git_out(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 100_000)
    before = lesson_pipeline.disk_bytes(tmp_path)
    assert before >= 100_000
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "big").write_bytes(b"y" * 100_000)
    assert lesson_pipeline.disk_bytes(tmp_path) == before
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c").write_bytes(b"z" * 50_000)
    assert lesson_pipeline.disk_bytes(tmp_path) >= before + 50_000


def test_epoch_seconds_sums_the_curves_of_the_training_stages(tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "finetune.csv").write_text("epoch,epoch_seconds,accuracy\n1,2.5,0.5\n2,1.5,0.6\n")
    assert lesson_pipeline.epoch_seconds(tmp_path, "finetune") == 4.0
    assert lesson_pipeline.epoch_seconds(tmp_path, "train_frozen") == 0.0  # no curves yet
    assert lesson_pipeline.epoch_seconds(tmp_path, "presize") == 0.0  # no epochs


def row(stage: str, wall: float, epochs: float, disk: int, phases: dict | None = None) -> dict:
    return {"stage": stage, "wall_s": wall, "work_s": wall / 2, "startup_s": 1.0, "teardown_s": 0.1,
            "phases": phases or {}, "epochs_s": epochs, "non_epoch_s": wall - epochs, "disk_bytes": disk,
            "images_per_s": None}  # fmt: skip


def test_table_and_comparison_of_two_revisions() -> None:
    old = [row("presize", 10.0, 0.0, 2_000_000), row("finetune", 30.0, 20.0, 1_000_000)]
    new = [row("presize", 6.0, 0.0, 1_000_000, {"decode": 4.0, "write": 1.3}), row("finetune", 25.0, 20.0, 500_000)]
    text = lesson_pipeline.table(new, "new")
    assert "| phases s | epochs s | non-epoch s | disk MB |" in text
    assert "| presize | 6.0 | 3.0 | 1.0 | 0.1 | decode 4.0, write 1.3 | 0.0 | 6.0 | 1.0 |" in text
    assert "| all stages | 31.0 | | | | | 20.0 | 11.0 | 1.5 | |" in text
    comparison = lesson_pipeline.comparison({"0": "e1d50d3", "1": "WORKTREE"}, {"0": [old], "1": [new]})
    assert "| presize | 10.0 | 6.0 | 10.0 | 6.0 | 0.60 | 2.0 | 1.0 | 0.50 |" in comparison
    assert "| all stages | 40.0 | 31.0 | 20.0 | 11.0 | 0.55 | 3.0 | 1.5 | 0.50 |" in comparison


@pytest.mark.slow
def test_cpu_dry_variant_end_to_end(tmp_path: Path) -> None:
    """The real script on the CPU variant's dry size (148 photo-sized JPEGs, presize 460, resnet18 at 32 px)."""
    out = tmp_path / "lesson.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PETPIPE_WARM": "0"}
    done = subprocess.run(
        [sys.executable, "benchmarks/lesson_pipeline.py", "--cpu", "--dry-run", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| start-up s | teardown s | phases s | epochs s | non-epoch s | disk MB |" in done.stdout
    assert "148 generated images, 37 classes" in done.stdout
    rows = {r["stage"]: r for r in json.loads(out.read_text())["runs"]["0"][0]}
    assert list(rows) == STAGES
    for stage, r in rows.items():
        assert 0 < r["non_epoch_s"] <= r["wall_s"], stage
        assert r["startup_s"] is not None and r["startup_s"] > 0, stage
        assert all(seconds >= 0 for seconds in r["phases"].values()), stage
    for stage in ("train_frozen", "finetune"):
        assert 0 < rows[stage]["epochs_s"] < rows[stage]["wall_s"], stage
        assert rows[stage]["non_epoch_s"] < rows[stage]["wall_s"], stage
    for stage in ("fetch", "presize", "train_frozen", "finetune"):  # outputs in the workspace and DVC's cache
        assert rows[stage]["disk_bytes"] > 0, stage
    assert sum(r["disk_bytes"] for r in rows.values()) > 0
