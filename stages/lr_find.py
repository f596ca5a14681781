"""Stage lr_find: LR range test on the unfrozen stage-1 model; writes the curve and suggested LRs."""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout's petpipe, not whichever one is installed: a DVC temp or queue workspace runs its own code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from petpipe.run.config import Config, flatten, select  # noqa: E402
from petpipe.run.stage import TRAINING_DATA, exit_process, stage_main  # noqa: E402

PARAMS = (
    "seed",
    "device",
    "precision",
    "train.size",
    "train.batch_size",
    "train.augment",
    "train.weight_decay",
    "lr_find.start_lr",
    "lr_find.end_lr",
    "lr_find.num_it",
)


def run(cfg: Config, *, presized: Path, checkpoint: Path, result: Path, plot: Path, figure: Path) -> dict:
    from petpipe.data.normalization import from_meta
    from petpipe.run.clock import phase
    from petpipe.tracking.runs import stage_run
    from petpipe.train.lr_find import lr_find_summary, lr_range_test, record_lr_find
    from petpipe.train.runner import loaders, prepare, restore_unfrozen

    with stage_run(
        "lr_find",
        select(cfg, PARAMS),
        resolved=flatten(cfg),
        inputs={"presized": presized, "checkpoint": checkpoint},
        dataset=presized,
        outputs={"result": result, "plot": plot, "figure": figure},
        system_metrics=True,
    ) as run:
        runtime, generator = prepare(device=cfg.device, precision=cfg.precision, seed=cfg.seed)
        with phase("build_model"):
            model, meta = restore_unfrozen(checkpoint)
        with phase("open_store"):
            train_loader, _ = loaders(cfg.train, presized, runtime, generator, from_meta(meta))
        run.set_tags({"device": runtime.describe(), "precision": runtime.precision})
        with phase("lr_range_test"):
            curve = lr_range_test(
                model,
                train_loader,
                runtime,
                start_lr=cfg.lr_find.start_lr,
                end_lr=cfg.lr_find.end_lr,
                num_it=cfg.lr_find.num_it,
                weight_decay=cfg.train.weight_decay,
            )
        summary = lr_find_summary(curve, cfg.lr_find.num_it)
        with phase("record"):  # result JSON, curve CSV, figure, MLflow
            record_lr_find(run, curve, summary, result=result, plot=plot, figure=figure)
    return summary


def main(argv: list[str] | None = None) -> int:
    arguments = [
        *TRAINING_DATA,
        ("checkpoint", "stage-1 checkpoint to read"),
        ("result", "suggested LRs JSON"),
        ("plot", "loss-vs-LR CSV"),
        ("figure", "loss-vs-LR PNG"),
    ]
    return stage_main(run, arguments, description=__doc__, argv=argv)


if __name__ == "__main__":
    exit_process(main())
