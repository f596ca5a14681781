"""Stage report: interpret the final model on the validation set and write the self-contained HTML report."""

from __future__ import annotations

import sys
from pathlib import Path

from petpipe.config import Config, select
from petpipe.stage import TRAINING_DATA, stage_main

PARAMS = ("device", "precision", "report.top_losses", "report.most_confused_min")
PREDICT_BATCH = 64  # prediction only: results do not depend on it, so it is not a param


def run(
    cfg: Config, *, presized: Path, final: Path, curves: list[Path], lr_find_figure_path: Path,
    out_dir: Path, html_path: Path, metrics: Path,
) -> dict:  # fmt: skip
    from petpipe import figures as fg
    from petpipe import interpret as it
    from petpipe import report as rp
    from petpipe.data import make_loader
    from petpipe.device import make_runtime
    from petpipe.engine import classification_metrics, predict
    from petpipe.files import read_rows, write_bytes, write_json, write_rows, write_text
    from petpipe.presize import PresizedStore
    from petpipe.tracking import stage_run
    from petpipe.training import restore

    runtime = make_runtime(cfg.device, cfg.precision)
    store = PresizedStore(presized)
    model, meta = restore(final)
    loader = make_loader(store, "valid", runtime, size=meta["size"], batch_size=PREDICT_BATCH, num_workers=0)
    valid = loader.dataset
    with stage_run("report", select(cfg, PARAMS)) as mlflow_run:
        mlflow_run.set_tags({"device": runtime.describe(), "precision": runtime.precision})
        logits, targets = predict(model.to(runtime.device, memory_format=runtime.memory_format), loader, runtime)
        interp = it.Interpretation.from_logits(logits, targets)
        classes = meta["classes"]
        cm = it.confusion_matrix(interp.targets, interp.preds, len(classes))
        confused = it.most_confused(cm, classes, cfg.report.most_confused_min)
        per_class = it.per_class_metrics(cm, classes)
        worst = it.top_losses(interp.losses, cfg.report.top_losses)
        summary = classification_metrics(logits, targets)

        figures = {
            "confusion": fg.confusion_figure(cm, classes),
            "top_losses": fg.top_losses_figure(
                [fg.thumbnail(store.square(int(valid.positions[i]), 0.5)) for i in worst],  # the square the model saw
                [f"{classes[interp.preds[i]]}/{classes[interp.targets[i]]}/{interp.losses[i]:.2f}/{interp.probs[i, interp.preds[i]]:.2f}" for i in worst],
            ),
            "curves": fg.curves_figure({p.stem: read_rows(p) for p in curves}),
        }
        for name, png in figures.items():
            write_bytes(out_dir / f"{name}.png", png)
        write_rows(out_dir / "per_class.csv", per_class)
        confused_rows = [{"actual": a, "predicted": p, "count": n} for a, p, n in confused]
        write_rows(out_dir / "most_confused.csv", confused_rows, columns=["actual", "predicted", "count"])
        write_rows(out_dir / "confusion.csv", [{"actual": classes[i], **dict(zip(classes, map(int, row)))} for i, row in enumerate(cm)])

        page = rp.render_html(
            f"petpipe report: {meta['arch']} on {len(classes)} classes",
            {"accuracy": f"{summary['accuracy']:.4f}", "error rate": f"{summary['error_rate']:.4f}",
             "valid loss": f"{summary['valid_loss']:.4f}", "validation images": str(len(valid))},
            [
                ("Training curves", rp.img_tag(figures["curves"], "training curves")),
                ("Learning-rate finder", rp.img_tag(lr_find_figure_path.read_bytes(), "lr_find")),
                ("Confusion matrix", rp.img_tag(figures["confusion"], "confusion matrix")),
                ("Most confused (actual, predicted, count)",
                 rp.table_html(confused_rows[:30], ["actual", "predicted", "count"])
                 if confused else "<p>No confusions at or above report.most_confused_min.</p>"),
                (f"Top {len(worst)} losses", rp.img_tag(figures["top_losses"], "top losses")),
                ("Per-class metrics", rp.table_html(per_class, ["class", "precision", "recall", "f1", "support"])),
            ],
        )  # fmt: skip
        write_text(html_path, page)
        write_json(metrics, summary)
        mlflow_run.log_metrics(summary)
        mlflow_run.log_artifact(html_path)
        for path in sorted(out_dir.iterdir()):
            mlflow_run.log_artifact(path, "interpretation")
    print(f"report: {html_path} (accuracy {summary['accuracy']:.4f})")
    return summary


def main(argv: list[str] | None = None) -> int:
    arguments = [
        *TRAINING_DATA, ("final", "final model checkpoint"), ("curves", "per-epoch CSVs of the training stages"),
        ("lr_find_figure_path", "lr_find PNG to embed"), ("out_dir", "folder for confusion, top losses, per-class files"),
        ("html_path", "HTML report to write"), ("metrics", "validation metrics JSON"),
    ]  # fmt: skip
    return stage_main(run, arguments, description=__doc__, multiple=("curves",), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
