"""MLflow tracking: the only module that imports mlflow.

**Runs.** Every pipeline execution is one *parent* run in the experiment ``petpipe``
(``MLFLOW_EXPERIMENT_NAME`` overrides); each stage execution is a child run (tag
``mlflow.parentRunId``) named after the stage. What one execution is: ``petpipe.lineage``. The
parent is found by its ``petpipe.execution`` tag or created by the first stage of the execution,
and holds every resolved param (dotted keys), the headline metrics (accuracy, error rate, valid
loss, per-stage seconds), git commit / dirty state / DVC experiment tags, and one tag
``petpipe.run.<stage>`` per stage naming the run that produced that stage's current outputs -- for
a stage DVC skipped, the earlier run whose logged output digest equals the one in dvc.lock. A
``dvc repro`` with nothing to do starts no stage, so it creates no run at all.

**Lineage** on each stage run: its params and those of the stages upstream of it; the DVC digest
of every input and output (tags ``petpipe.input.<path>`` / ``petpipe.output.<path>``), the run that
produced each input (``petpipe.upstream.<path>``), and the dataset via ``mlflow.log_input``. Raw
checkpoints stay in DVC: MLflow gets their digest, never a copy. The final model is logged once,
as a PyTorch model and as a pyfunc model that takes raw images (``log_final_models``), and
optionally registered (``mlflow.register_as``, alias ``candidate``).

**Outages.** Before any work a stage checks that a tracking server answers (one line naming the
URI and the fix if not, within ``CHECK_SECONDS``). HTTP retries are bounded (``HTTP_DEFAULTS``).
If the server stops answering later, logging goes offline: the stage finishes, writes its outputs
and exits 0, and everything it would have logged is kept in ``.petpipe/pending/<stage>-*.json`` at
the repo root; ``python -m petpipe.tracking replay FILE`` logs it later.

**Store.** The default store is ``sqlite:///<repo root>/mlflow.db`` with artifacts in
``<repo root>/mlartifacts``; ``MLFLOW_TRACKING_URI`` points it elsewhere (a server). The repo root
is ``DVC_ROOT`` (set by DVC for stage commands) and, when DVC runs the stage in a temporary
experiment workspace under ``.dvc/tmp/exps``, the repository that workspace belongs to.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd  # imported by mlflow anyway
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from petpipe import lineage
from petpipe.errors import PetpipeError
from petpipe.signals import deferred_stop

EXPERIMENT = "petpipe"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
PENDING_DIR = Path(".petpipe") / "pending"
MAX_PARAM_CHARS = 6000  # MLflow 3 limit on a param value
BATCH_PARAMS, BATCH_METRICS = 100, 1000  # MLflow's limits per log_batch request
CHECK_SECONDS = 15.0  # how long a tracking server may take to answer before a stage refuses to start
REFUSED_SECONDS = 3.0  # nobody listening on the port: a server that is restarting gets this long
# MLflow's defaults retry a dead server for ~4 minutes (7 retries, backoff 2, 120 s timeout); bounded here.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# The MLflow 3 UI opens an experiment on its GenAI pages unless it is marked as model training.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
HEADLINE_METRICS = ("accuracy", "error_rate", "valid_loss", "top_5_accuracy")  # on the parent run, from finetune and report


class TrackingError(PetpipeError):
    """The tracking store cannot be used; the message names the URI and the fix."""


def repo_root(env: dict[str, str] | None = None) -> Path:
    """The repository the results belong to, even from a DVC temp/queue workspace."""
    env = os.environ if env is None else env
    root = Path(env.get("DVC_ROOT") or os.getcwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root(env) / STORE_FILE}"


def default_artifact_location(env: dict[str, str] | None = None) -> str | None:
    """Artifacts of the default store go beside mlflow.db; a configured server decides its own."""
    env = os.environ if env is None else env
    return None if env.get("MLFLOW_TRACKING_URI") else (repo_root(env) / ARTIFACTS_DIR).as_uri()


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Experiment id for ``name``, created on first use (marked as model training for the UI)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
    if experiment.tags.get("mlflow.experimentKind") is None:
        for key, value in EXPERIMENT_TAGS.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


# ---------------------------------------------------------------------------------------------
# Is anybody there?


def _probe(uri: str, timeout: float) -> str | None:
    """None when the server at ``uri`` answers /health, else why not."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (OSError, ValueError) as err:
        return str(getattr(err, "reason", None) or err)


