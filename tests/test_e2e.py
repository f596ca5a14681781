"""The real pipeline, end to end: a copy of this project in a temporary git repository, a tiny
generated dataset, real `make repro PROFILE=...`, `dvc repro`, `dvc exp run` (plain and queued),
`dvc metrics show`, `dvc plots show` and the default sqlite MLflow store."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project, copy_store, make_tarball, stage_env, write_folder_dataset

pytestmark = pytest.mark.slow

STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
UNTRACKED = {"choose_lr"}  # bookkeeping stages without an MLflow run
TRACKED = [s for s in STAGES if s not in UNTRACKED]


def tiny_params(repo: Path, archive: Path) -> dict:
    params = yaml.safe_load((ROOT / "profiles" / "digits.yaml").read_text())
    params["data"].update(
        url=archive.relative_to(repo).as_posix(), sha256=hashlib.sha256(archive.read_bytes()).hexdigest(), size=None
    )
    params["presize"]["size"] = 24
    # A timm backbone with random weights (no network here), through every stage, the logged models and the report.
    params["train"].update(
        arch="timm/resnet10t", size=16, batch_size=12, num_workers=1
    )  # one worker process: the multi-process loader path
    params["train_frozen"]["epochs"] = 1
    params["lr_find"].update(start_lr=1e-5, end_lr=10.0, num_it=30)
    params["finetune"].update(epochs=1, max_lr="auto")
    params["report"]["top_losses"] = 4
    return params


def run(cmd: list[str], repo: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=repo, env=stage_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def ran_stages(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")]


def runs_by_stage(repo: Path) -> dict[str, int]:
    """Stage runs (tagged petpipe.stage) per stage; parent runs of whole executions are not counted."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute(
            "SELECT t.value, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'petpipe.stage'"
        ).fetchall()
    assert all(status == "FINISHED" for _, status in rows), rows
    out = dict.fromkeys(TRACKED, 0)
    for name, _ in rows:
        out[name] += 1
    return out


def new_runs(repo: Path, before: dict[str, int]) -> dict[str, int]:
    return {stage: n - before[stage] for stage, n in runs_by_stage(repo).items() if n != before[stage]}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlflow_template) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    repo = copy_project(tmp / "repo")
    archive = make_tarball(
        write_folder_dataset(tmp / "src", per_class=8, valid_per_class=3), repo / "assets" / "tiny.tgz", top="tiny"
    )
    (repo / "profiles" / "tiny.yaml").write_text(yaml.safe_dump(tiny_params(repo, archive), sort_keys=False))
    assert not (repo / "mlartifacts").exists()
    copy_store(mlflow_template, repo / "mlflow.db")  # an empty, migrated store: creating one costs ~15 s
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny pipeline"], repo)
    # The documented entry point, with this test run's environment as its venv.
    # -o: never (re)install into the test run's own environment from this temporary copy.
    result = run(
        ["make", "-o", f"{Path(sys.prefix)}/bin/.installed", "repro", "PROFILE=tiny", f"VENV={Path(sys.prefix)}"], repo
    )
    assert ran_stages(result) == STAGES
    assert (repo / "params.yaml").read_text() == (repo / "profiles/tiny.yaml").read_text()
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline results"], repo)  # experiments start from a committed dvc.lock
    return repo


