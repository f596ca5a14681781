"""What the training code logs to: the methods of the stage's run that it calls.

``tracking.runs.StageRun`` is one (the stage opens it and passes it down); a Protocol here keeps ``train``
below ``tracking`` (no import of mlflow, no arrow back up) and lets a test pass any object with these methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_series(self, series: dict[str, list[float]]) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...
