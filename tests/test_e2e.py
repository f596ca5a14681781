"""The real pipeline, end to end: a copy of this project in a temporary git repository, a tiny
generated dataset, real `make repro PROFILE=...`, `dvc repro`, `dvc metrics show`, `dvc plots show`
and the default sqlite MLflow store. Experiments (`dvc exp run`, plain and queued) and a DVC remote:
tests/test_e2e_experiments.py, on a copy of the repository this module builds (tests/e2e_repo.py)."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e_repo import (
    BUILD_LOG,
    CONSUMER,
    STAGES,
    TRACKED,
    build,
    new_runs,
    pipeline_env,
    publish,
    publish_failure,
    ran_stages,
    run,
    runs_by_stage,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(request, tmp_path_factory, mlflow_template) -> Path:
    try:
        repo = build(tmp_path_factory.mktemp("e2e"), mlflow_template)
    except BaseException as error:  # test_e2e_experiments.py waits for the copy: tell it there will be none
        publish_failure(tmp_path_factory, error)
        raise
    if any(item.path.name == CONSUMER for item in request.session.items):
        publish(repo, tmp_path_factory, mlflow_template)
    return repo


def test_every_stage_writes_its_outputs(repo):
    for path in [
        "data/dataset/train/red/0.png",
        "data/labels/table.csv",
        "data/labels/classes.json",
        "data/labels/skipped.csv",
        "reports/summary.md",
        "reports/predictions.csv",
        "data/presized/images.jpg",
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
    jpegs = (repo / "data/presized/images.jpg").stat().st_size
    assert presize == {"n_images": 33, "n_skipped": 0, "bytes": jpegs, "decoded_bytes": 33 * 24 * 24 * 3}
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
    with sqlite3.connect(repo / "mlflow.db") as db:
        uris = [u for (u,) in db.execute("SELECT artifact_uri FROM runs")]
    assert uris and all(u.startswith((repo / "mlartifacts").resolve().as_uri()) for u in uris), uris
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
    """report/html.py (the page) is imported by the report stage alone: only it is out of date."""
    module, lock = repo / "src/petpipe/report/html.py", repo / "dvc.lock"
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


def test_speed_only_params_rerun_nothing(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["num_workers"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}
    finally:
        run(["git", "checkout", "params.yaml"], repo)


def test_unknown_profile_is_a_clear_make_error(repo):
    # -o: never (re)install into the test run's own environment from this copy (its pyproject.toml may be newer).
    make = ["make", "-o", f"{Path(sys.prefix)}/bin/.installed", "repro", "PROFILE=nope", f"VENV={Path(sys.prefix)}"]
    result = subprocess.run(make, cwd=repo, env=pipeline_env(), capture_output=True, text=True)
    assert (
        result.returncode != 0 and "no profile profiles/nope.yaml; have: digits.yaml" in result.stdout + result.stderr
    )


# Outputs that hold measured seconds or images/s (never reproducible, warm or cold): the others must be identical.
TIMED = {
    "plots/train_frozen.csv",
    "plots/finetune.csv",
    "metrics/train_frozen.json",
    "metrics/finetune.json",
    "reports/report.html",
}


def test_warm_and_cold_runs_give_the_same_outputs(repo):
    """The build ran the stages in warm processes (all but those that arrive before the server has imported: the
    first, maybe the second); a forced cold `dvc repro -f` gives the same digest for every output but the timed."""

    def outs(lock_text: str) -> dict[str, str]:
        stages = yaml.safe_load(lock_text)["stages"].values()
        return {o["path"]: o["md5"] for s in stages for o in s["outs"] if not o["path"].startswith("metrics/timing/")}

    built = (repo.parent / BUILD_LOG).read_text()
    assert built.count("timing (warm stage process):") >= len(STAGES) - 3, built[-3000:]
    warm = outs(run(["git", "show", "HEAD:dvc.lock"], repo).stdout)
    result = run(["dvc", "repro", "-f"], repo, PETPIPE_WARM="0")
    assert ran_stages(result) == STAGES and "petpipe.run.warm" not in result.stderr and "(warm" not in result.stdout
    cold = outs((repo / "dvc.lock").read_text())
    assert set(cold) == set(warm) and TIMED <= set(cold)
    assert {path: cold[path] for path in cold if path not in TIMED} == {p: warm[p] for p in warm if p not in TIMED}