def test_every_stage_writes_its_outputs(repo):
    for path in [
        "data/dataset/train/red/0.png",
        "data/labels/table.csv",
        "data/labels/classes.json",
        "data/labels/skipped.csv",
        "reports/summary.md",
        "reports/predictions.csv",
        "data/presized/pixels.u8",
        "data/presized/index.npy",
        "data/presized/store.json",
        "data/presized/skipped.csv",
        "models/stage1.pt",
        "models/final.pt",
        "reports/lr_find.png",
        "reports/report.html",
        "reports/interpretation/confusion.png",
        "reports/interpretation/top_losses.png",
        "reports/interpretation/per_class.csv",
        "reports/interpretation/most_confused.csv",
        "plots/train_frozen.csv",
        "plots/finetune.csv",
        "plots/lr_find.csv",
    ]:
        assert (repo / path).is_file(), path
    assert json.loads((repo / "data/labels/classes.json").read_text()) == ["blue", "green", "red"]
    labels = json.loads((repo / "metrics/labels.json").read_text())
    assert labels == {"n_train": 24, "n_valid": 9, "n_classes": 3, "n_skipped": 0}
    presize = json.loads((repo / "metrics/presize.json").read_text())
    assert presize == {"n_images": 33, "n_skipped": 0, "bytes": 33 * 24 * 24 * 3}
    for stage in ("train_frozen", "finetune"):
        metrics = json.loads((repo / f"metrics/{stage}.json").read_text())
        assert {"train_loss", "valid_loss", "accuracy", "error_rate", "epoch_seconds", "train_images_per_s"} <= set(
            metrics
        )
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["train_images_per_s"] > 0
        header = (repo / f"plots/{stage}.csv").read_text().splitlines()[0]
        assert header == "epoch,train_loss,valid_loss,accuracy,error_rate,epoch_seconds,train_images_per_s"
    lr = json.loads((repo / "metrics/lr_find.json").read_text())
    finetune = json.loads((repo / "metrics/finetune.json").read_text())
    assert finetune["max_lr_hi"] == pytest.approx(lr["valley"]) and finetune["max_lr_lo"] == pytest.approx(
        lr["valley"] / 100
    )
    report = json.loads((repo / "metrics/report.json").read_text())
    assert report["accuracy"] == pytest.approx(finetune["accuracy"], abs=1e-6)  # same model, same validation set


def test_report_is_self_contained(repo):
    page = (repo / "reports/report.html").read_text()
    for heading in (
        "Confusion matrix",
        "Most confused",
        "Top 4 losses",
        "Per-class metrics",
        "Learning-rate finder",
        "Training curves",
    ):
        assert heading in page
    assert page.count("data:image/png;base64,") == 7  # batch, class counts, curves, lr_find, confusion x2, top losses
    assert "http://" not in page and "https://" not in page and 'src="reports' not in page


