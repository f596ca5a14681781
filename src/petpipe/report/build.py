"""Everything the report shows, computed from what the run produced: the interpretation numbers
(``interpret``), the figures (``figures``), the page and summary (``page``).

``build_report`` returns it all as values (PNG bytes, rows, strings); the stage writes the files.
It takes plain arrays and rows, so tests build a report for any number of classes without a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from petpipe.report import figures as rf
from petpipe.report import interpret as it
from petpipe.report import page as rp
from petpipe.report.html import cards, render_html, table_html
from petpipe.report.page import DataInfo, LrInfo, RunInfo
from petpipe.run.files import staged_dir, write_bytes, write_json, write_rows, write_text
from petpipe.train.lr_plot import lr_find_figure


@dataclass(frozen=True)
class Predictions:
    classes: list[str]
    paths: list[str]  # of the validation images, in prediction order
    interp: it.Interpretation
    metrics: dict[str, float]  # valid_loss, accuracy, error_rate (engine.classification_metrics)
    inputs: Callable[[np.ndarray], np.ndarray]  # validation item indices -> uint8 [k, H, W, 3] as the model saw them


@dataclass(frozen=True)
class Report:
    html: str
    summary: str  # markdown, for terminals and pull requests
    metrics: dict[str, float]
    figures: dict[str, bytes]  # file stem -> PNG
    tables: dict[str, tuple[list[dict[str, Any]], list[str]]]  # file stem -> (rows, columns) for CSV
    predictions: list[dict[str, Any]]  # path, actual, predicted, probability, loss per validation image


PREDICTION_COLUMNS = ["path", "actual", "predicted", "probability", "loss"]


def build_report(
    run: RunInfo, data: DataInfo, lr: LrInfo, preds: Predictions, *, top_losses: int, most_confused_min: int
) -> Report:
    classes, interp = preds.classes, preds.interp
    cm = it.confusion_matrix(interp.targets, interp.preds, len(classes))
    metrics = dict(preds.metrics)
    if len(classes) >= rp.TOP_K_MIN_CLASSES:
        metrics[f"top_{rp.TOP_K}_accuracy"] = it.top_k_accuracy(interp.probs, interp.targets, rp.TOP_K)
    confused = [
        {"actual": a, "predicted": p, "count": n} for a, p, n in it.most_confused(cm, classes, most_confused_min)
    ]
    per_class = it.per_class_metrics(cm, classes)
    worst = it.top_losses(interp.losses, top_losses)
    rows = [prediction_row(preds, i) for i in range(len(interp.targets))]
    worst_rows = [rows[int(i)] for i in worst]
    profile, differences = rp.closest_profile(run.params, run.profiles)

    figures = {
        "show_batch": rf.image_grid(data.batch, data.batch_labels, "A training batch: augmented, as the model saw it"),
        "class_counts": rf.class_counts_figure(
            classes, [r["train"] for r in data.counts], [r["valid"] for r in data.counts]
        ),
        "curves": rf.curves_figure(run.curves),
        "lr_find": lr_find_figure(lr.lrs, lr.losses, lr.suggestions, (lr.lo, lr.hi), lr.group_lrs),
        **confusion_figures(cm, classes),
        "top_losses": rf.image_grid(
            preds.inputs(worst),
            [
                f"{rf.pair_title(r['predicted'], r['actual'])}\n{r['loss']:.2f} / {r['probability']:.2f}"
                for r in worst_rows
            ],
            "Prediction/Actual/Loss/Probability",
            cols=3,
            tile=2.6,
        ),
    }
    tables = {
        "per_class": (per_class, ["class", "precision", "recall", "f1", "support"]),
        "most_confused": (confused, ["actual", "predicted", "count"]),
        "confusion": (
            [{"actual": classes[i], **dict(zip(classes, map(int, row)))} for i, row in enumerate(cm)],
            ["actual", *classes],
        ),
        "class_counts": (data.counts, ["class", "train", "valid"]),
        "top_losses": (worst_rows, PREDICTION_COLUMNS),
    }
    sections = [
        ("run", "The run", rp.run_section(run, profile, differences)),
        ("data", "The data", rp.data_section(data, figures["class_counts"])),
        ("batch", "A training batch", rp.batch_section(figures["show_batch"], len(data.batch))),
        ("curves", "Training curves", rp.curves_section(figures["curves"], run.curves)),
        ("lr-finder", "Learning-rate finder", rp.lr_section(figures["lr_find"], lr)),
        ("metrics", "Final metrics", cards(rp.metric_cards(metrics, len(interp.targets)))),
        ("confusion", "Confusion matrix", rp.confusion_section(figures, len(classes))),
        (
            "most-confused",
            "Most confused (actual, predicted, count)",
            rp.most_confused_section(confused, most_confused_min),
        ),
        ("top-losses", f"Top {len(worst)} losses", rp.top_losses_section(figures["top_losses"])),
        ("per-class", "Per-class metrics", table_html(per_class, tables["per_class"][1], sortable=True)),
    ]
    title = f"petpipe report: {run.title}"
    return Report(
        html=render_html(title, rp.headline(metrics, len(interp.targets)), sections),
        summary=rp.summary_markdown(
            title, metrics, len(interp.targets), confused, most_confused_min, profile, differences
        ),
        metrics=metrics,
        figures=figures,
        tables=tables,
        predictions=rows,
    )


def prediction_row(preds: Predictions, i: int) -> dict[str, Any]:
    interp, predicted = preds.interp, int(preds.interp.preds[i])
    return {
        "path": preds.paths[i],
        "actual": preds.classes[interp.targets[i]],
        "predicted": preds.classes[predicted],
        "probability": round(float(interp.probs[i, predicted]), 6),
        "loss": round(float(interp.losses[i]), 6) + 0.0,  # + 0.0: no "-0.0"
    }


def confusion_figures(cm: np.ndarray, classes: list[str]) -> dict[str, bytes]:
    """Counts and row-normalised matrices; above ``report.MAX_MATRIX_CLASSES`` classes, only the most confused ones."""
    shares = it.normalise_rows(cm)  # shares of each actual class's full total, also in the cut view
    names, scope = classes, ""
    if len(classes) > rp.MAX_MATRIX_CLASSES:
        keep = it.most_confused_classes(cm, rp.CONFUSED_VIEW_CLASSES)
        cm, shares, names = cm[np.ix_(keep, keep)], shares[np.ix_(keep, keep)], [classes[i] for i in keep]
        scope = f": the {len(keep)} most confused of {len(classes)} classes"
    return {
        "confusion": rf.confusion_figure(cm, names, title=f"Confusion matrix (counts){scope}"),
        "confusion_normalised": rf.confusion_figure(
            shares, names, title=f"Confusion matrix (share of each actual class){scope}", normalised=True
        ),
    }


def write_report(
    report: Report, *, out_dir: Path, predictions: Path, html_path: Path, summary: Path, metrics: Path
) -> list[Path]:
    """Write every file of ``report``; returns them. ``out_dir`` (figures, tables) is replaced as a whole,
    so no file of an earlier report lingers there, and no half-written folder is left on an error."""
    with staged_dir(out_dir) as staging:
        for name, png in report.figures.items():
            write_bytes(staging / f"{name}.png", png)
        for name, (rows, columns) in report.tables.items():
            write_rows(staging / f"{name}.csv", rows, columns=columns)
    write_rows(predictions, report.predictions, columns=PREDICTION_COLUMNS)
    write_text(html_path, report.html)
    write_text(summary, report.summary)
    write_json(metrics, report.metrics)
    return [html_path, summary, predictions, metrics, *sorted(out_dir.iterdir())]
