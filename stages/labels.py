"""Stage labels: label every image (labels.rule) and split train/valid (labels.split); images are decoded later, by
presize."""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout's petpipe, not whichever one is installed: a DVC temp or queue workspace runs its own code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from petpipe.run.config import Config, flatten, select  # noqa: E402
from petpipe.run.stage import exit_process, stage_main  # noqa: E402

PARAMS = (
    "seed",
    "labels.rule",
    "labels.images_dir",
    "labels.pattern",
    "labels.regex_on",
    "labels.csv",
    "labels.function",
    "labels.split",
    "labels.valid_pct",
    "labels.valid_file",
    "labels.train_file",
)


def run(cfg: Config, *, dataset: Path, out_dir: Path, metrics: Path) -> dict[str, int]:
    from petpipe.data.labels import make_table
    from petpipe.data.table import write_table
    from petpipe.run.clock import phase
    from petpipe.run.files import write_json
    from petpipe.tracking.runs import stage_run

    with stage_run(
        "labels",
        select(cfg, PARAMS),
        resolved=flatten(cfg),
        inputs={"dataset": dataset},
        dataset=dataset,
        outputs={"labels": out_dir, "metrics": metrics},
    ) as mlflow_run:
        with phase("table"):  # list, label and split the images
            table = make_table(
                dataset,
                rule=cfg.labels.rule,
                images_dir=cfg.labels.images_dir,
                pattern=cfg.labels.pattern,
                match_on=cfg.labels.regex_on,
                csv_name=cfg.labels.csv,
                function=cfg.labels.function,
                split=cfg.labels.split,
                valid_pct=cfg.labels.valid_pct,
                valid_file=cfg.labels.valid_file,
                train_file=cfg.labels.train_file,
                seed=cfg.seed,
                code_root=Path.cwd(),
            )
        with phase("write"):
            files = write_table(table, out_dir)
        counts = table.counts()
        write_json(metrics, counts)
        mlflow_run.log_metrics(counts)
        for path in files.values():
            mlflow_run.log_artifact(path, "labels")
    for warning in table.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"labels: {counts}")
    return counts


def main(argv: list[str] | None = None) -> int:
    arguments = [
        ("dataset", "extracted dataset folder"),
        ("out_dir", "folder for table.csv, classes.json, skipped.csv"),
        ("metrics", "counts JSON"),
    ]
    return stage_main(run, arguments, description=__doc__, argv=argv)


if __name__ == "__main__":
    exit_process(main())
