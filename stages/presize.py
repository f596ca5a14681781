"""Stage presize: decode every labelled image once (EXIF-rotated, RGB), shorter side to presize.size, into one store.

The store (pixels, index, class names, skipped files) is all the training stages read.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout's petpipe, not whichever one is installed: a DVC temp or queue workspace runs its own code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from petpipe.run.config import Config, flatten, select  # noqa: E402
from petpipe.run.stage import exit_process, stage_main  # noqa: E402

PARAMS = ("presize.size",)


def run(cfg: Config, *, dataset: Path, table_csv: Path, classes_json: Path, out_dir: Path, metrics: Path) -> dict:
    from petpipe.data.presize import default_workers, write_store
    from petpipe.data.table import read_table
    from petpipe.run.clock import phase
    from petpipe.run.files import write_json
    from petpipe.tracking.runs import stage_run

    with stage_run(
        "presize",
        select(cfg, PARAMS),
        resolved=flatten(cfg),
        inputs={"dataset": dataset, "labels": table_csv.parent},
        dataset=dataset,
        outputs={"presized": out_dir, "metrics": metrics},
    ) as mlflow_run:
        table = read_table(table_csv, classes_json)
        items = table.indexed()
        workers = default_workers()
        with phase("store"):
            result = write_store(dataset, items, out_dir, size=cfg.presize.size, workers=workers, classes=table.classes)
        counts = {
            "n_images": result.n_images,
            "n_skipped": result.n_skipped,
            "bytes": result.bytes,  # the JPEGs on disk
            "decoded_bytes": result.decoded_bytes,  # their pixels: what the device store holds at the full decode
        }
        write_json(metrics, counts)
        mlflow_run.log_metrics(
            {**counts, "seconds": result.seconds, "images_per_s": len(items) / max(result.seconds, 1e-9)}
        )
        mlflow_run.log_artifact(out_dir / "skipped.csv", "presize")
    for path, reason in result.skipped[:10]:
        print(f"presize: skipped {path}: {reason}", file=sys.stderr)
    print(
        f"presize: {result.n_images} images ({result.bytes / 2**20:.1f} MiB of JPEGs, "
        f"{result.decoded_bytes / 2**20:.1f} MiB decoded), {result.n_skipped} skipped, "
        f"{len(items) / max(result.seconds, 1e-9):.0f} images/s on {workers} processes -> {out_dir}"
    )
    return counts


def main(argv: list[str] | None = None) -> int:
    arguments = [
        ("dataset", "extracted dataset folder"),
        ("table_csv", "labels table"),
        ("classes_json", "class list"),
        ("out_dir", "presized store folder to write"),
        ("metrics", "counts JSON"),
    ]
    return stage_main(run, arguments, description=__doc__, argv=argv)


if __name__ == "__main__":
    exit_process(main())