def test_one_mlflow_run_per_tracked_stage_in_the_repo_sqlite_store(repo):
    with sqlite3.connect(repo / "mlflow.db") as db:
        names = sorted(n for (n,) in db.execute("SELECT t.value FROM tags t WHERE t.key = 'petpipe.stage'"))
        params = dict(
            db.execute(
                "SELECT p.key, p.value FROM params p JOIN runs r ON p.run_uuid = r.run_uuid WHERE r.name = "
                "'train_frozen'"
            )
        )
        steps = db.execute(
            "SELECT m.step FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid WHERE r.name = 'train_frozen' AND "
            "m.key = 'valid_loss'"
        ).fetchall()
    assert names == sorted(TRACKED)  # one run per tracked stage
    assert (
        params["train.arch"] == "timm/resnet10t"
        and params["train_frozen.epochs"] == "1"
        and "finetune.epochs" not in params
    )
    assert params["train.normalize"] == "auto"
    assert params["train_frozen.normalize"] == str(
        {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    )  # the values auto chose
    assert steps == [(1,)]
    assert any((repo / "mlartifacts").rglob("report.html"))
    logged = list(
        (repo / "mlartifacts").rglob("MLmodel")
    )  # the network and the raw-image pyfunc, each needing timm to load
    assert len(logged) == 2 and all("timm==" in (m.parent / "requirements.txt").read_text() for m in logged)


def test_second_repro_has_nothing_to_do_and_logs_nothing(repo):
    before = runs_by_stage(repo)
    result = run(["dvc", "repro"], repo)
    assert ran_stages(result) == [] and "up to date" in result.stdout
    assert new_runs(repo, before) == {}


def test_metrics_and_plots_show_read_the_outputs(repo):
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    files = next(iter(metrics.values()))["data"]
    assert {"metrics/labels.json", "metrics/finetune.json", "metrics/report.json", "metrics/lr_find.json"} <= set(files)
    assert files["metrics/labels.json"]["data"]["n_classes"] == 3
    out = repo / "dvc_plots"
    run(["dvc", "plots", "show", "-o", str(out)], repo)
    page = (out / "index.html").read_text()
    for title in ("Train and validation loss per epoch", "Validation accuracy per epoch", "LR range test"):
        assert title in page
    # The LR finder on a log-scale LR axis (.dvc/plots/log_x.json), the other curves on linear ones.
    spec = page[page.index("LR range test (smoothed loss vs learning rate, log scale)") :]
    assert re.search(r'"x":\s*\{[^{}]*"field":\s*"lr"[^{}]*"scale":\s*\{\s*"type":\s*"log"', spec), spec[:2000]


def test_forced_rerun_reproduces_the_same_bytes(repo):
    def locked_outs(stage: str) -> dict[str, str]:
        """The stage's outputs, but its timing (measured, never reproducible)."""
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
        return {out["path"]: out["md5"] for out in lock["outs"] if not out["path"].startswith("metrics/timing/")}

    def curves_without_timing() -> list[list[str]]:
        return [row.split(",")[:5] for row in (repo / "plots/train_frozen.csv").read_text().splitlines()]

    before, before_presized, curves = locked_outs("train_frozen"), locked_outs("presize"), curves_without_timing()
    run(["dvc", "repro", "-f", "-s", "presize"], repo)
    assert locked_outs("presize") == before_presized  # the store is byte-reproducible (its metrics hold no timing)
    run(["dvc", "repro", "-f", "-s", "train_frozen"], repo)
    # Same seed, same data: an identical checkpoint and curves (the throughput columns are measured, so they differ).
    assert (
        locked_outs("train_frozen")["models/stage1.pt"] == before["models/stage1.pt"]
        and curves_without_timing() == curves
    )
    # The report shows the measured timings, so it is out of date now; the model stages downstream are not.
    result = run(["dvc", "repro"], repo)
    assert ran_stages(result) == ["report"]


def test_editing_one_module_reruns_only_the_stages_that_import_it(repo):
    """report_html.py (the page) is imported by the report stage alone: only it is out of date."""
    module, lock = repo / "src/petpipe/report_html.py", repo / "dvc.lock"
    original, locked = module.read_text(), lock.read_text()
    module.write_text(original + "\n# an edit\n")
    try:
        status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
        assert list(status) == ["report"]
        module.write_text(original.replace("h1{margin-bottom:.2em}", "h1{margin-bottom:.3em}"))
        assert list(json.loads(run(["dvc", "status", "--json"], repo).stdout)) == ["report"]
        # The stage runs this checkout's module (not the installed petpipe, which is another copy).
        assert ran_stages(run(["dvc", "repro"], repo)) == ["report"]
        assert "h1{margin-bottom:.3em}" in (repo / "reports/report.html").read_text()
    finally:
        module.write_text(original)
        lock.write_text(locked)
        run(["dvc", "checkout", "report"], repo)  # the report from before the edit, from the cache
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}


def test_a_changed_weights_file_reruns_training(repo):
    """train.weights files live in weights/, a dependency of train_frozen: a new or changed file there re-runs it."""
    added = repo / "weights" / "resnet10t.pt"
    added.write_bytes(b"weights")
    try:
        assert list(json.loads(run(["dvc", "status", "--json"], repo).stdout)) == ["train_frozen"]
    finally:
        added.unlink()
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}


def test_editing_the_model_logging_or_the_replay_outdates_only_their_users(repo):
    """The tracking package is split so that model logging is finetune's code alone and replay no stage's."""
    for module, users in (("src/petpipe/tracking/models.py", ["finetune"]), ("src/petpipe/tracking/replay.py", [])):
        path = repo / module
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        try:
            assert sorted(json.loads(run(["dvc", "status", "--json"], repo).stdout)) == users, module
        finally:
            path.write_text(original)
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}


def test_experiment_reruns_exactly_the_stages_that_read_the_param(repo):
    before = runs_by_stage(repo)
    result = run(["dvc", "exp", "run", "-n", "two-epochs", "-S", "finetune.epochs=2"], repo)
    assert ran_stages(result) == ["finetune", "report"]
    assert new_runs(repo, before) == {"finetune": 1, "report": 1}
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    names = {exp.get("name") for entry in shown for exp in entry.get("experiments") or []}
    assert "two-epochs" in names
    with sqlite3.connect(repo / "mlflow.db") as db:
        tags = db.execute(
            "SELECT t.value FROM tags t JOIN runs r ON t.run_uuid = r.run_uuid WHERE r.name = 'finetune' AND t.key = "
            "'dvc.exp_name'"
        ).fetchall()
    assert tags == [("two-epochs",)]