_ANSWERED: set[str] = set()  # tracking URIs that answered in this process


def check_tracking(uri: str, seconds: float = CHECK_SECONDS) -> None:
    """Raise TrackingError (one line: the URI, what happened, the fix) unless a tracking server answers.

    Local stores (sqlite, files) need no check. A refused connection is retried for
    ``REFUSED_SECONDS`` (a restarting server), anything else (a timeout, an error page) up to ``seconds``.
    """
    if not uri.startswith(("http://", "https://")) or uri in _ANSWERED:
        return
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        why = _probe(uri, timeout=max(0.5, min(5.0, seconds - elapsed)))
        if why is None:
            _ANSWERED.add(uri)  # preflight and stage_run both check: probe once per process
            return
        elapsed = time.monotonic() - started
        if elapsed >= (REFUSED_SECONDS if "refused" in why.lower() else seconds):
            break
        time.sleep(0.5)
    local = f"sqlite:///{repo_root() / STORE_FILE}"
    raise TrackingError(
        f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) did not answer within {elapsed:.0f} s ({why}); nothing was run. "
        f"Start it (e.g. `mlflow server --host 127.0.0.1 --port {uri.rsplit(':', 1)[-1].strip('/') or 5000}`) "
        f"or `unset MLFLOW_TRACKING_URI` to log to the local store {local}"
    )


def preflight() -> None:
    """``check_tracking`` of the configured URI: call it first thing in a stage, before any work."""
    check_tracking(tracking_uri())


