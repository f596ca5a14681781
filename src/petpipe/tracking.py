"""MLflow tracking: the only module that imports mlflow.

Every stage execution is one MLflow run in the experiment ``petpipe`` (``MLFLOW_EXPERIMENT_NAME``
overrides), named after the stage. The default store is ``sqlite:///<repo root>/mlflow.db`` with
artifacts in ``<repo root>/mlartifacts``; ``MLFLOW_TRACKING_URI`` points it elsewhere (a server).
The repo root is ``DVC_ROOT`` (set by DVC for stage commands) and, when DVC runs the stage in a
temporary experiment workspace under ``.dvc/tmp/exps``, the repository that workspace belongs to.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

EXPERIMENT = "petpipe"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MAX_PARAM_CHARS = 6000  # MLflow 3 limit on a param value


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
    """Experiment id for ``name``, created on first use."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def run_tags(stage: str) -> dict[str, str]:
    """Tags that tie a run to its stage and DVC experiment (empty values are dropped)."""
    tags = {
        "petpipe.stage": stage,
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }
    return {k: v for k, v in tags.items() if v}


class StageRun:
    """The handle a stage logs through; thin so that library code never sees mlflow."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        mlflow.log_params({k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        mlflow.set_tags(tags)


@contextmanager
def stage_run(stage: str, params: dict[str, Any]) -> Iterator[StageRun]:
    """One MLflow run for one stage execution; ended (FAILED on error) whatever happens."""
    uri, location = tracking_uri(), default_artifact_location()  # before set_tracking_uri exports the env var
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(MlflowClient(uri), os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT), location)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=run_tags(stage))
    status = "FAILED"
    try:
        handle = StageRun(run.info.run_id)
        handle.log_params(params)
        yield handle
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (the stage turns it into KeyboardInterrupt)
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)