def test_speed_only_params_rerun_nothing(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["num_workers"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}
    finally:
        run(["git", "checkout", "params.yaml"], repo)


def queue_status(repo: Path) -> dict[str, str]:
    """`dvc queue status` (a table: task, name, created, status) as {experiment name: status}."""
    lines = run(["dvc", "queue", "status"], repo).stdout.splitlines()
    rows = [line.split() for line in lines[1:] if line.strip() and not line.startswith("Worker status")]
    return {row[1]: row[-1] for row in rows if len(row) >= 3}


def wait_for_the_queue(repo: Path, timeout: float = 420) -> dict[str, str]:
    """Poll `dvc queue status` until nothing is queued or running (or ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        status = queue_status(repo)
        if not {"Queued", "Running"} & set(status.values()) or time.monotonic() > deadline:
            return status
        time.sleep(2)


def test_two_queued_experiments_side_by_side_are_two_executions_in_the_repository_store(repo):
    """`dvc queue start -j 2`: each experiment runs in its own temporary copy under .dvc/tmp, at the same
    time; each is one parent run with its own stage runs, all in the repo's store."""
    before = runs_by_stage(repo)
    with sqlite3.connect(repo / "mlflow.db") as db:
        old_parents = {
            r for (r,) in db.execute("SELECT run_uuid FROM tags WHERE key = 'petpipe.kind' AND value = 'pipeline'")
        }
    for name, epochs in (
        ("queued-a", 3),
        ("queued-b", 4),
    ):  # values no earlier test ran: DVC's run cache would restore those
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"finetune.epochs={epochs}"], repo)
    run(["dvc", "queue", "start", "-j", "2"], repo)
    status = wait_for_the_queue(repo)
    run(
        ["dvc", "queue", "stop", "--kill"], repo
    )  # nothing should be left running; after a timeout, nothing may outlive the test
    assert status == {"queued-a": "Success", "queued-b": "Success"}, status
    assert new_runs(repo, before) == {"finetune": 2, "report": 2}
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    with sqlite3.connect(repo / "mlflow.db") as db:
        parents = {
            run_id: (name, start, end)
            for run_id, name, start, end in db.execute(
                "SELECT r.run_uuid, r.name, r.start_time, r.end_time FROM runs r JOIN tags t ON t.run_uuid = "
                "r.run_uuid "
                "WHERE t.key = 'petpipe.kind' AND t.value = 'pipeline'"
            )
            if run_id not in old_parents
        }
        children = {
            parent: sorted(
                n
                for (n,) in db.execute(
                    "SELECT r.name FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                    "WHERE t.key = 'mlflow.parentRunId' AND t.value = ?",
                    (parent,),
                )
            )
            for parent in parents
        }
        uris = [u for (u,) in db.execute("SELECT artifact_uri FROM runs WHERE name = 'finetune'")]
    assert sorted(name for name, _, _ in parents.values()) == [
        "queued-a",
        "queued-b",
    ]  # the parent is named after the experiment
    assert list(children.values()) == [["finetune", "report"]] * 2
    (_, start_a, end_a), (_, start_b, end_b) = parents.values()
    assert start_a < end_b and start_b < end_a, "the two experiments did not run side by side"
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


def test_unknown_profile_is_a_clear_make_error(repo):
    # -o: never (re)install into the test run's own environment from this copy (its pyproject.toml may be newer).
    make = ["make", "-o", f"{Path(sys.prefix)}/bin/.installed", "repro", "PROFILE=nope", f"VENV={Path(sys.prefix)}"]
    result = subprocess.run(make, cwd=repo, env=stage_env(), capture_output=True, text=True)
    assert (
        result.returncode != 0 and "no profile profiles/nope.yaml; have: digits.yaml" in result.stdout + result.stderr
    )
