"""Stage report: interpret the final model on the validation set; write the HTML report, summary.md,
predictions.csv (DVC's confusion plot) and the figures and tables behind them.

"Params that differ from the profile" compare this run with every profile in the profiles folder
and name the closest one: the profile that differs in the fewest of the params shown (ties: first
by file name). So a pets run is compared with pets.yaml, a digits run with digits.yaml.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

# This checkout's petpipe, not whichever one is installed: a DVC temp or queue workspace runs its own code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from petpipe.run.config import Config, flatten, load_config, select  # noqa: E402
from petpipe.run.stage import TRAINING_DATA, exit_process, stage_main  # noqa: E402

PARAMS = (
    "seed",
    "device",
    "precision",
    "data.url",
    "labels",
    "presize.size",
    "train.arch",
    "train.weights",
    "train.normalize",
    "train.size",
    "train.batch_size",
    "train.augment",
    "train.weight_decay",
    "train_frozen.epochs",
    "train_frozen.lr",
    "train_frozen.pct_start",
    "lr_find",
    "finetune",
    "report.top_losses",
    "report.most_confused_min",
)
PREDICT_BATCH = 64  # prediction only: results do not depend on it, so it is not a param


def shown_params(cfg: Config) -> dict[str, Any]:
    """The params the page and summary.md show (and compare with the profiles): those that shape the results.

    Whole sections where every key counts (a key added to them shows up by itself). Left out:
    data's checks (data.url names the archive) and train.num_workers (speed only).
    """
    return {
        "seed": cfg.seed,
        "device": cfg.device,
        "precision": cfg.precision,
        "data.url": cfg.data.url,
        "labels": cfg.labels,
        "presize.size": cfg.presize.size,
        "train.arch": cfg.train.arch,
        "train.weights": cfg.train.weights,
        "train.normalize": cfg.train.normalize,
        "train.size": cfg.train.size,
        "train.batch_size": cfg.train.batch_size,
        "train.augment": cfg.train.augment,
        "train.weight_decay": cfg.train.weight_decay,
        "train_frozen.epochs": cfg.train_frozen.epochs,
        "train_frozen.lr": cfg.train_frozen.lr,
        "train_frozen.pct_start": cfg.train_frozen.pct_start,
        "lr_find": cfg.lr_find,
        "finetune": cfg.finetune,
        "report.top_losses": cfg.report.top_losses,
        "report.most_confused_min": cfg.report.most_confused_min,
    }


def run(
    cfg: Config,
    *,
    presized: Path,
    labels_skipped: Path,
    final: Path,
    frozen_curve: Path,
    finetune_curve: Path,
    lr_find_curve: Path,
    lr_find_result: Path,
    chosen_lr: Path,
    profiles: Path,
    out_dir: Path,
    predictions: Path,
    html_path: Path,
    summary: Path,
    metrics: Path,
) -> dict:
    from petpipe.compute.device import make_runtime
    from petpipe.data.loaders import make_loader
    from petpipe.data.normalization import from_meta
    from petpipe.data.presize import PresizedStore
    from petpipe.report import build as rb
    from petpipe.report import inputs as ri
    from petpipe.report import page as rp
    from petpipe.report.interpret import Interpretation
    from petpipe.run.clock import phase
    from petpipe.tracking.runs import stage_run
    from petpipe.train.engine import classification_metrics, predict, restore
    from petpipe.train.model import layer_groups
    from petpipe.train.runner import augment_params

    started = time.perf_counter()
    outputs = {
        "interpretation": out_dir,
        "report": html_path,
        "predictions": predictions,
        "summary": summary,
        "metrics": metrics,
    }
    with stage_run(
        "report",
        select(cfg, PARAMS),
        resolved=flatten(cfg),
        inputs={"presized": presized, "final": final},
        dataset=presized,
        outputs=outputs,
    ) as mlflow_run:
        runtime = make_runtime(cfg.device, cfg.precision)
        mlflow_run.set_tags({"device": runtime.describe(), "precision": runtime.precision})
        store = PresizedStore(presized)
        with phase("build_model"):
            model, meta = restore(final)
        normalization = from_meta(meta)  # what training used: the report shows and predicts what the model saw
        classes = meta["classes"]
        curves = {
            "train_frozen": ri.read_curve(frozen_curve, "train_frozen"),
            "finetune": ri.read_curve(finetune_curve, "finetune"),
        }
        run_info = rp.RunInfo(
            title=f"{meta['arch']} on {len(classes)} classes",
            device=runtime.describe(),
            params=shown_params(cfg),
            profiles={
                f"{profiles.name}/{p.name}": shown_params(load_config(p)) for p in sorted(profiles.glob("*.yaml"))
            },
            curves=curves,
        )
        data = ri.data_info(
            store,
            runtime,
            labels_skipped=labels_skipped,
            classes=classes,
            size=cfg.train.size,
            batch_size=cfg.train.batch_size,
            augment=augment_params(cfg.train.augment),
            seed=cfg.seed,
            n_batch=rp.BATCH_IMAGES,
            normalization=normalization,
        )
        lr = ri.lr_info(
            lr_find_curve, lr_find_result, chosen_lr, frozen_lr=cfg.train_frozen.lr, n_groups=len(layer_groups(model))
        )
        loader = make_loader(
            store,
            "valid",
            runtime,
            size=meta["size"],
            batch_size=PREDICT_BATCH,
            num_workers=cfg.train.num_workers,  # training's: none on the CPU; on a GPU, they decode while it predicts
            normalization=normalization,
        )
        with phase("predict"):
            logits, targets = predict(model.to(runtime.device, memory_format=runtime.memory_format), loader, runtime)
        preds = rb.Predictions(
            classes=classes,
            paths=[store.paths[int(i)] for i in loader.dataset.positions],
            interp=Interpretation.from_logits(logits, targets),
            metrics=classification_metrics(logits, targets),
            inputs=lambda items: ri.validation_inputs(loader, items),
        )
        with phase("figures"):
            report = rb.build_report(
                run_info,
                data,
                lr,
                preds,
                top_losses=cfg.report.top_losses,
                most_confused_min=cfg.report.most_confused_min,
            )
        with phase("write"):
            written = rb.write_report(
                report, out_dir=out_dir, predictions=predictions, html_path=html_path, summary=summary, metrics=metrics
            )
        with phase("logging"):
            mlflow_run.log_metrics({**report.metrics, "report_seconds": time.perf_counter() - started})
            mlflow_run.log_headline(report.metrics)
            for path in written:
                mlflow_run.log_artifact(path, "interpretation" if path.parent == out_dir else None)
    print(
        f"report: {html_path} ({len(report.html):,} bytes), {summary}; accuracy {report.metrics['accuracy']:.4f} on "
        f"{len(targets)} "
        f"validation images; {time.perf_counter() - started:.1f} s"
    )
    return report.metrics


def main(argv: list[str] | None = None) -> int:
    arguments = [
        *TRAINING_DATA,
        ("labels_skipped", "files the labels stage skipped (path,reason CSV)"),
        ("final", "final model checkpoint"),
        ("frozen_curve", "per-epoch CSV of train_frozen"),
        ("finetune_curve", "per-epoch CSV of finetune"),
        ("lr_find_curve", "lr_find's loss-vs-LR CSV"),
        ("lr_find_result", "lr_find's suggestions JSON"),
        ("chosen_lr", "fine-tuning LRs chosen by choose_lr"),
        ("profiles", "folder of profiles to compare the params with"),
        ("out_dir", "folder for the figures and tables"),
        ("predictions", "actual,predicted CSV per validation image"),
        ("html_path", "HTML report to write"),
        ("summary", "markdown summary to write"),
        ("metrics", "validation metrics JSON"),
    ]
    return stage_main(run, arguments, description=__doc__, argv=argv)


if __name__ == "__main__":
    exit_process(main())
