"""A training stage killed mid-run (SIGKILL or SIGTERM) continues from its last epoch and ends
with exactly the metrics and weights of an uninterrupted run (CPU, same seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, stage_env
from test_stage_spec import load_stage

pytestmark = pytest.mark.slow
EPOCHS = 6
TIMING = ("epoch_seconds", "train_images_per_s")
STORE = ("store_copy_seconds", "store_device_bytes")  # only with train.store_on_device


@pytest.fixture
def params(tmp_path, mlflow_store) -> Path:
    raw = yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())
    raw["device"] = "cpu"
    raw["presize"]["size"] = 24
    raw["train"].update(size=16, batch_size=4, num_workers=0)
    raw["train_frozen"]["epochs"] = EPOCHS
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stage_args(params: Path, store: Path, out: Path) -> list[str]:
    return [
        "--params",
        str(params),
        "--presized",
        str(store),
        "--checkpoint",
        str(out / "stage1.pt"),
        "--metrics",
        str(out / "metrics.json"),
        "--plot",
        str(out / "curve.csv"),
    ]


def results(out: Path) -> tuple[dict, dict]:
    metrics = {k: v for k, v in json.loads((out / "metrics.json").read_text()).items() if k not in TIMING + STORE}
    return metrics, torch.load(out / "stage1.pt", weights_only=True)["model"]


def start_stage(params: Path, store: Path, out: Path, mlflow_store: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "stages/train_frozen.py"), *stage_args(params, store, out)],
        cwd=out,
        env=stage_env(MLFLOW_TRACKING_URI=mlflow_store),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_stage(params: Path, store: Path, out: Path, mlflow_store: str) -> subprocess.CompletedProcess:
    """The stage to its end, in its own process, as DVC runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "stages/train_frozen.py"), *stage_args(params, store, out)],
        cwd=out,
        env=stage_env(MLFLOW_TRACKING_URI=mlflow_store),
        capture_output=True,
        text=True,
        timeout=300,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"stage ended before its first epoch was saved:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no resume state written"
        time.sleep(0.02)


@pytest.fixture
def uninterrupted(params, presized_store, tmp_path, monkeypatch, mlflow_store):
    out = tmp_path / "uninterrupted"
    out.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.chdir(out)
    assert load_stage("train_frozen").main(stage_args(params, presized_store, out)) == 0
    assert not (out / ".dvc/tmp/resume/train_frozen.pt").exists()  # cleared once the outputs are complete
    return results(out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_stage_resumes_and_matches_an_uninterrupted_run(
    sig, params, presized_store, tmp_path, mlflow_store, uninterrupted
):
    out = tmp_path / "interrupted"
    proc = start_stage(params, presized_store, out, mlflow_store)
    state = out / ".dvc/tmp/resume/train_frozen.pt"
    wait_for(state, proc)
    sent = time.monotonic()
    os.kill(proc.pid, sig)
    log = proc.communicate(timeout=30)[0]
    assert time.monotonic() - sent < 10  # SIGTERM ends the stage within seconds
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), log
    if sig == signal.SIGTERM:
        assert "interrupted: no output was written as complete" in log
    assert (
        not (out / "metrics.json").exists() and not (out / "stage1.pt").exists()
    )  # nothing half-written looks complete
    assert state.exists()

    resumed = run_stage(params, presized_store, out, mlflow_store)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = int(resumed.stdout.split("resume: continuing after epoch ")[1].split()[0])
    assert 1 <= after < EPOCHS
    metrics, weights = results(out)
    assert metrics == uninterrupted[0]
    assert all(torch.equal(weights[k], uninterrupted[1][k]) for k in weights)
    assert (
        len((out / "curve.csv").read_text().splitlines()) == EPOCHS + 1
    )  # every epoch in the curves, including those before the kill
    assert not state.exists()


def test_a_state_from_other_params_is_discarded(params, presized_store, tmp_path, mlflow_store):
    out = tmp_path / "stale"
    proc = start_stage(params, presized_store, out, mlflow_store)
    wait_for(out / ".dvc/tmp/resume/train_frozen.pt", proc)
    proc.kill()
    proc.communicate()
    raw = yaml.safe_load(params.read_text())
    raw["train_frozen"]["epochs"] = 2
    params.write_text(yaml.safe_dump(raw))
    rerun = run_stage(params, presized_store, out, mlflow_store)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (
        "discarding" in rerun.stderr
        and "written for other params or inputs" in rerun.stderr
        and "continuing" not in rerun.stdout
    )
    assert len((out / "curve.csv").read_text().splitlines()) == 3


def test_the_store_on_the_device_trains_exactly_as_the_host_loader(
    params, presized_store, tmp_path, monkeypatch, mlflow_store, uninterrupted
):
    """train.store_on_device: true (on the CPU: the gather over the memory map) gives the host loader's metrics and
    weights, and records the store's copy time and device bytes."""
    raw = yaml.safe_load(params.read_text())
    raw["train"]["store_on_device"] = True
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "device-store"
    out.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.chdir(out)
    assert load_stage("train_frozen").main(stage_args(params, presized_store, out)) == 0
    written = json.loads((out / "metrics.json").read_text())
    assert written["store_device_bytes"] > 0 and written["store_copy_seconds"] >= 0
    metrics, weights = results(out)
    assert metrics == uninterrupted[0]
    assert all(torch.equal(weights[k], uninterrupted[1][k]) for k in weights)
