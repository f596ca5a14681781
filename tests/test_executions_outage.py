"""A stage against an MLflow server that is not there: it fails fast when the server is unreachable at the start,
and keeps valid outputs and a replayable journal when the server stops mid-stage.

Apart from tests/test_executions.py (whose module fixture runs two whole executions) so that the two modules can run
on different pytest-xdist workers."""

from __future__ import annotations

import json
import time

import mlflow
import pytest
import yaml
from conftest import ROOT, copy_store, free_port, start_mlflow_server, stop_mlflow_server
from mlflow.tracking import MlflowClient
from test_stage_spec import load_stage

from petpipe.tracking.replay import replay

pytestmark = pytest.mark.slow


def test_an_unreachable_server_fails_fast_with_one_line(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "p.yaml").write_text((ROOT / "profiles/digits.yaml").read_text())
    started = time.monotonic()
    assert load_stage("fetch").main(["--params", "p.yaml", "--dataset", "dataset"]) == 2
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert elapsed < 20 and len(err.splitlines()) == 1, (elapsed, err)
    assert uri in err and "unset MLFLOW_TRACKING_URI" in err and not (tmp_path / "dataset").exists()


def test_a_server_stopped_mid_stage_leaves_valid_outputs_and_a_replayable_journal(
    tmp_path, monkeypatch, capsys, mlflow_template, presized_store
):
    import torch

    import petpipe.train.runner as training

    home = tmp_path / "server"
    home.mkdir()
    proc, url = start_mlflow_server(copy_store(mlflow_template, home / "mlflow.db").parent)
    real_fit = training.fit_one_cycle

    def fit_after_the_server_dies(*args, **kwargs):
        stop_mlflow_server(proc)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit_one_cycle", fit_after_the_server_dies)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("PETPIPE_EXECUTION", "outage")
    params = yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())
    params.update(device="cpu")
    params["train"].update(size=16, batch_size=12, num_workers=0)
    params["train_frozen"]["epochs"] = 1
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    argv = [
        "--params",
        "p.yaml",
        "--presized",
        str(presized_store),
        "--checkpoint",
        "stage1.pt",
        "--metrics",
        "m.json",
        "--plot",
        "c.csv",
    ]
    try:
        assert load_stage("train_frozen").main(argv) == 0
    finally:
        stop_mlflow_server(proc)
        mlflow.set_tracking_uri(None)
    assert set(torch.load(tmp_path / "stage1.pt", weights_only=True)) == {"model", "meta"}
    assert "accuracy" in json.loads((tmp_path / "m.json").read_text()) and (tmp_path / "c.csv").read_text().startswith(
        "epoch,"
    )
    err = capsys.readouterr().err
    pending = list((tmp_path / ".petpipe/pending").glob("train_frozen-*.json"))
    assert len(pending) == 1 and f"python -m petpipe.tracking.replay {pending[0]}" in err
    calls = [name for name, _ in json.loads(pending[0].read_text())["calls"]]
    assert "log_metrics" in calls and "log_artifact" in calls
    # The server is back: the documented command logs what the stage kept, as a run of the same execution.
    proc, url = start_mlflow_server(home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("PETPIPE_EXECUTION", "a later shell")  # replay takes the execution from the journal
    monkeypatch.chdir(home)  # replay works from anywhere: it goes to the journal's folder
    try:
        run_id = replay(pending[0])
        replayed = MlflowClient(url).get_run(run_id)
        history = MlflowClient(url).get_metric_history(run_id, "train_loss")
    finally:
        stop_mlflow_server(proc)
        mlflow.set_tracking_uri(None)
    assert (
        not pending[0].exists()
        and replayed.info.status == "FINISHED"
        and replayed.data.tags["petpipe.execution"] == "outage"
    )
    assert replayed.data.metrics["accuracy"] == json.loads((tmp_path / "m.json").read_text())["accuracy"]
    assert replayed.data.params["train_frozen.epochs"] == "1" and len(history) == 1
