"""Stage finetune: unfreeze the stage-1 model, one-cycle with discriminative LRs (from choose_lr)."""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout's petpipe, not whichever one is installed: a DVC temp or queue workspace runs its own code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from petpipe.config import Config, flatten, select  # noqa: E402
from petpipe.stage import TRAINING_DATA, exit_process, stage_main  # noqa: E402

PARAMS = (
    "seed", "device", "precision", "distributed.nproc_per_node", "distributed.nnodes", "distributed.backend", "train.size", "train.batch_size",
    "train.augment", "train.weight_decay", "finetune.epochs", "finetune.pct_start",
)  # fmt: skip


def run(
    cfg: Config, *, presized: Path, checkpoint: Path, chosen_lr: Path, final: Path, metrics: Path, plot: Path
) -> dict:  # fmt: skip
    from petpipe.data import make_loaders
    from petpipe.engine import restore
    from petpipe.finetune_lr import read_chosen_lr
    from petpipe.model import layer_groups, unfreeze
    from petpipe.normalization import from_meta
    from petpipe.resume import resume_point
    from petpipe.schedule import discriminative_lrs
    from petpipe.tracking.store import preflight
    from petpipe.training import augment_params, fit_and_record, prepare

    preflight()  # the tracking server answers, or one line and no work
    runtime, generator = prepare(device=cfg.device, precision=cfg.precision, seed=cfg.seed, backend=cfg.distributed.backend)
    lo, hi = read_chosen_lr(chosen_lr)
    model, meta = restore(checkpoint)
    unfreeze(model)
    train_loader, valid_loader = make_loaders(
        presized, runtime, size=cfg.train.size, batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers,
        augment=augment_params(cfg.train.augment), generator=generator, normalization=from_meta(meta),
    )  # fmt: skip
    return fit_and_record(
        "finetune", select(cfg, PARAMS), runtime=runtime, model=model, meta=meta, train_loader=train_loader, valid_loader=valid_loader,
        epochs=cfg.finetune.epochs, lr_max=discriminative_lrs(lo, hi, len(layer_groups(model))), pct_start=cfg.finetune.pct_start,
        weight_decay=cfg.train.weight_decay, checkpoint=final, metrics=metrics, plot=plot, extra_metrics={"max_lr_lo": lo, "max_lr_hi": hi},
        resume=resume_point("finetune", select(cfg, PARAMS), inputs=[presized, checkpoint, chosen_lr]),
        tracking=dict(resolved=flatten(cfg), inputs={"presized": presized, "checkpoint": checkpoint, "chosen_lr": chosen_lr}, dataset=presized,
                      outputs={"final": final, "metrics": metrics, "plot": plot}, system_metrics=True),
        on_recorded=lambda run, result: log_final_model(run, result, final=final, store=train_loader.dataset.store, register_as=cfg.mlflow.register_as),
    )  # fmt: skip


def log_final_model(run, result: dict, *, final: Path, store, register_as: str | None) -> None:
    """The execution's headline numbers on its parent run, and the final model, once (the network, and a pyfunc taking raw
    images, registered as ``register_as`` when it is set)."""
    from petpipe.serving import example_input
    from petpipe.tracking.models import log_final_models

    run.log_headline(result)
    log_final_models(run, final, presize_size=store.size, example=example_input(store), register_as=register_as)


def main(argv: list[str] | None = None) -> int:
    arguments = [
        *TRAINING_DATA, ("checkpoint", "stage-1 checkpoint to read"), ("chosen_lr", "LRs chosen by the choose_lr stage"),
        ("final", "final model checkpoint to write"), ("metrics", "final-epoch metrics JSON"), ("plot", "per-epoch metrics CSV"),
    ]  # fmt: skip
    return stage_main(run, arguments, description=__doc__, argv=argv, launcher=launch)


def launch(cfg: Config, argv: list[str]) -> int | None:
    """More than one process: run this script under torchrun instead (None: run it here)."""
    from petpipe.distributed import relaunch_under_torchrun

    return relaunch_under_torchrun(__file__, argv, nproc_per_node=cfg.distributed.nproc_per_node, nnodes=cfg.distributed.nnodes)


if __name__ == "__main__":
    exit_process(main())