# ---------------------------------------------------------------------------------------------
# Tags


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=os.getcwd())
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def execution_tags(key: str) -> dict[str, str]:
    """Tags of a parent run: the execution key, DVC experiment, git commit and dirty state."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else ""
    tags = {
        "petpipe.execution": key,
        "petpipe.kind": "pipeline",
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "git.dirty": ("true" if dirty else "false") if commit else "",
    }
    return {k: v for k, v in tags.items() if v}


def run_tags(stage: str) -> dict[str, str]:
    """Tags that tie a stage run to its stage and DVC experiment (empty values are dropped)."""
    tags = {
        "petpipe.stage": stage,
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }
    return {k: v for k, v in tags.items() if v}


def version_tags() -> dict[str, str]:
    """torch / torchvision / CUDA versions and the GPU, without importing torch into a stage that does not use it."""
    tags = {}
    for package in ("torch", "torchvision", "mlflow"):
        try:
            tags[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        tags["version.cuda"] = str(torch.version.cuda or "none")
        if torch.cuda.is_available():
            tags["gpu"] = torch.cuda.get_device_name(0)
    return tags


def _as_param(value: Any) -> str:
    return str(list(value) if isinstance(value, tuple) else value)[:MAX_PARAM_CHARS]


def _quote(key: str) -> str:
    return f"tags.`{key}`"


# ---------------------------------------------------------------------------------------------
# The stage run


class StageRun:
    """The handle a stage logs through; thin so that library code never sees mlflow.

    Every call is journaled; when the server stops answering the handle goes offline (the stage
    goes on) and the journal is written for ``replay`` at the end.
    """

    def __init__(self, run_id: str, *, stage: str, parent_id: str, client: MlflowClient, uri: str, key: str, experiment_id: str):
        self.run_id, self.stage, self.parent_id, self.client, self.uri, self.key = run_id, stage, parent_id, client, uri, key
        self.experiment_id = experiment_id
        self.journal: list[tuple[str, list[Any]]] = []
        self.offline: str | None = None

    def _do(self, name: str, args: list[Any], call) -> None:
        self.journal.append((name, args))
        if self.offline:
            return
        try:
            with deferred_stop():  # no stop signal in the middle of a store write
                call()
        except Exception as err:  # logging must never cost the stage its outputs
            why = _probe(self.uri, timeout=3.0) if self.uri.startswith(("http://", "https://")) else "local store"
            if why is None or why == "local store":
                raise  # the server answers: a real error, not an outage
            self.offline = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else why}"
            print(f"warning: MLflow at {self.uri} stopped answering ({why}); {self.stage} goes on and keeps what it would log", file=sys.stderr)

    def log_params(self, params: dict[str, Any]) -> None:
        params = {k: _as_param(v) for k, v in params.items()}
        items = list(params.items())

        def call() -> None:
            for i in range(0, len(items), BATCH_PARAMS):
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + BATCH_PARAMS]], synchronous=True)

        self._do("log_params", [params], call)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in metrics.items()]
        self._do("log_metrics", [metrics, step], lambda: self.client.log_batch(self.run_id, metrics=batch, synchronous=True))

    def log_series(self, series: dict[str, list[float]]) -> None:
        """Per-step values (step = position), sent in batches rather than one request per point."""
        series = {k: [float(v) for v in values] for k, values in series.items()}
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, values in series.items() for step, v in enumerate(values)]

        def call() -> None:
            for i in range(0, len(metrics), BATCH_METRICS):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH_METRICS], synchronous=True)

        self._do("log_series", [series], call)

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Metrics of the whole execution, on the parent run (the row the runs table compares)."""
        metrics = {k: float(v) for k, v in metrics.items()}
        now = int(time.time() * 1000)
        self._do("log_summary", [metrics], lambda: self.client.log_batch(self.parent_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()]))

    def log_headline(self, metrics: dict[str, float]) -> None:
        """The execution's headline numbers (``HEADLINE_METRICS`` found in ``metrics``) on the parent run."""
        self.log_summary({k: metrics[k] for k in HEADLINE_METRICS if k in metrics})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._do("log_artifact", [str(path), artifact_path], lambda: self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        tags = {k: str(v) for k, v in tags.items()}
        self._do("set_tags", [tags], lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]))

    def log_image_classifier(self, checkpoint: Path, *, presize_size: int, example: Any, register_as: str | None = None) -> None:
        """The final model, once, as two MLflow models (see ``log_final_models``); registered as ``register_as`` if given."""
        frame = {"image": [base64.b64encode(b).decode() if isinstance(b, bytes) else b for b in example["image"]]}  # JSON for the journal
        args = {"checkpoint": str(Path(checkpoint).resolve()), "presize_size": int(presize_size), "example": frame, "register_as": register_as}
        digest = {"checkpoint_md5": lineage.dvc_digest(Path(checkpoint))}  # replay logs this very file, or nothing
        self._do("log_image_classifier", [{**args, **digest}], lambda: log_final_models(self.run_id, **args))

    def log_input_files(self, inputs: dict[str, Path], dataset: Path | None) -> None:
        """Digests of the input files, the runs that produced them, and ``dataset`` as an MLflow dataset input."""
        locked = lineage.locked_digests(Path(lineage.LOCK_FILE)) if os.environ.get("DVC_STAGE") else {}
        digests = {str(p): _digest(p, locked) for p in inputs.values()}
        tags = {f"petpipe.input.{path}": d for path, d in digests.items() if d}
        if not self.offline:
            for path, digest in digests.items():
                producer = digest and find_producer(self.client, self.experiment_id, path, digest)
                if producer:
                    tags[f"petpipe.upstream.{path}"] = producer
        self.set_tags(tags)
        if dataset is not None and digests.get(str(dataset)):
            self.log_dataset(dataset, digests[str(dataset)])

    def log_dataset(self, path: Path, digest: str) -> None:
        self._do("log_dataset", [str(path), digest], lambda: _log_dataset(self.run_id, path, digest))

    def log_outputs(self, outputs: dict[str, Path]) -> dict[str, str]:
        """DVC digests of the outputs (returned too), so a later execution that skips this stage can find this run."""
        digests = {str(p): d for p in outputs.values() if (d := lineage.dvc_digest(Path(p)))}
        self.set_tags({f"petpipe.output.{p}": d for p, d in digests.items()})
        return digests


