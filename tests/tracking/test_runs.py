"""petpipe.tracking.runs: stage runs under their execution's parent, against a real `mlflow server` and the default
sqlite store; a failing or stopped stage ends its runs."""

import sqlite3

import mlflow
import pytest
from conftest import copy_store
from mlflow.tracking import MlflowClient

from petpipe.tracking.runs import stage_run


@pytest.fixture
def server_env(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "petpipe-tests")
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lemur")
    yield mlflow_server
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_stage_run_logs_params_metrics_steps_and_artifacts_to_a_server(server_env, tmp_path):
    artifact = tmp_path / "curve.csv"
    artifact.write_text("epoch,valid_loss\n1,0.5\n")
    with stage_run("train_frozen", {"train.arch": "resnet18", "finetune.max_lr": [1e-3, 1e-2]}) as run:
        for epoch, loss in ((1, 0.9), (2, 0.5)):
            run.log_metrics({"valid_loss": loss}, step=epoch)
        run.log_artifact(artifact, "curves")
    client = MlflowClient(server_env)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "train_frozen"
    assert logged.data.params == {"train.arch": "resnet18", "finetune.max_lr": "[0.001, 0.01]"}
    assert logged.data.tags["petpipe.stage"] == "train_frozen" and logged.data.tags["dvc.exp_name"] == "brisk-lemur"
    history = client.get_metric_history(run.run_id, "valid_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.5)]
    assert [a.path for a in client.list_artifacts(run.run_id, "curves")] == ["curves/curve.csv"]
    assert client.get_experiment(logged.info.experiment_id).name == "petpipe-tests"


@pytest.mark.slow
def test_a_failing_stage_ends_its_run_as_failed(server_env):
    with pytest.raises(ZeroDivisionError):
        with stage_run("report", {}) as run:
            1 / 0  # noqa: B018 (the stage's failure)
    assert MlflowClient(server_env).get_run(run.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_default_sqlite_store_keeps_artifacts_beside_it(tmp_path, monkeypatch, mlflow_template):
    copy_store(mlflow_template, tmp_path / "mlflow.db")  # already migrated: saves ~15 s
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    try:
        with stage_run("fetch", {"data.url": "assets/digits.tgz"}) as run:
            run.log_artifact(artifact)
    finally:
        mlflow.set_tracking_uri(None)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set_tracking_uri exports it
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        rows = db.execute("SELECT run_uuid, name FROM runs ORDER BY start_time").fetchall()
    assert (
        rows[1] == (run.run_id, "fetch") and rows[0][0] == run.parent_id and len(rows) == 2
    )  # the execution's parent, then the stage
    assert (tmp_path / "mlartifacts").is_dir() and list((tmp_path / "mlartifacts").rglob("a.txt"))


def test_a_stop_during_the_store_writes_of_the_setup_ends_both_runs_killed(tmp_path, monkeypatch, mlflow_template):
    """SIGTERM right after the parent run is written: it waits for the setup's writes, then ends the
    stage before its body, with the parent and the stage run KILLED (none left RUNNING)."""
    import os
    import signal

    import petpipe.tracking.runs as tracking
    from petpipe.run.signals import stop_on_signals

    copy_store(mlflow_template, tmp_path / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    real_parent_run = tracking.parent_run

    def parent_run_then_sigterm(*args):
        run_id = real_parent_run(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))  # the handler runs here
        return run_id

    monkeypatch.setattr(tracking, "parent_run", parent_run_then_sigterm)
    body = []
    try:
        with stop_on_signals(), pytest.raises(KeyboardInterrupt, match="signal 15"):
            with stage_run("fetch", {"data.url": "assets/digits.tgz"}):
                body.append("ran")
    finally:
        mlflow.set_tracking_uri(None)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        rows = db.execute("SELECT name, status FROM runs ORDER BY start_time").fetchall()
    assert body == [] and len(rows) == 2 and rows[1][0] == "fetch" and {status for _, status in rows} == {"KILLED"}, (
        rows
    )
