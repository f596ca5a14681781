"""Stage finetune: unfreeze the stage-1 model, one-cycle with discriminative LRs (from choose_lr)."""

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
    "distributed.nproc_per_node",
    "distributed.nnodes",
    "distributed.backend",
    "train.size",
    "train.batch_size",
    "train.augment",
    "train.weight_decay",
    "train.compile",
    "finetune.epochs",
    "finetune.pct_start",
)


def run(
    cfg: Config, *, presized: Path, checkpoint: Path, chosen_lr: Path, final: Path, metrics: Path, plot: Path
) -> dict:
    from petpipe.data.normalization import from_meta
    from petpipe.data.presize import PresizedStore
    from petpipe.run.clock import phase
    from petpipe.serve.classifier import example_input
    from petpipe.tracking.models import log_final_models, warm_up_model_logging
    from petpipe.tracking.runs import stage_run
    from petpipe.train.lr_choice import read_chosen_lr
    from petpipe.train.model import layer_groups
    from petpipe.train.resume import resume_point
    from petpipe.train.runner import fit_and_record, loaders, prepare, restore_unfrozen
    from petpipe.train.schedule import discriminative_lrs

    inputs = {"presized": presized, "checkpoint": checkpoint, "chosen_lr": chosen_lr}
    with stage_run(
        "finetune",
        select(cfg, PARAMS),
        resolved=flatten(cfg),
        inputs=inputs,
        dataset=presized,
        outputs={"final": final, "metrics": metrics, "plot": plot},
        system_metrics=True,
    ) as run:
        runtime, generator = prepare(
            device=cfg.device, precision=cfg.precision, seed=cfg.seed, backend=cfg.distributed.backend
        )
        lo, hi = read_chosen_lr(chosen_lr)
        with phase("build_model"):
            model, meta = restore_unfrozen(checkpoint)
        with phase("open_store"):
            train_loader, valid_loader = loaders(cfg.train, presized, runtime, generator, from_meta(meta))
        warm_up_model_logging(run)  # while training
        result = fit_and_record(
            run,
            stage="finetune",
            runtime=runtime,
            model=model,
            meta=meta,
            train_loader=train_loader,
            valid_loader=valid_loader,
            epochs=cfg.finetune.epochs,
            lr_max=discriminative_lrs(lo, hi, len(layer_groups(model))),
            pct_start=cfg.finetune.pct_start,
            weight_decay=cfg.train.weight_decay,
            compile=cfg.train.compile,
            checkpoint=final,
            metrics=metrics,
            plot=plot,
            extra_metrics={"max_lr_lo": lo, "max_lr_hi": hi},
            resume=resume_point("finetune", select(cfg, PARAMS), inputs=[presized, checkpoint, chosen_lr]),
        )
        # The execution's headline numbers on its parent run, and the final model, once: the network, and a pyfunc
        # taking raw images (registered as mlflow.register_as when it is set).
        run.log_headline(result)
        with phase("log_prepare"):
            store = PresizedStore(presized)
            example = example_input(store)
        log_final_models(run, final, presize_size=store.size, example=example, register_as=cfg.mlflow.register_as)
    return result


def main(argv: list[str] | None = None) -> int:
    arguments = [
        *TRAINING_DATA,
        ("checkpoint", "stage-1 checkpoint to read"),
        ("chosen_lr", "LRs chosen by the choose_lr stage"),
        ("final", "final model checkpoint to write"),
        ("metrics", "final-epoch metrics JSON"),
        ("plot", "per-epoch metrics CSV"),
    ]
    return stage_main(run, arguments, description=__doc__, argv=argv, torchrun_script=__file__)


if __name__ == "__main__":
    exit_process(main())
