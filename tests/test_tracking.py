import sqlite3

import mlflow
import pytest
from conftest import ROOT, copy_store
from mlflow.tracking import MlflowClient

from petpipe import lineage
from petpipe.tracking.runs import stage_run
from petpipe.tracking.store import TrackingError, check_tracking, default_artifact_location, repo_root, tracking_uri


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


def test_dvc_is_recognised_however_it_was_started():
    assert lineage.is_dvc_command(["/venv/bin/dvc", "repro"]) and lineage.is_dvc_command(["python", "-m", "dvc", "exp", "run"])
    assert lineage.is_dvc_command(["/usr/bin/python3", "/venv/bin/dvc", "exp", "exec-run"])
    assert not lineage.is_dvc_command(["/bin/sh", "-c", "python stages/fetch.py --dataset data/dataset"])


def test_every_stage_process_of_one_dvc_process_gets_the_same_execution_key(tmp_path):
    """Two children of one `dvc` process (as stages are) share a key; another `dvc` process gets another."""
    import subprocess
    import sys

    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text(
        "import subprocess, sys\n"
        "code = 'from petpipe.lineage import execution_key; print(execution_key({}))'\n"
        "for _ in range(2):\n"
        "    subprocess.run(['/bin/sh', '-c', f'{sys.executable} -c \"{code}\"'], check=True)\n"
    )
    keys = [subprocess.run([sys.executable, str(fake_dvc)], capture_output=True, text=True, check=True).stdout.split() for _ in range(2)]
    assert keys[0][0] == keys[0][1] and keys[1][0] == keys[1][1] and keys[0][0] != keys[1][0]
    assert lineage.execution_key({"PETPIPE_EXECUTION": "mine"}) == "mine"


def test_upstream_params_follow_the_dvc_yaml_graph():
    stages = lineage.load_stages(ROOT / "dvc.yaml")
    assert lineage.upstream(stages, "presize") == ["fetch", "labels"]
    assert lineage.upstream(stages, "fetch") == []
    resolved = {"data.url": "u", "labels.rule": "folder", "presize.size": 64, "train_frozen.lr": 0.01, "finetune.epochs": 2, "report.top_losses": 9}
    assert lineage.lineage_params(stages, "presize", resolved) == {"data.url": "u", "labels.rule": "folder", "presize.size": 64}
    assert set(lineage.lineage_params(stages, "finetune", resolved)) == set(resolved) - {"report.top_losses"}


def test_digests_are_dvcs(tmp_path):
    """A file's MD5, a folder's ``<md5 of its listing>.dir``: what dvc.lock records (checked against dvc-data)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import localfs

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"\0\1")
    odb = HashFileDB(localfs, str(tmp_path / "odb"))
    _, _, obj = build(odb, str(tmp_path / "d"), localfs, "md5")
    assert lineage.dvc_digest(tmp_path / "d") == obj.hash_info.value
    assert lineage.dvc_digest(tmp_path / "d" / "a.txt") == "0cc175b9c0f1b6a831c399e269772661"
    assert lineage.dvc_digest(tmp_path / "missing") is None


def test_a_closed_port_fails_in_seconds_naming_the_uri_and_the_fix():
    import time

    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError) as err:
        check_tracking(uri)
    assert time.monotonic() - started < 10
    assert uri in str(err.value) and "unset MLFLOW_TRACKING_URI" in str(err.value) and "\n" not in str(err.value)


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
        rows = db.execute("SELECT run_uuid, name FROM runs ORDER BY start_time").fetchall()
    assert rows[1] == (run.run_id, "fetch") and rows[0][0] == run.parent_id and len(rows) == 2  # the execution's parent, then the stage
    assert (tmp_path / "mlartifacts").is_dir() and list((tmp_path / "mlartifacts").rglob("a.txt"))


def test_a_stop_during_the_store_writes_of_the_setup_ends_both_runs_killed(tmp_path, monkeypatch, mlflow_template):
    """SIGTERM right after the parent run is written: it waits for the setup's writes, then ends the
    stage before its body, with the parent and the stage run KILLED (none left RUNNING)."""
    import os
    import signal

    import petpipe.tracking.runs as tracking
    from petpipe.signals import stop_on_signals

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
    assert body == [] and len(rows) == 2 and rows[1][0] == "fetch" and {status for _, status in rows} == {"KILLED"}, rows
