import sqlite3

import mlflow
import pytest
from conftest import copy_store
from mlflow.tracking import MlflowClient

from petpipe.tracking import default_artifact_location, repo_root, stage_run, tracking_uri


def test_repo_root_from_dvc_root_and_from_a_dvc_temp_workspace(tmp_path):
    assert repo_root({"DVC_ROOT": str(tmp_path)}) == tmp_path.resolve()
    workspace = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    assert repo_root({"DVC_ROOT": str(workspace)}) == (tmp_path / "repo").resolve()


def test_default_store_is_sqlite_at_the_repo_root_and_env_overrides(tmp_path):
    env = {"DVC_ROOT": str(tmp_path)}
    assert tracking_uri(env) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default_artifact_location(env) == (tmp_path.resolve() / "mlartifacts").as_uri()
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:5000"
    assert tracking_uri(env) == "http://127.0.0.1:5000" and default_artifact_location(env) is None


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
            1 / 0
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
        assert db.execute("SELECT run_uuid, name FROM runs").fetchall() == [(run.run_id, "fetch")]
    assert (tmp_path / "mlartifacts").is_dir() and list((tmp_path / "mlartifacts").rglob("a.txt"))
