"""Where the tracking store is (the repository's sqlite file, or ``MLFLOW_TRACKING_URI``) and whether it answers."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from petpipe.run.errors import PetpipeError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

EXPERIMENT = "petpipe"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
CHECK_SECONDS = 15.0  # how long a tracking server may take to answer before a stage refuses to start
REFUSED_SECONDS = 3.0  # nobody listening on the port: a server that is restarting gets this long
# MLflow's defaults retry a dead server for ~4 minutes (7 retries, backoff 2, 120 s timeout); bounded here.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# The MLflow 3 UI opens an experiment on its GenAI pages unless it is marked as model training.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


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
    """Experiment id for ``name``, created on first use (marked as model training for the UI).

    Stages of queued experiments (`dvc queue start -j 2`) can both find no experiment and both create it: the one
    that loses takes the winner's."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
        except MlflowException as err:
            lost_the_race = err.error_code == "RESOURCE_ALREADY_EXISTS"
            experiment = client.get_experiment_by_name(name) if lost_the_race else None
            if experiment is None:
                raise
    if experiment.tags.get("mlflow.experimentKind") is None:
        for key, value in EXPERIMENT_TAGS.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def probe(uri: str, timeout: float) -> str | None:
    """None when the server at ``uri`` answers /health, else why not."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (OSError, ValueError) as err:
        return str(getattr(err, "reason", None) or err)


def check_tracking(uri: str, seconds: float = CHECK_SECONDS) -> None:
    """Raise TrackingError (one line: the URI, what happened, the fix) unless a tracking server answers.

    Local stores (sqlite, files) need no check. A refused connection is retried for
    ``REFUSED_SECONDS`` (a restarting server), anything else (a timeout, an error page) up to ``seconds``.
    """
    if not is_server(uri):
        return
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        why = probe(uri, timeout=max(0.5, min(5.0, seconds - elapsed)))
        if why is None:
            return
        elapsed = time.monotonic() - started
        if elapsed >= (REFUSED_SECONDS if "refused" in why.lower() else seconds):
            break
        time.sleep(0.5)
    local = f"sqlite:///{repo_root() / STORE_FILE}"
    port = uri.rsplit(":", 1)[-1].strip("/") or 5000
    raise TrackingError(
        f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) did not answer within {elapsed:.0f} s ({why}); "
        "nothing was run. "
        f"Start it (e.g. `mlflow server --host 127.0.0.1 --port {port}`) "
        f"or `unset MLFLOW_TRACKING_URI` to log to the local store {local}"
    )