def _digest(path: Path, locked: dict[str, str]) -> str | None:
    """DVC's digest of ``path``: from ``locked`` (dvc.lock, which DVC writes for each stage before
    starting the next, when it runs this stage), else computed."""
    return locked.get(Path(path).as_posix()) or lineage.dvc_digest(Path(path))


def find_producer(client: MlflowClient, experiment_id: str, path: str, digest: str) -> str | None:
    """The latest run that logged ``digest`` as its output ``path`` (None if none, or the search fails)."""
    try:
        found = client.search_runs([experiment_id], filter_string=f"{_quote('petpipe.output.' + path)} = '{digest}'", max_results=1,
                                   order_by=["attributes.start_time DESC"])  # fmt: skip
    except Exception:
        return None
    return found[0].info.run_id if found else None


def _log_dataset(run_id: str, path: Path, digest: str) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers the local source twice (schemes "" and file): same class, same result
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(Path(path).resolve()))
    dataset = MetaDataset(source, name=Path(path).name, digest=digest[:36])
    MlflowClient().log_inputs(run_id, datasets=[_dataset_input(dataset)])


def _dataset_input(dataset: Any) -> Any:
    from mlflow.entities import DatasetInput, InputTag

    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "input")])


# ---------------------------------------------------------------------------------------------
# The model


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc adapter around a predictor factory named ``module:function`` (``petpipe.serving:load_classifier``).

    The factory is named rather than imported so that this module, which every stage imports, does
    not pull torch code into the dependencies of fetch and labels (dvc.yaml deps are the imports).
    """

    def __init__(self, factory: str):
        self.factory = factory

    def load_context(self, context) -> None:
        self._predict = load_factory(self.factory)(Path(context.artifacts["checkpoint"]), **context.model_config)

    # A DataFrame hint: MLflow converts nothing and infers no schema from it (the signature is given
    # when logging), and it does not warn, at every import of this module, that hints are missing.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self._predict(model_input)


def load_factory(spec: str) -> Any:
    """The callable named ``module:function``."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


SERVING_FACTORY = "petpipe.serving:load_classifier"
CANDIDATE_ALIAS = "candidate"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # the pyfunc, logged as a model from code


def set_model(model: ImageClassifierModel) -> None:
    """The model a "model from code" file defines (``PYFUNC_CODE`` calls it, so mlflow stays imported here only)."""
    import mlflow.models

    mlflow.models.set_model(model)


