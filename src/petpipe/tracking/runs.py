"""The parent run of a pipeline execution and the stage runs under it: their tags, and ``StageRun``, the
journaled handle a stage logs through (offline after an outage, its journal kept for ``tracking.replay``)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from petpipe.run import clock as stage_clock
from petpipe.run import lineage
from petpipe.run.signals import deferred_stop
from petpipe.tracking import links
from petpipe.tracking.store import (
    EXPERIMENT,
    HTTP_DEFAULTS,
    check_tracking,
    default_artifact_location,
    ensure_experiment,
    is_server,
    probe,
    repo_root,
    tracking_uri,
)

PENDING_DIR = Path(".petpipe") / "pending"
REPLAY_COMMAND = "python -m petpipe.tracking.replay"
MAX_PARAM_CHARS = 6000  # MLflow 3 limit on a param value
BATCH_PARAMS, BATCH_METRICS = 100, 1000  # MLflow's limits per log_batch request
HEADLINE_METRICS = ("accuracy", "error_rate", "valid_loss", "top_5_accuracy")  # on the parent, from finetune and report


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


# ---------------------------------------------------------------------------------------------
# The stage run


class StageRun:
    """The handle a stage logs through; thin so that library code never sees mlflow.

    Every call is journaled; when the server stops answering the handle goes offline (the stage
    goes on) and the journal is written for ``replay`` at the end.
    """

    records = True  # False for the handle of a torchrun process other than rank 0 (``NullRun``)

    def __init__(
        self, run_id: str, *, stage: str, parent_id: str, client: MlflowClient, uri: str, key: str, experiment_id: str
    ):
        self.run_id, self.stage, self.parent_id, self.experiment_id = run_id, stage, parent_id, experiment_id
        self.client, self.uri, self.key = client, uri, key
        self.journal: list[tuple[str, list[Any]]] = []
        self.offline: str | None = None

    def journaled(self, name: str, args: list[Any], call: Callable[[], Any]) -> None:
        """Run ``call`` (a store write) unless offline, and journal it as ``name(*args)`` (JSON values) for ``replay``,
        which calls the method ``name`` again (or the model logging, for ``log_final_models``)."""
        self.journal.append((name, args))
        if self.offline:
            return
        try:
            with deferred_stop():  # no stop signal in the middle of a store write
                call()
        except Exception as err:  # logging must never cost the stage its outputs
            why = probe(self.uri, timeout=3.0) if is_server(self.uri) else "local store"
            if why is None or why == "local store":
                raise  # the server answers: a real error, not an outage
            self.offline = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else why}"
            what = f"{self.stage} goes on and keeps what it would log"
            print(f"warning: MLflow at {self.uri} stopped answering ({why}); {what}", file=sys.stderr)

    def log_params(self, params: dict[str, Any]) -> None:
        params = {k: _as_param(v) for k, v in params.items()}
        items = list(params.items())

        def call() -> None:
            for i in range(0, len(items), BATCH_PARAMS):
                batch = [Param(k, v) for k, v in items[i : i + BATCH_PARAMS]]
                self.client.log_batch(self.run_id, params=batch, synchronous=True)

        self.journaled("log_params", [params], call)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in metrics.items()]

        def call() -> None:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

        self.journaled("log_metrics", [metrics, step], call)

    def log_series(self, series: dict[str, list[float]]) -> None:
        """Per-step values (step = position), sent in batches rather than one request per point."""
        series = {k: [float(v) for v in values] for k, values in series.items()}
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, values in series.items() for step, v in enumerate(values)]

        def call() -> None:
            for i in range(0, len(metrics), BATCH_METRICS):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH_METRICS], synchronous=True)

        self.journaled("log_series", [series], call)

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Metrics of the whole execution, on the parent run (the row the runs table compares)."""
        metrics = {k: float(v) for k, v in metrics.items()}
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, 0) for k, v in metrics.items()]
        self.journaled("log_summary", [metrics], lambda: self.client.log_batch(self.parent_id, metrics=batch))

    def log_headline(self, metrics: dict[str, float]) -> None:
        """The execution's headline numbers (``HEADLINE_METRICS`` found in ``metrics``) on the parent run."""
        self.log_summary({k: metrics[k] for k in HEADLINE_METRICS if k in metrics})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        def call() -> None:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

        self.journaled("log_artifact", [str(path), artifact_path], call)

    def set_tags(self, tags: dict[str, str]) -> None:
        tags = {k: str(v) for k, v in tags.items()}
        batch = [RunTag(k, v) for k, v in tags.items()]
        self.journaled("set_tags", [tags], lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_input_files(self, inputs: dict[str, Path], dataset: Path | None) -> None:
        """Digests of the input files, the runs that produced them, and ``dataset`` as an MLflow dataset input."""
        locked = lineage.locked_digests(Path(lineage.LOCK_FILE)) if os.environ.get("DVC_STAGE") else {}
        digests = {str(p): links.input_digest(p, locked) for p in inputs.values()}
        tags = {f"petpipe.input.{path}": d for path, d in digests.items() if d}
        if not self.offline:
            for path, digest in digests.items():
                producer = digest and links.find_producer(self.client, self.experiment_id, path, digest)
                if producer:
                    tags[f"petpipe.upstream.{path}"] = producer
        self.set_tags(tags)
        if dataset is not None and digests.get(str(dataset)):
            self.log_dataset(dataset, digests[str(dataset)])

    def log_dataset(self, path: Path, digest: str) -> None:
        def call() -> None:
            links.log_dataset(self.client, self.run_id, path, digest)

        self.journaled("log_dataset", [str(path), digest], call)

    def log_outputs(self, outputs: dict[str, Path]) -> dict[str, str]:
        """DVC digests of the outputs (returned too), so a later execution that skips this stage can find this run."""
        digests = {str(p): d for p in outputs.values() if (d := lineage.dvc_digest(Path(p)))}
        self.set_tags({f"petpipe.output.{p}": d for p, d in digests.items()})
        return digests


# ---------------------------------------------------------------------------------------------
# The lifecycle: the execution's parent run, the stage run under it


def parent_run(client: MlflowClient, experiment_id: str, key: str, resolved: dict[str, Any]) -> str:
    """The parent run of execution ``key``: found by its tag and reopened, or created with every resolved param."""
    # Stage runs carry the key too.
    query = f"{links.quote('petpipe.execution')} = '{key}' and {links.quote('petpipe.kind')} = 'pipeline'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = execution_tags(key)
    dirty = "+dirty" if tags.get("git.dirty") == "true" else ""
    name = tags.get("dvc.exp_name") or f"repro@{tags.get('git.commit', 'nogit')[:7]}{dirty}"
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    items = [Param(k, _as_param(v)) for k, v in resolved.items()]
    for i in range(0, len(items), BATCH_PARAMS):
        client.log_batch(run.info.run_id, params=items[i : i + BATCH_PARAMS])
    return run.info.run_id


class NullRun:
    """What ``stage_run`` yields on a torchrun process other than rank 0: it records nothing, and every
    logging call does nothing (rank 0 logs for all of them)."""

    records = False

    def __getattr__(self, name: str) -> Callable[..., None]:
        return _nothing


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def is_other_rank() -> bool:
    """A torchrun worker other than rank 0 (torchrun's ``RANK``; read here without importing torch)."""
    return int(os.environ.get("RANK", "0")) != 0


@contextmanager
def stage_run(
    stage: str,
    params: dict[str, Any],
    *,
    resolved: dict[str, Any] | None = None,
    inputs: dict[str, Path] | None = None,
    dataset: Path | None = None,
    outputs: dict[str, Path] | None = None,
    system_metrics: bool = False,
) -> Iterator[StageRun]:
    """One MLflow child run for one stage execution, under its execution's parent; ended (FAILED on error) whatever
    happens.

    ``params``: the keys the stage reads; ``resolved``: every flattened param (the parent's, and the
    source of the upstream params logged as lineage); ``inputs`` / ``outputs``: files whose DVC
    digests are recorded (outputs once the body has written them); ``dataset``: the input logged
    with ``mlflow.log_input``. The tracking server is checked first (the one probe of a stage): no work
    starts without it. On torchrun processes other than rank 0 it yields a ``NullRun``.
    """
    if is_other_rank():
        yield NullRun()
        return
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    uri, location = tracking_uri(), default_artifact_location()  # before set_tracking_uri exports the env var
    check_tracking(uri)
    mlflow.set_tracking_uri(uri)
    key = lineage.execution_key()
    resolved = resolved if resolved is not None else dict(params)
    pipeline = lineage.find_pipeline([Path.cwd(), repo_root(), Path(__file__).resolve().parents[3]])
    stages = lineage.load_stages(pipeline) if pipeline else {}
    handle, started, status = None, time.monotonic(), "FAILED"
    try:
        with deferred_stop():  # store reads and writes: a stop waits for them, then ends the runs KILLED below
            client = MlflowClient(uri)
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
            experiment_id = ensure_experiment(client, experiment, location)
            parent_id = parent_run(client, experiment_id, key, resolved)
            tags = {**run_tags(stage), "petpipe.execution": key, "mlflow.parentRunId": parent_id}
            tags |= version_tags()
            run = mlflow.start_run(
                experiment_id=experiment_id, run_name=stage, tags=tags, log_system_metrics=system_metrics or None
            )
            handle = StageRun(
                run.info.run_id,
                stage=stage,
                parent_id=parent_id,
                client=client,
                uri=uri,
                key=key,
                experiment_id=experiment_id,
            )
            client.set_tag(parent_id, f"petpipe.run.{stage}", run.info.run_id)
            handle.log_params({**lineage.lineage_params(stages, stage, resolved), **params})
            if inputs:
                handle.log_input_files(inputs, dataset)
            if stages and not handle.offline:
                links.link_skipped_stages(client, experiment_id, parent_id, stages)
        clock = stage_clock.CLOCK
        clock.begin_work()
        yield handle
        clock.on_finish(lambda seconds: log_fixed_cost(handle, seconds))
        if outputs:
            with stage_clock.phase("digests"):
                digests = handle.log_outputs(outputs)
            if dataset is not None and not inputs:  # fetch: its output is the dataset (hashed once, above)
                handle.log_dataset(dataset, digests.get(str(dataset), ""))
        clock.end_work()
        if phases := clock.seconds()["phases"]:  # where the stage's work went, on its own run
            handle.log_metrics({f"{name}_seconds": value for name, value in phases.items()})
        handle.log_summary({f"{stage}_seconds": time.monotonic() - started})
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (the stage turns it into KeyboardInterrupt)
        status = "KILLED"
        raise
    finally:
        if handle is not None:  # else the setup failed before the stage run existed
            _finish(handle, status)


def log_fixed_cost(handle: StageRun, seconds: dict[str, float]) -> None:
    """``<stage>_startup_seconds`` (and work, teardown) on the parent, after the runs ended; never fails the stage."""
    if handle.offline:
        return  # not worth a replay: the stage's --timing file has them
    metrics = {f"{handle.stage}_{key}": value for key, value in stage_clock.flat_seconds(seconds).items()}
    try:
        handle.client.log_batch(
            handle.parent_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()]
        )
    except Exception as err:  # the outputs are written and the runs ended: a lost timing is only a warning
        print(f"warning: {handle.stage}'s start-up and teardown seconds were not logged ({err})", file=sys.stderr)


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
        print(
            f"warning: MLflow at {handle.uri} did not answer ({handle.offline}); the outputs of {handle.stage} are "
            f"written and valid, and what it logged is kept in {pending}: "
            f"log it later with `{REPLAY_COMMAND} {pending}`",
            file=sys.stderr,
        )


def write_pending(handle: StageRun) -> Path:
    """The journal of an offline stage run, for ``tracking.replay``."""
    name = f"{handle.stage}-{time.strftime('%Y%m%d-%H%M%S')}-{handle.run_id[:8]}.json"
    path = repo_root() / PENDING_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": handle.stage, "execution": handle.key, "cwd": os.getcwd(), "calls": handle.journal}
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path
