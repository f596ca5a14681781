"""The real pipeline, end to end: a copy of this project in a temporary git repository, a tiny
generated dataset, real `dvc repro`, `dvc exp run` and the default sqlite MLflow store."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project, make_tarball, stage_env, write_folder_dataset

STAGES = ["fetch", "labels", "train_frozen", "lr_find", "finetune", "report"]


def tiny_params(repo: Path, archive: Path) -> dict:
    params = yaml.safe_load((ROOT / "profiles" / "digits.yaml").read_text())
    params["data"] = {"url": archive.relative_to(repo).as_posix(), "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    params["labels"]["csv"] = None
    params["train"].update(size=16, batch_size=12)
    params["train_frozen"]["epochs"] = 1
    params["lr_find"].update(start_lr=1e-5, end_lr=10.0, num_it=30)
    params["finetune"].update(epochs=1, max_lr="auto")
    params["report"]["top_losses"] = 4
    return params


def run(cmd: list[str], repo: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=repo, env=stage_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def runs_by_stage(repo: Path) -> dict[str, list[str]]:
    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute("SELECT name, status FROM runs ORDER BY start_time").fetchall()
    out: dict[str, list[str]] = {}
    for name, status in rows:
        out.setdefault(name, []).append(status)
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    repo = copy_project(tmp / "repo")
    archive = make_tarball(write_folder_dataset(tmp / "src", per_class=8, valid_per_class=3), repo / "assets" / "tiny.tgz", top="tiny")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(repo, archive), sort_keys=False))
    for path in (repo / "mlflow.db", repo / "mlartifacts"):
        assert not path.exists()
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny pipeline"], repo)
    run(["dvc", "repro"], repo)
    return repo


def test_every_stage_writes_its_outputs(repo):
    for path in ["data/dataset/train/red/0.png", "data/labels/table.csv", "data/labels/classes.json", "data/labels/skipped.csv",
                 "models/stage1.pt", "models/final.pt", "reports/lr_find.png", "reports/report.html",
                 "reports/interpretation/confusion.png", "reports/interpretation/top_losses.png",
                 "reports/interpretation/per_class.csv", "reports/interpretation/most_confused.csv",
                 "plots/train_frozen.csv", "plots/finetune.csv", "plots/lr_find.csv"]:  # fmt: skip
        assert (repo / path).is_file(), path
    assert json.loads((repo / "data/labels/classes.json").read_text()) == ["blue", "green", "red"]
    labels = json.loads((repo / "metrics/labels.json").read_text())
    assert labels == {"n_train": 24, "n_valid": 9, "n_classes": 3, "n_skipped": 0}
    for stage in ("train_frozen", "finetune"):
        metrics = json.loads((repo / f"metrics/{stage}.json").read_text())
        assert {"train_loss", "valid_loss", "accuracy", "error_rate"} <= set(metrics)
        assert 0.0 <= metrics["accuracy"] <= 1.0
    lr = json.loads((repo / "metrics/lr_find.json").read_text())
    finetune = json.loads((repo / "metrics/finetune.json").read_text())
    assert finetune["max_lr_hi"] == pytest.approx(lr["valley"]) and finetune["max_lr_lo"] == pytest.approx(lr["valley"] / 100)
    report = json.loads((repo / "metrics/report.json").read_text())
    assert report["accuracy"] == pytest.approx(finetune["accuracy"], abs=1e-6)  # same model, same validation set


def test_report_is_self_contained(repo):
    page = (repo / "reports/report.html").read_text()
    for heading in ("Confusion matrix", "Most confused", "Top 4 losses", "Per-class metrics", "Learning-rate finder", "Training curves"):
        assert heading in page
    assert page.count("data:image/png;base64,") == 4
    assert "http://" not in page and "https://" not in page and 'src="reports' not in page


def test_one_mlflow_run_per_stage_in_the_repo_sqlite_store(repo):
    assert runs_by_stage(repo) == {stage: ["FINISHED"] for stage in STAGES}
    with sqlite3.connect(repo / "mlflow.db") as db:
        params = dict(db.execute("SELECT p.key, p.value FROM params p JOIN runs r ON p.run_uuid = r.run_uuid WHERE r.name = 'train_frozen'"))
        steps = db.execute("SELECT m.step FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid WHERE r.name = 'train_frozen' AND m.key = 'valid_loss'").fetchall()
    assert params["train.arch"] == "resnet18" and params["train_frozen.epochs"] == "1" and "finetune.epochs" not in params
    assert steps == [(1,)]
    assert any((repo / "mlartifacts").rglob("report.html"))


def test_second_repro_has_nothing_to_do(repo):
    result = run(["dvc", "repro"], repo)
    assert "Running stage" not in result.stdout and "up to date" in result.stdout
    assert sum(len(v) for v in runs_by_stage(repo).values()) == len(STAGES)


def test_forced_rerun_reproduces_the_same_bytes(repo):
    def locked_outs(stage: str) -> dict[str, str]:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
        return {out["path"]: out["md5"] for out in lock["outs"]}

    before = locked_outs("train_frozen")
    run(["dvc", "repro", "-f", "-s", "train_frozen"], repo)
    assert locked_outs("train_frozen") == before  # same seed, same data: identical checkpoint and curves


def test_experiment_reruns_exactly_the_stages_that_read_the_param(repo):
    before = runs_by_stage(repo)
    result = run(["dvc", "exp", "run", "-n", "two-epochs", "-S", "finetune.epochs=2"], repo)
    ran = [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["finetune", "report"]
    runs = runs_by_stage(repo)
    assert {stage: len(runs[stage]) - len(before[stage]) for stage in STAGES} == {
        "fetch": 0, "labels": 0, "train_frozen": 0, "lr_find": 0, "finetune": 1, "report": 1}
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    names = {exp.get("name") for entry in shown for exp in entry.get("experiments") or []}
    assert "two-epochs" in names
    with sqlite3.connect(repo / "mlflow.db") as db:
        tags = db.execute("SELECT t.value FROM tags t JOIN runs r ON t.run_uuid = r.run_uuid WHERE r.name = 'finetune' AND t.key = 'dvc.exp_name'").fetchall()
    assert tags == [("two-epochs",)]


def test_bad_params_fail_before_work_with_a_clear_message(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["archh"] = params["train"].pop("arch")
    bad = repo / "bad-params.yaml"
    bad.write_text(yaml.safe_dump(params))
    result = subprocess.run(
        ["python", "stages/train_frozen.py", "--params", str(bad), "--dataset", "x", "--table-csv", "x", "--classes-json", "x",
         "--checkpoint", "/nonexistent/stage1.pt", "--metrics", "x", "--plot", "x"],
        cwd=repo, env=stage_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "error: " in result.stderr and "unknown key 'train.archh'" in result.stderr and "Traceback" not in result.stderr


def test_temp_workspace_experiments_log_to_the_repository_store(repo):
    before = runs_by_stage(repo)
    run(["dvc", "exp", "run", "--temp", "-n", "in-temp", "-S", "finetune.epochs=3"], repo)
    after = runs_by_stage(repo)
    assert len(after["finetune"]) == len(before["finetune"]) + 1 and len(after["report"]) == len(before["report"]) + 1
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    with sqlite3.connect(repo / "mlflow.db") as db:
        uris = [u for (u,) in db.execute("SELECT artifact_uri FROM runs WHERE name = 'finetune'")]
    assert all(u.startswith((repo / "mlartifacts").resolve().as_uri()) for u in uris), uris


def test_dataset_travels_through_a_dvc_remote(repo, tmp_path):
    """A second clone gets data/dataset from `dvc pull`, without the source archive."""
    run(["dvc", "remote", "add", "-f", "-d", "store", str(tmp_path / "remote")], repo)
    run(["dvc", "push", "fetch"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results and remote"], repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    (clone / "assets" / "tiny.tgz").unlink()  # the source is gone: only the remote can provide the data
    run(["dvc", "pull", "fetch"], clone)
    assert sorted(p.name for p in (clone / "data/dataset/train").iterdir()) == ["blue", "green", "red"]
    status = run(["dvc", "status", "fetch"], clone)
    assert "up to date" in status.stdout  # fetch would not run again on this machine