def log_final_models(run_id: str, checkpoint: str, presize_size: int, example: dict[str, list[Any]], register_as: str | None) -> None:
    """Log the final model on the active run ``run_id``, twice (two views of one checkpoint):

    - ``model``: the network, ``mlflow.pytorch.log_model`` (torch.export format), float32 NCHW at the
      training size, normalised with the mean/std training used (in the metadata) -> logits; signature and input example.
    - ``image_classifier``: a pyfunc taking raw images, a DataFrame column ``image`` of file paths or
      encoded bytes -> ``label``, ``probability``; this is the one registered as ``register_as``
      (alias ``candidate``), the one ``mlflow models serve`` can serve.

    Both carry the class names and the preprocessing in their metadata.
    """
    if mlflow.active_run() is None or mlflow.active_run().info.run_id != run_id:
        raise TrackingError(f"log_final_models: run {run_id} is not the active run")
    classifier = load_factory(SERVING_FACTORY)(Path(checkpoint), presize_size=presize_size)
    frame = pd.DataFrame(example)
    metadata = {
        "classes": list(classifier.classes), "size": classifier.size, "presize_size": int(presize_size),
        "normalize": classifier.normalization.as_dict(),
        "preprocessing": f"decode, EXIF-rotate, RGB; shorter side {presize_size} px; centre square; bilinear to {classifier.size} px; "
                         f"scale to [0, 1]; normalise with {classifier.normalization.describe()}",
    }  # fmt: skip
    requirements = _requirements(timm=classifier.uses_timm)
    _log_torch_model(classifier.model, classifier.inputs(list(frame["image"])).numpy(), len(classifier.classes), metadata, requirements)
    info = _log_pyfunc_classifier(Path(checkpoint), int(presize_size), frame, metadata, requirements)
    if register_as:
        try:
            register_model(info.model_uri, register_as, run_id)
        except Exception as err:  # the registry is optional: the stage's outputs and logged models stand
            why = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            MlflowClient().set_tag(run_id, "petpipe.registration_error", why)
            print(f"warning: registering the final model as {register_as!r} failed ({why}); the model is logged as {info.model_uri}: "
                  f"register it from the MLflow UI or with mlflow.register_model('{info.model_uri}', '{register_as}')", file=sys.stderr)  # fmt: skip


def _requirements(timm: bool) -> list[str]:
    """What loading the logged models needs; timm (and its safetensors) only for timm backbones."""
    packages = ("mlflow", "torch", "torchvision", "pillow", "pandas", "numpy", "pydantic", "pyyaml") + (("timm", "safetensors") if timm else ())
    return [f"{p}=={importlib.metadata.version(p)}" for p in packages]


def _log_torch_model(network: Any, example: Any, n_classes: int, metadata: dict[str, Any], requirements: list[str]) -> Any:
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes))]),
    )
    logged = dict(name="model", signature=signature, input_example=example, pip_requirements=requirements, metadata=metadata)
    try:
        return mlflow.pytorch.log_model(network, serialization_format="pt2", **logged)
    except Exception as err:
        if not type(err).__module__.startswith("torch"):
            raise
        # torch.export cannot trace every network; the pickle format loads the same module (unpickling runs code: trust the source).
        print(f"warning: torch.export failed ({type(err).__name__}); the network is logged in MLflow's pickle format instead", file=sys.stderr)
        return mlflow.pytorch.log_model(network, serialization_format="pickle", **logged)


def _log_pyfunc_classifier(checkpoint: Path, presize_size: int, example: Any, metadata: dict[str, Any], requirements: list[str]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "image")]), outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")])
    )
    return mlflow.pyfunc.log_model(  # links the logged model to the active run, the stage's
        name="image_classifier", python_model=str(PYFUNC_CODE), artifacts={"checkpoint": str(checkpoint)},
        model_config={"presize_size": presize_size}, code_paths=[str(Path(__file__).resolve().parent)], signature=signature,
        input_example=example, pip_requirements=requirements, metadata=metadata,
    )  # fmt: skip


def register_model(model_uri: str, name: str, run_id: str) -> str:
    """Register ``model_uri`` as a new version of ``name`` and point the alias ``candidate`` at it; returns the version."""
    version = mlflow.register_model(model_uri, name, tags={"petpipe.run": run_id}).version
    MlflowClient().set_registered_model_alias(name, CANDIDATE_ALIAS, version)
    print(f"registered the final model as {name} version {version} (alias {CANDIDATE_ALIAS}: models:/{name}@{CANDIDATE_ALIAS})")
    return str(version)


# ---------------------------------------------------------------------------------------------
# Execution (parent) runs


