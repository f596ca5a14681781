"""Lineage links between runs: the DVC digests of a stage's files, the run that produced an input, the dataset
as an MLflow dataset input, and the runs of the stages DVC skipped."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from petpipe.run import lineage


def quote(key: str) -> str:
    """A tag key in a search filter (keys hold dots and slashes)."""
    return f"tags.`{key}`"


def input_digest(path: Path, locked: dict[str, str]) -> str | None:
    """DVC's digest of ``path``: from ``locked`` (dvc.lock, which DVC writes for each stage before
    starting the next, when it runs this stage), else computed."""
    return locked.get(Path(path).as_posix()) or lineage.dvc_digest(Path(path))


def find_producer(client: MlflowClient, experiment_id: str, path: str, digest: str) -> str | None:
    """The latest run that logged ``digest`` as its output ``path`` (None if none, or the search fails)."""
    try:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"{quote('petpipe.output.' + path)} = '{digest}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
    except Exception:
        return None
    return found[0].info.run_id if found else None


def link_skipped_stages(
    client: MlflowClient, experiment_id: str, parent_id: str, stages: dict[str, dict[str, list[str]]]
) -> None:
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


def log_dataset(client: MlflowClient, run_id: str, path: Path, digest: str) -> None:
    """``path`` as the run's MLflow dataset input, identified by its DVC digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    # MLflow registers the local source twice (schemes "" and file): same class, same result.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(Path(path).resolve()))
    dataset = MetaDataset(source, name=Path(path).name, digest=digest[:36])
    client.log_inputs(run_id, datasets=[_dataset_input(dataset)])


def _dataset_input(dataset: Any) -> Any:
    from mlflow.entities import DatasetInput, InputTag

    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "input")])
