"""Stage fetch: download (or copy) the archive at data.url, verify data.sha256, extract the dataset."""

from __future__ import annotations

import sys
from pathlib import Path

from petpipe.config import Config, select
from petpipe.stage import stage_main

PARAMS = ("data.url", "data.sha256")


def run(cfg: Config, *, dataset: Path, downloads: Path) -> dict:
    from petpipe.fetch import fetch
    from petpipe.tracking import repo_root, stage_run

    with stage_run("fetch", select(cfg, PARAMS)) as mlflow_run:
        result = fetch(cfg.data.url, cfg.data.sha256, dest=dataset, root=Path.cwd(), downloads=downloads)
        if cfg.data.sha256 is None:
            print(f"warning: data.sha256 is null, the archive was not verified; its SHA-256 is {result.sha256}", file=sys.stderr)
        mlflow_run.set_tags({"data.sha256_actual": result.sha256, "repo_root": str(repo_root())})
        mlflow_run.log_metrics({"archive_bytes": result.archive_bytes, "files": result.files})
    print(f"fetch: {result.files} files from {cfg.data.url} -> {dataset}")
    return {"sha256": result.sha256, "archive_bytes": result.archive_bytes, "files": result.files}


def main(argv: list[str] | None = None) -> int:
    arguments = [("dataset", "folder to extract the dataset into"), ("downloads", "folder for partial downloads")]
    return stage_main(run, arguments, description=__doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