def parent_run(client: MlflowClient, experiment_id: str, key: str, resolved: dict[str, Any]) -> str:
    """The parent run of execution ``key``: found by its tag and reopened, or created with every resolved param."""
    query = f"{_quote('petpipe.execution')} = '{key}' and {_quote('petpipe.kind')} = 'pipeline'"  # stage runs carry the key too
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = execution_tags(key)
    name = tags.get("dvc.exp_name") or f"repro@{tags.get('git.commit', 'nogit')[:7]}{'+dirty' if tags.get('git.dirty') == 'true' else ''}"
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    items = [Param(k, _as_param(v)) for k, v in resolved.items()]
    for i in range(0, len(items), BATCH_PARAMS):
        client.log_batch(run.info.run_id, params=items[i : i + BATCH_PARAMS])
    return run.info.run_id


def link_skipped_stages(client: MlflowClient, experiment_id: str, parent_id: str, stages: dict[str, dict[str, list[str]]]) -> None:
    """``petpipe.run.<stage>`` on the parent for stages not run yet in this execution: the run whose
    logged output digest equals the one dvc.lock holds now (so skipped stages are linked too)."""
    have = client.get_run(parent_id).data.tags
    locked = lineage.locked_digests(Path(lineage.LOCK_FILE))
    for name, spec in stages.items():
        if f"petpipe.run.{name}" in have:
            continue
        for out in spec["outs"]:
            if out in locked:
                producer = find_producer(client, experiment_id, out, locked[out])
                if producer:
                    client.set_tag(parent_id, f"petpipe.run.{name}", producer)
                break


@contextmanager
def stage_run(
    stage: str, params: dict[str, Any], *, resolved: dict[str, Any] | None = None, inputs: dict[str, Path] | None = None,
    dataset: Path | None = None, outputs: dict[str, Path] | None = None, system_metrics: bool = False,
) -> Iterator[StageRun]:  # fmt: skip
    """One MLflow child run for one stage execution, under its execution's parent; ended (FAILED on error) whatever happens.

    ``params``: the keys the stage reads; ``resolved``: every flattened param (the parent's, and the
    source of the upstream params logged as lineage); ``inputs`` / ``outputs``: files whose DVC
    digests are recorded (outputs once the body has written them); ``dataset``: the input logged
    with ``mlflow.log_input``. The tracking server is checked first: no work starts without it.
    """
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    uri, location = tracking_uri(), default_artifact_location()  # before set_tracking_uri exports the env var
    check_tracking(uri)
    mlflow.set_tracking_uri(uri)
    key = lineage.execution_key()
    resolved = resolved if resolved is not None else dict(params)
    pipeline = lineage.find_pipeline([Path.cwd(), repo_root(), Path(__file__).resolve().parents[2]])
    stages = lineage.load_stages(pipeline) if pipeline else {}
    handle, started, status = None, time.monotonic(), "FAILED"
    try:
        with deferred_stop():  # store reads and writes: a stop waits for them, then ends the runs KILLED below
            client = MlflowClient(uri)
            experiment_id = ensure_experiment(client, os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT), location)
            parent_id = parent_run(client, experiment_id, key, resolved)
            tags = {**run_tags(stage), "petpipe.execution": key, "mlflow.parentRunId": parent_id, **version_tags()}
            run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags, log_system_metrics=system_metrics or None)
            handle = StageRun(run.info.run_id, stage=stage, parent_id=parent_id, client=client, uri=uri, key=key, experiment_id=experiment_id)
            client.set_tag(parent_id, f"petpipe.run.{stage}", run.info.run_id)
            handle.log_params({**lineage.lineage_params(stages, stage, resolved), **params})
            if inputs:
                handle.log_input_files(inputs, dataset)
            if stages and not handle.offline:
                link_skipped_stages(client, experiment_id, parent_id, stages)
        yield handle
        if outputs:
            digests = handle.log_outputs(outputs)
            if dataset is not None and not inputs:  # fetch: its output is the dataset (hashed once, above)
                handle.log_dataset(dataset, digests.get(str(dataset), ""))
        handle.log_summary({f"{stage}_seconds": time.monotonic() - started})
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (the stage turns it into KeyboardInterrupt)
        status = "KILLED"
        raise
    finally:
        if handle is not None:  # else the setup failed before the stage run existed
            _finish(handle, status)


