"""Stage lr_find: LR range test on the unfrozen stage-1 model; writes the curve and suggested LRs."""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout's petpipe, not whichever one is installed: a DVC temp or queue workspace runs its own code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from petpipe.config import Config, flatten, select  # noqa: E402
from petpipe.stage import TRAINING_DATA, exit_process, stage_main  # noqa: E402

PARAMS = (
    "seed", "device", "precision", "train.size", "train.batch_size", "train.augment", "train.weight_decay",
    "lr_find.start_lr", "lr_find.end_lr", "lr_find.num_it",
)  # fmt: skip


def run(cfg: Config, *, presized: Path, checkpoint: Path, result: Path, plot: Path, figure: Path) -> dict:
    from petpipe.data import make_loaders
    from petpipe.engine import restore
    from petpipe.figures import lr_find_figure
    from petpipe.files import write_bytes, write_json, write_rows
    from petpipe.lr_find import SUGGESTIONS, lr_find_summary, lr_range_test
    from petpipe.model import unfreeze
    from petpipe.normalization import from_meta
    from petpipe.tracking.runs import stage_run
    from petpipe.tracking.store import preflight
    from petpipe.training import augment_params, prepare

    preflight()  # the tracking server answers, or one line and no work
    runtime, generator = prepare(device=cfg.device, precision=cfg.precision, seed=cfg.seed)
    model, meta = restore(checkpoint)
    unfreeze(model)
    train_loader, _ = make_loaders(
        presized, runtime, size=cfg.train.size, batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers,
        augment=augment_params(cfg.train.augment), generator=generator, normalization=from_meta(meta),
    )  # fmt: skip
    with stage_run(
        "lr_find", select(cfg, PARAMS), resolved=flatten(cfg), inputs={"presized": presized, "checkpoint": checkpoint}, dataset=presized,
        outputs={"result": result, "plot": plot, "figure": figure}, system_metrics=True,
    ) as mlflow_run:  # fmt: skip
        mlflow_run.set_tags({"device": runtime.describe(), "precision": runtime.precision})
        num_it = cfg.lr_find.num_it
        curve = lr_range_test(
            model, train_loader, runtime, start_lr=cfg.lr_find.start_lr, end_lr=cfg.lr_find.end_lr, num_it=num_it, weight_decay=cfg.train.weight_decay
        )  # fmt: skip
        summary = lr_find_summary(curve, num_it)
        suggestions = {k: summary[k] for k in SUGGESTIONS if summary[k] is not None}
        write_json(result, summary)
        write_rows(plot, [{"lr": lr, "loss": loss} for lr, loss in zip(curve["lr"], curve["loss"])])
        write_bytes(figure, lr_find_figure(curve["lr"], curve["loss"], suggestions))
        mlflow_run.log_series({"lr_find_loss": curve["loss"], "lr_find_lr": curve["lr"]})  # batched: one request per 1,000 points
        mlflow_run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        if summary["warning"]:
            mlflow_run.set_tags({"petpipe.lr_find_warning": summary["warning"]})
        mlflow_run.log_artifact(figure, "lr_find")
    if summary["warning"]:
        print(f"warning: {summary['warning']}", file=sys.stderr)
    print(f"lr_find: {len(curve['lr'])} iterations; suggestions {suggestions or 'none'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    arguments = [
        *TRAINING_DATA, ("checkpoint", "stage-1 checkpoint to read"), ("result", "suggested LRs JSON"), ("plot", "loss-vs-LR CSV"),
        ("figure", "loss-vs-LR PNG"),
    ]  # fmt: skip
    return stage_main(run, arguments, description=__doc__, argv=argv)


if __name__ == "__main__":
    exit_process(main())
