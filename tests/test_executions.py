"""MLflow answers "which pipeline execution was better": the stage mains run in-process on tiny data,
twice with different params, against a real `mlflow server`; then parent/child runs, lineage, the
servable model in a fresh process and the replay of a journal (tests/test_executions_outage.py: fail-fast on an
unreachable server and an outage mid-stage)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import timm
import torch
import yaml
from conftest import (
    BIN,
    ROOT,
    make_tarball,
    write_folder_dataset,
)
from mlflow.tracking import MlflowClient
from test_stage_spec import load_stage

from petpipe.run.lineage import dvc_digest
from petpipe.tracking.replay import replay

pytestmark = pytest.mark.slow

PATHS = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"][0]["paths"]
ARGS = {  # the stage commands of dvc.yaml, without report (another module's concern)
    "fetch": {"dataset": "dataset"},
    "labels": {"dataset": "dataset", "out-dir": "labels", "metrics": "labels_metrics"},
    "presize": {
        "dataset": "dataset",
        "table-csv": "labels/table.csv",
        "classes-json": "labels/classes.json",
        "out-dir": "presized",
        "metrics": "presize_metrics",
    },
    "train_frozen": {
        "presized": "presized",
        "checkpoint": "stage1",
        "metrics": "train_frozen_metrics",
        "plot": "train_frozen_curve",
    },
    "lr_find": {
        "presized": "presized",
        "checkpoint": "stage1",
        "result": "lr_find_result",
        "plot": "lr_find_curve",
        "figure": "lr_find_figure",
    },
    "choose_lr": {"lr-find-result": "lr_find_result", "chosen": "chosen_lr"},
    "finetune": {
        "presized": "presized",
        "checkpoint": "stage1",
        "chosen-lr": "chosen_lr",
        "final": "final",
        "metrics": "finetune_metrics",
        "plot": "finetune_curve",
    },
}
TRACKED = ["fetch", "labels", "presize", "train_frozen", "lr_find", "finetune"]
REGISTERED = "petpipe-tiny"


def path_of(ref: str) -> str:
    name, _, rest = ref.partition("/")
    return PATHS[name] + (f"/{rest}" if rest else "")


def run_stage(stage: str, params: Path) -> int:
    args = {**ARGS[stage], "timing": f"timing/{stage}.json"}
    argv = ["--params", str(params)] + [a for flag, ref in args.items() for a in (f"--{flag}", path_of(ref))]
    return load_stage(stage).main(argv)


def write_lock(stages: list[str]) -> None:
    """What DVC would hold in dvc.lock after running ``stages`` (their outputs' digests)."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    lock = {"schema": "2.0", "stages": {}}
    for stage in stages:
        outs = [
            next(iter(o)) if isinstance(o, dict) else o
            for key in ("outs", "metrics")
            for o in pipeline[stage].get(key, [])
        ]
        outs = [re.sub(r"\$\{paths\.(\w+)\}", lambda m: PATHS[m.group(1)], o) for o in outs]
        lock["stages"][stage] = {"outs": [{"path": o, "md5": dvc_digest(Path(o))} for o in outs if Path(o).exists()]}
    Path("dvc.lock").write_text(yaml.safe_dump(lock))


@pytest.fixture(scope="module")
def executions(tmp_path_factory, mlflow_server):
    """Two executions: the whole pipeline, then (as DVC would) only the stages a train_frozen.pct_start change
    re-runs."""
    work = tmp_path_factory.mktemp("executions")
    archive = make_tarball(
        write_folder_dataset(work / "src", per_class=8, valid_per_class=3), work / "tiny.tgz", top="tiny"
    )
    params = yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())
    params.update(device="cpu")
    params["data"].update(url=archive.as_uri(), sha256=hashlib.sha256(archive.read_bytes()).hexdigest(), size=None)
    params["presize"]["size"] = 24
    params["train"].update(size=16, batch_size=12, num_workers=0)
    params["train_frozen"]["epochs"] = 1
    params["lr_find"].update(start_lr=1e-5, end_lr=10.0, num_it=30)
    params["finetune"].update(epochs=1)
    experiment = f"executions-{time.time_ns()}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
        for name in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
            patch.delenv(name, raising=False)
        first = work / "first.yaml"
        first.write_text(yaml.safe_dump(params))
        patch.setenv("PETPIPE_EXECUTION", "first")
        for stage in ARGS:
            assert run_stage(stage, first) == 0, stage
        write_lock(TRACKED)
        stage1_digest = dvc_digest(Path(PATHS["stage1"]))
        params["train_frozen"]["pct_start"] = 0.5
        params["mlflow"]["register_as"] = REGISTERED
        # The second execution fine-tunes a timm backbone from a weights file, normalised at mean = std = 0.5:
        # the logged models must apply that normalisation, not ImageNet's.
        (work / "weights").mkdir()
        torch.save(timm.create_model("resnet10t").state_dict(), work / "weights/resnet10t.pt")
        params["train"].update(
            arch="timm/resnet10t", weights="weights/resnet10t.pt", normalize=[[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
        )
        second = work / "second.yaml"
        second.write_text(yaml.safe_dump(params))
        patch.setenv("PETPIPE_EXECUTION", "second")
        for stage in ("train_frozen", "lr_find", "choose_lr", "finetune"):
            assert run_stage(stage, second) == 0, stage
        mlflow.set_tracking_uri(None)
    client = MlflowClient(mlflow_server)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    yield {"client": client, "experiment_id": experiment_id, "work": work, "stage1_first": stage1_digest}


def runs(ex, filter_string: str):
    return ex["client"].search_runs([ex["experiment_id"]], filter_string=filter_string, max_results=100)


def test_one_parent_per_execution_with_its_stages_as_children(executions):
    parents = {r.data.tags["petpipe.execution"]: r for r in runs(executions, "tags.`petpipe.kind` = 'pipeline'")}
    assert set(parents) == {"first", "second"}
    children = {
        key: sorted(r.info.run_name for r in runs(executions, f"tags.`mlflow.parentRunId` = '{p.info.run_id}'"))
        for key, p in parents.items()
    }
    assert children == {"first": sorted(TRACKED), "second": ["finetune", "lr_find", "train_frozen"]}
    first, second = parents["first"].data, parents["second"].data
    assert first.params["train_frozen.pct_start"] == "0.25" and second.params["train_frozen.pct_start"] == "0.5"
    assert {"seed", "data.url", "labels.rule", "presize.size", "finetune.epochs", "report.top_losses"} <= set(
        first.params
    )
    assert {"accuracy", "error_rate", "valid_loss", "train_frozen_seconds", "finetune_seconds"} <= set(second.metrics)
    # Each stage's fixed cost: on the parent, and in its --timing file (choose_lr has no run, only the file).
    for stage in TRACKED:
        fixed = {f"{stage}_{part}_seconds" for part in ("startup", "work", "teardown")}
        assert fixed <= set(first.metrics), stage
    timing = json.loads((executions["work"] / PATHS["timing"] / "finetune.json").read_text())
    assert set(timing) == {"startup_seconds", "work_seconds", "teardown_seconds", "phases"}
    # Where finetune's work went: the epochs and the model logging's parts (one epoch: no resume save; no register_as).
    assert {"epochs", "log_prepare", "log_network", "log_pyfunc", "digests", "other"} <= set(timing["phases"])
    assert sum(timing["phases"].values()) == pytest.approx(timing["work_seconds"], abs=0.02)
    assert 0 < timing["work_seconds"] < second.metrics["finetune_seconds"] and timing["teardown_seconds"] >= 0
    assert timing["work_seconds"] == pytest.approx(second.metrics["finetune_work_seconds"], abs=1e-3)
    assert (executions["work"] / PATHS["timing"] / "choose_lr.json").exists()
    # A stage this execution skipped is linked to the run that produced its current outputs.
    first_runs = {
        r.info.run_name: r.info.run_id
        for r in runs(executions, f"tags.`mlflow.parentRunId` = '{parents['first'].info.run_id}'")
    }
    assert (
        second.tags["petpipe.run.fetch"] == first_runs["fetch"]
        and second.tags["petpipe.run.presize"] == first_runs["presize"]
    )
    assert second.tags["petpipe.run.finetune"] != first_runs["finetune"]


def test_stage_runs_carry_lineage_params_inputs_and_metric_histories(executions):
    client = executions["client"]
    finetune = runs(executions, "tags.`petpipe.execution` = 'second' and attributes.run_name = 'finetune'")[0]
    params = finetune.data.params
    assert (
        params["labels.rule"] == "folder"
        and params["train_frozen.pct_start"] == "0.5"
        and params["finetune.epochs"] == "1"
        and "data.url" in params
    )
    assert "report.top_losses" not in params  # downstream of finetune
    tags = finetune.data.tags
    assert tags["petpipe.input.data/presized"].endswith(".dir") and tags[
        "petpipe.output.models/final.pt"
    ] == dvc_digest(executions["work"] / "models/final.pt")
    train_frozen = runs(executions, "tags.`petpipe.execution` = 'second' and attributes.run_name = 'train_frozen'")[0]
    assert tags["petpipe.upstream.models/stage1.pt"] == train_frozen.info.run_id
    assert "version.torch" in tags and [d.dataset.name for d in finetune.inputs.dataset_inputs] == ["presized"]
    assert [m.step for m in client.get_metric_history(train_frozen.info.run_id, "valid_loss")] == [1]
    lr_find = runs(executions, "tags.`petpipe.execution` = 'second' and attributes.run_name = 'lr_find'")[0]
    assert any(k.startswith("system/") for run in (train_frozen, lr_find, finetune) for k in run.data.metrics)
    assert len(client.get_metric_history(lr_find.info.run_id, "lr_find_loss")) == lr_find.data.metrics["iterations"]
    for run in runs(
        executions, "tags.`petpipe.stage` != ''"
    ):  # raw checkpoints stay in DVC: no .pt among the run's artifacts
        top = client.list_artifacts(run.info.run_id)
        paths = [a.path for a in top] + [
            b.path for a in top if a.is_dir for b in client.list_artifacts(run.info.run_id, a.path)
        ]
        assert not [p for p in paths if p.endswith(".pt")], paths


FRESH_PROCESS = """
import json, sys, mlflow, numpy as np, pandas as pd
path, network_uri, out = sys.argv[1:4]
classifier = mlflow.pyfunc.load_model("models:/{name}@candidate")
answer = classifier.predict(pd.DataFrame({{"image": [path, open(path, "rb").read()]}}))
example = mlflow.artifacts.download_artifacts("models:/{name}@candidate") + "/serving_input_example.json"
mlflow.models.predict("models:/{name}@candidate", input_path=example, content_type="json", output_path=out,
env_manager="local")
network = mlflow.pytorch.load_model(network_uri)
x = np.array(json.load(open(mlflow.artifacts.download_artifacts(network_uri) + "/input_example.json")),
dtype=np.float32)
import torch
print(json.dumps({{"rows": answer.to_dict(orient="records"), "logits": network(torch.from_numpy(x)).tolist(), "x":
x.tolist()}}))
"""


def test_the_final_model_is_logged_once_as_a_network_and_a_raw_image_classifier(executions, mlflow_server, monkeypatch):
    """Both logged models load in a fresh process: the registered pyfunc (alias candidate) predicts a
    known image from its path and its bytes and serves its own input example; the PyTorch model gives
    the checkpoint's logits."""
    import numpy as np
    import pandas as pd
    import torch

    from petpipe.compute.device import make_runtime
    from petpipe.data.loaders import make_loader
    from petpipe.data.normalization import Normalization
    from petpipe.data.presize import PresizedStore
    from petpipe.serve.classifier import ImageClassifier
    from petpipe.train.engine import predict

    client = executions["client"]
    finetune = runs(executions, "tags.`petpipe.execution` = 'second' and attributes.run_name = 'finetune'")[0]
    models = {client.get_logged_model(m.model_id).name: m.model_id for m in finetune.outputs.model_outputs}
    assert set(models) == {"model", "image_classifier"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the artifacts are served by the server
    location = client.get_logged_model(models["image_classifier"]).artifact_location
    pyfunc = yaml.safe_load(mlflow.artifacts.load_text(location + "/MLmodel"))["flavors"]["python_function"]
    files = {Path(a.path).name for a in mlflow.artifacts.list_artifacts(artifact_uri=location)}
    # A model from code: loading it runs the logged tracking/pyfunc.py (as pyfunc.py) and unpickles nothing.
    assert (
        pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
        and "pyfunc.py" in files
        and "python_model.pkl" not in files
    ), files
    candidate = client.get_model_version_by_alias(REGISTERED, "candidate")
    assert candidate.run_id == finetune.info.run_id and models["image_classifier"] in candidate.source, candidate
    first = runs(executions, "tags.`petpipe.execution` = 'first' and attributes.run_name = 'finetune'")[0]
    assert (
        len(first.outputs.model_outputs) == 2 and len(client.search_model_versions(f"name = '{REGISTERED}'")) == 1
    )  # first: not registered
    image = next((executions["work"] / PATHS["dataset"]).rglob("valid/red/*.png"))
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(executions["work"])}
    served = executions["work"] / "served.json"
    code = FRESH_PROCESS.format(name=REGISTERED)
    argv = [sys.executable, "-c", code, str(image), f"models:/{models['model']}", str(served)]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=executions["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    reference = ImageClassifier(
        executions["work"] / "models/final.pt", presize_size=24
    )  # the same checkpoint, here: the same answers
    expected = reference(pd.DataFrame({"image": [str(image)]}))
    assert [r["label"] for r in out["rows"]] == [expected["label"][0]] * 2 and 0 < out["rows"][0]["probability"] <= 1
    assert (
        len(json.loads(served.read_text())["predictions"]) == 2
    )  # the serving input example, through MLflow's scoring path
    with torch.inference_mode():
        logits = reference.model(torch.tensor(out["x"])).numpy()
    assert np.asarray(out["x"]).shape[1:] == (3, 16, 16)
    np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=1e-4, atol=1e-4)
    # The pyfunc of a model trained at mean = std = 0.5 gives the probabilities of engine.predict over the
    # validation loader, which normalises as training did.
    assert reference.uses_timm and reference.normalization == Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    store = PresizedStore(executions["work"] / PATHS["presized"])
    loader = make_loader(
        store,
        "valid",
        make_runtime("cpu", "fp32"),
        size=16,
        batch_size=64,
        num_workers=0,
        normalization=reference.normalization,
    )
    logits, _ = predict(reference.model, loader, make_runtime("cpu", "fp32"))
    position = [store.paths[int(i)] for i in loader.dataset.positions].index(
        image.relative_to(executions["work"] / PATHS["dataset"]).as_posix()
    )
    probability = torch.softmax(logits[position], 0).max().item()
    assert out["rows"][0]["probability"] == pytest.approx(probability, abs=1e-4) and out["rows"][1][
        "probability"
    ] == pytest.approx(probability, abs=1e-4)


def test_replay_logs_the_final_model_only_if_it_is_the_trained_one_and_registers_nothing(
    executions, mlflow_server, monkeypatch, capsys
):
    """A finetune journal (as an outage leaves it) is replayed: the model is logged from the journaled
    example if the checkpoint still has the trained digest, never registered; a changed checkpoint is not logged."""
    import base64

    from petpipe.data.presize import PresizedStore
    from petpipe.serve.classifier import example_input

    client, work = executions["client"], executions["work"]
    final = work / "models/final.pt"
    example = {
        "image": [base64.b64encode(b).decode() for b in example_input(PresizedStore(work / PATHS["presized"]))["image"]]
    }
    spec = {
        "checkpoint": str(final),
        "presize_size": 24,
        "example": example,
        "register_as": REGISTERED,
        "checkpoint_md5": dvc_digest(final),
    }
    pending = work / ".petpipe" / "pending"
    pending.mkdir(parents=True, exist_ok=True)
    journals = {}
    # The call as models.log_final_models journals it, and under its name before tracking was split (older journals).
    cases = (("trained", spec["checkpoint_md5"], "log_final_models"), ("changed", "0" * 32, "log_image_classifier"))
    for name, md5, call in cases:
        calls = [["log_params", [{"finetune.epochs": 1}]], [call, [{**spec, "checkpoint_md5": md5}]]]
        journals[name] = pending / f"finetune-{name}.json"
        journals[name].write_text(
            json.dumps({"stage": "finetune", "execution": f"replayed-{name}", "cwd": str(work), "calls": calls})
        )
    versions = len(client.search_model_versions(f"name = '{REGISTERED}'"))
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", client.get_experiment(executions["experiment_id"]).name)
    # replay sets the process's PETPIPE_EXECUTION (the journal's): set here, so monkeypatch removes it afterwards
    # (else the pipelines that later tests of this worker start would all be one execution, the last journal's).
    monkeypatch.setenv("PETPIPE_EXECUTION", "a later shell")
    try:
        replayed = {name: client.get_run(replay(path)) for name, path in journals.items()}
    finally:
        mlflow.set_tracking_uri(None)
    err = capsys.readouterr().err
    names = {client.get_logged_model(m.model_id).name for m in replayed["trained"].outputs.model_outputs}
    assert names == {"model", "image_classifier"} and not replayed["changed"].outputs.model_outputs
    assert "is not the checkpoint this run trained" in err and "not registered on replay" in err
    assert len(client.search_model_versions(f"name = '{REGISTERED}'")) == versions