def _finish(handle: StageRun, status: str) -> None:
    """End the stage run and mark the parent with the same status; offline, keep the journal for ``replay``."""
    with deferred_stop():  # a run ended half-way would stay RUNNING, the store possibly locked
        _end_runs(handle, status)


def _end_runs(handle: StageRun, status: str) -> None:
    if not handle.offline:
        try:
            handle.client.set_terminated(handle.parent_id, status)
            mlflow.end_run(status=status)
            return
        except Exception as err:
            handle.offline = f"{type(err).__name__}: {err}"
    with contextlib.suppress(Exception):
        mlflow.end_run(status=status)  # pops the active run first; the server call may fail
    if status == "FINISHED":
        pending = write_pending(handle)
        print(f"warning: MLflow at {handle.uri} did not answer ({handle.offline}); the outputs of {handle.stage} are written and valid, "
              f"and what it logged is kept in {pending}: log it later with `python -m petpipe.tracking replay {pending}`", file=sys.stderr)  # fmt: skip


def write_pending(handle: StageRun) -> Path:
    path = repo_root() / PENDING_DIR / f"{handle.stage}-{time.strftime('%Y%m%d-%H%M%S')}-{handle.run_id[:8]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": handle.stage, "execution": handle.key, "cwd": os.getcwd(), "calls": handle.journal}
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def replay(pending: Path) -> str:
    """Log a pending journal (written during an outage) as a new run of its stage, under its execution's parent.

    The journal's paths are relative to the stage's working directory: if that folder is gone (a DVC
    temp or queue workspace), nothing is replayed. The final model is logged only if the checkpoint
    is still the one trained (its DVC digest), and is not registered: registering an old run could
    move the alias ``candidate`` away from a newer model.
    """
    pending = Path(pending).resolve()
    record = json.loads(pending.read_text())
    if not Path(record["cwd"]).is_dir():
        raise TrackingError(f"{pending}: the stage ran in {record['cwd']}, which no longer exists (a DVC temp or queue workspace?): "
                            "its files are gone, nothing was replayed")  # fmt: skip
    os.chdir(record["cwd"])
    os.environ[lineage.EXECUTION_ENV] = record["execution"]
    calls = record["calls"]
    params = next((args[0] for name, args in calls if name == "log_params"), {})
    with stage_run(record["stage"], params) as run:
        run.set_tags({"petpipe.replayed_from": str(pending)})
        for name, args in calls[1:] if calls and calls[0][0] == "log_params" else calls:
            if name == "log_image_classifier":
                replay_final_model(run, args[0])
            elif name == "log_dataset":
                run.log_dataset(Path(args[0]), args[1])
            else:
                getattr(run, name)(*args)
    Path(pending).unlink()
    return run.run_id


def replay_final_model(run: StageRun, spec: dict[str, Any]) -> None:
    checkpoint = Path(spec["checkpoint"])
    if "example" not in spec or lineage.dvc_digest(checkpoint) != spec.get("checkpoint_md5"):
        print(f"warning: {checkpoint} is not the checkpoint this run trained (missing, or changed since): the final model is not logged; "
              "run the finetune stage again to log it", file=sys.stderr)  # fmt: skip
        return
    run.log_image_classifier(checkpoint, presize_size=spec["presize_size"], example=spec["example"])
    if spec.get("register_as"):
        print(f"not registered on replay (the alias candidate may point at a newer model): register this run's image_classifier "
              f"as {spec['register_as']!r} from the MLflow UI if it is the one you want", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":  # python -m petpipe.tracking replay FILE...
    if len(sys.argv) < 3 or sys.argv[1] != "replay":
        sys.exit("usage: python -m petpipe.tracking replay .petpipe/pending/<stage>-....json ...")
    for file in sys.argv[2:]:
        print(f"replayed {file} as run {replay(Path(file))}")
