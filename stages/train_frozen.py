"""Stage train_frozen: new head on a frozen body (norm layers stay trainable), one-cycle training."""

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
    "train.arch",
    "train.weights",
    "train.normalize",
    "train.size",
    "train.batch_size",
    "train.augment",
    "train.weight_decay",
    "train.compile",
    "train_frozen.epochs",
    "train_frozen.lr",
    "train_frozen.pct_start",
)


def run(cfg: Config, *, presized: Path, checkpoint: Path, metrics: Path, plot: Path) -> dict:
    from petpipe.data.normalization import resolve_normalization
    from petpipe.data.presize import PresizedStore
    from petpipe.run.clock import phase
    from petpipe.tracking.runs import stage_run
    from petpipe.train.model import build_model, freeze_body, layer_groups
    from petpipe.train.resume import resume_point
    from petpipe.train.runner import fit_and_record, loaders, prepare

    outputs = {"checkpoint": checkpoint, "metrics": metrics, "plot": plot}
    with stage_run(
        "train_frozen",
        select(cfg, PARAMS),
        resolved=flatten(cfg),
        inputs={"presized": presized},
        dataset=presized,
        outputs=outputs,
        system_metrics=True,
    ) as run:
        runtime, generator = prepare(
            device=cfg.device, precision=cfg.precision, seed=cfg.seed, backend=cfg.distributed.backend
        )
        classes = PresizedStore(presized).classes
        with phase("build_model"):  # a weights problem stops here, before any training
            model = build_model(cfg.train.arch, len(classes), cfg.train.weights)
            normalization = resolve_normalization(
                cfg.train.normalize, weights=cfg.train.weights, pretrained=model.pretrained_normalization
            )
            freeze_body(model)
        with phase("open_store"):
            train_loader, valid_loader = loaders(cfg.train, presized, runtime, generator, normalization)
        return fit_and_record(
            run,
            stage="train_frozen",
            runtime=runtime,
            model=model,
            train_loader=train_loader,
            valid_loader=valid_loader,
            meta={
                "arch": cfg.train.arch,
                "classes": classes,
                "size": cfg.train.size,
                "normalize": normalization.as_dict(),
            },
            epochs=cfg.train_frozen.epochs,
            lr_max=[cfg.train_frozen.lr] * len(layer_groups(model)),
            pct_start=cfg.train_frozen.pct_start,
            weight_decay=cfg.train.weight_decay,
            compile=cfg.train.compile,
            checkpoint=checkpoint,
            metrics=metrics,
            plot=plot,
            resume=resume_point("train_frozen", select(cfg, PARAMS), inputs=[presized]),
        )


def main(argv: list[str] | None = None) -> int:
    arguments = [
        *TRAINING_DATA,
        ("checkpoint", "stage-1 checkpoint to write"),
        ("metrics", "final-epoch metrics JSON"),
        ("plot", "per-epoch metrics CSV"),
    ]
    return stage_main(run, arguments, description=__doc__, argv=argv, torchrun_script=__file__)


if __name__ == "__main__":
    exit_process(main())
