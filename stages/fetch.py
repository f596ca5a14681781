"""Stage fetch: download (through the cache) or read the archive at data.url, verify it, extract the dataset."""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout's petpipe, not whichever one is installed: a DVC temp or queue workspace runs its own code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from petpipe.run.config import Config, flatten, select  # noqa: E402
from petpipe.run.stage import exit_process, stage_main  # noqa: E402

PARAMS = ("data.url", "data.sha256", "data.md5", "data.size", "data.max_members", "data.max_unpacked_bytes")


def run(cfg: Config, *, dataset: Path) -> dict:
    from petpipe.run.clock import phase
    from petpipe.sources.fetch import fetch
    from petpipe.tracking.runs import stage_run
    from petpipe.tracking.store import repo_root

    with stage_run(
        "fetch", select(cfg, PARAMS), resolved=flatten(cfg), dataset=dataset, outputs={"dataset": dataset}
    ) as mlflow_run:
        with phase("fetch"):  # download (or the cached archive), checksum, extraction
            result = fetch(
                cfg.data.url,
                dest=dataset,
                root=Path.cwd(),
                sha256=cfg.data.sha256,
                md5=cfg.data.md5,
                size=cfg.data.size,
                max_members=cfg.data.max_members,
                max_unpacked_bytes=cfg.data.max_unpacked_bytes,
            )
        if cfg.data.sha256 is None and cfg.data.md5 is None:
            print(
                "warning: data.sha256 and data.md5 are null, no checksum was checked; the archive's SHA-256 is "
                f"{result.sha256} (pin it as data.sha256)",
                file=sys.stderr,
            )
        mlflow_run.set_tags(
            {"data.sha256_actual": result.sha256, "data.archive": str(result.archive), "repo_root": str(repo_root())}
        )
        metrics = {"archive_bytes": result.archive_bytes, "files": result.files, "downloaded": int(result.downloaded)}
        if result.downloaded:
            metrics |= {
                "download_seconds": result.download_seconds,
                "download_mb_per_s": result.archive_bytes / 1e6 / max(result.download_seconds, 1e-9),
            }
        mlflow_run.log_metrics(metrics)
    source = f"downloaded in {result.download_seconds:.1f} s" if result.downloaded else f"from {result.archive}"
    print(f"fetch: {result.files} files from {cfg.data.url} ({source}) -> {dataset}")
    return {
        "sha256": result.sha256,
        "archive_bytes": result.archive_bytes,
        "files": result.files,
        "downloaded": result.downloaded,
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main(run, [("dataset", "folder to extract the dataset into")], description=__doc__, argv=argv)


if __name__ == "__main__":
    exit_process(main())
