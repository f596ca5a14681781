"""The report's HTML page and ``summary.md``, from values already computed (``build`` computes them).

The page inlines every image (base64) and a few lines of script (sortable tables): it works from
a file, offline. Nothing time- or run-dependent goes in: the same inputs give the same bytes.
Plain strings only (no project imports), so editing the page re-runs the report stage alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from petpipe.report.html import esc, img_tag, table_html

TOP_K = 5  # top-5 accuracy, shown from TOP_K_MIN_CLASSES classes up (below that it is close to 1 by construction)
TOP_K_MIN_CLASSES = 10
MAX_MATRIX_CLASSES = 40  # above this a full confusion matrix is unreadable: show the most confused classes
CONFUSED_VIEW_CLASSES = 25
SIDE_BY_SIDE_CLASSES = (
    12  # confusion matrices (counts, shares) side by side up to this many classes, else one above the other
)
MAX_CHART_CLASSES = 40  # class counts: a chart up to this many classes, a sorted table above
BATCH_IMAGES = 16  # show_batch: images of the first training batch shown
SUMMARY_PAIRS = 5  # most confused pairs in summary.md
MAX_TABLE_ROWS = 200  # longer lists (skipped files, confused pairs) are cut on the page; the CSVs have all


@dataclass(frozen=True)
class RunInfo:
    title: str  # e.g. "resnet18 on 10 classes"
    device: str  # where the model ran, e.g. "cuda:0 (NVIDIA H100), precision bf16"
    params: dict[str, Any]  # the params that shape the results (flat keys)
    profiles: dict[str, dict[str, Any]]  # profile name -> the same keys, to compare with
    curves: dict[str, list[dict[str, float]]]  # training stage -> per-epoch rows, in training order (frozen first)


@dataclass(frozen=True)
class DataInfo:
    counts: list[dict[str, Any]]  # class, train, valid
    skipped: list[dict[str, str]]  # stage, path, reason
    batch: np.ndarray  # uint8 [n, H, W, 3]: the first training batch, as the model saw it
    batch_labels: list[str]


@dataclass(frozen=True)
class LrInfo:
    lrs: list[float]
    losses: list[float]
    suggestions: dict[str, float]
    lo: float
    hi: float
    source: str  # where [lo, hi] came from: "finetune.max_lr" or "lr_find valley"
    frozen_lr: float  # train_frozen's one-cycle peak LR (every layer group; the body is frozen)
    group_lrs: list[float]  # fine-tuning peak LR per layer group, first (earliest layers) to last (head)
    warning: str | None = None  # lr_find could not suggest LRs (too few points before the loss diverged)


# --- params against the profiles -------------------------------------------------------------------------------


def flat_params(params: dict[str, Any]) -> dict[str, Any]:
    """Sections (pydantic models such as ``train.augment``) expanded to one key per value."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if hasattr(value, "model_dump"):
            out.update(flat_params({f"{key}.{k}": v for k, v in value.model_dump().items()}))
        else:
            out[key] = value
    return out


def closest_profile(
    params: dict[str, Any], profiles: dict[str, dict[str, Any]]
) -> tuple[str, list[tuple[str, str, str]]]:
    """The profile that differs from ``params`` in the fewest keys (ties: first in name order), and the
    differences as (key, this run, profile). No profiles: ("", [])."""
    run = {k: show(v) for k, v in flat_params(params).items()}
    best: tuple[str, list[tuple[str, str, str]]] | None = None
    for name in sorted(profiles):
        profile = {k: show(v) for k, v in flat_params(profiles[name]).items()}
        diff = [
            (k, run.get(k, "-"), profile.get(k, "-"))
            for k in [*run, *(k for k in profile if k not in run)]
            if run.get(k) != profile.get(k)
        ]
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    return best or ("", [])


def show(value: Any) -> str:
    """A params value as in params.yaml: null, true/false, numbers in short form, [a, b] lists."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if hasattr(value, "model_dump"):
        return show(value.model_dump())
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


# --- sections --------------------------------------------------------------------------------------------------


def run_section(run: RunInfo, profile: str, differences: list[tuple[str, str, str]]) -> str:
    """Where it ran, how long each training stage took, the params that differ from the closest profile, and all
    params."""
    timing = [stage_timing(stage, rows) for stage, rows in run.curves.items()]
    total = {
        "stage": "total",
        "epochs": sum(t["epochs"] for t in timing),
        "seconds": sum(t["seconds"] for t in timing),
        "seconds per epoch": "",
        "train images/s": "",
    }
    if not profile:
        params_html = "<p>No profile to compare with.</p>"
    elif differences:
        counted = "1 param differs" if len(differences) == 1 else f"{len(differences)} params differ"
        params_html = f"<p>{counted} from <code>{esc(profile)}</code>, the closest profile:</p>" + table_html(
            [dict(zip(("param", "this run", "profile"), d)) for d in differences], ["param", "this run", "profile"]
        )
    else:
        params_html = f"<p>Exactly the profile <code>{esc(profile)}</code>.</p>"
    params = [{"param": k, "value": show(v)} for k, v in flat_params(run.params).items()]
    return (
        f"<p>Device: <b>{esc(run.device)}</b>.</p>"
        "<h3>Training time and throughput (measured by the training stages)</h3>"
        + table_html(
            [*timing, total], ["stage", "epochs", "seconds", "seconds per epoch", "train images/s"], float_fmt="{:,.1f}"
        )
        + "<h3>Params that shape the results</h3>"
        + params_html
        + f"<details><summary>All {len(params)} params</summary>{table_html(params, ['param', 'value'])}</details>"
    )


def stage_timing(stage: str, rows: list[dict[str, float]]) -> dict[str, Any]:
    seconds = sum(r["epoch_seconds"] for r in rows)
    return {
        "stage": stage,
        "epochs": len(rows),
        "seconds": seconds,
        "seconds per epoch": seconds / max(len(rows), 1),
        "train images/s": sum(r["train_images_per_s"] for r in rows) / max(len(rows), 1),
    }


def data_section(data: DataInfo, chart: bytes) -> str:
    n_train, n_valid = sum(r["train"] for r in data.counts), sum(r["valid"] for r in data.counts)
    by_stage = {s: sum(r["stage"] == s for r in data.skipped) for s in dict.fromkeys(r["stage"] for r in data.skipped)}
    skipped_note = ", ".join(f"{n} by {s}" for s, n in by_stage.items())
    out = (
        f"<p><b>{len(data.counts)}</b> classes; <b>{n_train:,}</b> training and <b>{n_valid:,}</b> validation images; "
        f"<b>{len(data.skipped)}</b> files skipped{f' ({skipped_note})' if skipped_note else ''}.</p>"
    )
    rows = [{**r, "total": r["train"] + r["valid"]} for r in data.counts]
    if len(rows) <= MAX_CHART_CLASSES:
        counts = table_html(rows, ["class", "train", "valid", "total"], sortable=True)
        out += (
            img_tag(chart, "images per class and split")
            + f"<details><summary>Counts as a table</summary>{counts}</details>"
        )
    else:
        rows.sort(key=lambda r: (-r["total"], r["class"]))
        out += "<p>Images per class, most first (click a column to sort):</p>" + table_html(
            rows, ["class", "train", "valid", "total"], sortable=True
        )
    out += "<h3>Skipped files</h3>"
    if not data.skipped:
        return out + "<p>No files were skipped.</p>"
    return (
        out
        + table_html(data.skipped[:MAX_TABLE_ROWS], ["stage", "path", "reason"], sortable=True)
        + cut_note(len(data.skipped), "the stages' skipped.csv")
    )


def batch_section(png: bytes, n: int) -> str:
    return (
        f"<p>The first {n} images of the first training batch, drawn with the run's seed: the training crops and "
        "augmentation exactly as the model received them (normalisation undone), with their labels. "
        "Check that the labels are right and the augmentation is plausible.</p>" + img_tag(png, "a training batch")
    )


def curves_section(png: bytes, curves: dict[str, list[dict[str, float]]]) -> str:
    spans, start = [], 1
    for stage, rows in curves.items():
        spans.append(f"<code>{esc(stage)}</code> epochs {start}&ndash;{start + len(rows) - 1}")
        start += len(rows)
    return f"<p>{'; then '.join(spans)}. The dotted line marks the unfreezing.</p>" + img_tag(png, "training curves")


def lr_section(png: bytes, lr: LrInfo) -> str:
    suggestions = table_html(
        [{"suggestion": k, "learning rate": v} for k, v in lr.suggestions.items()],
        ["suggestion", "learning rate"],
        "{:.3g}",
    )
    n = len(lr.group_lrs)
    groups = [
        {
            "layer group": f"{i + 1}" + (" (head)" if i == n - 1 else " (earliest layers)" if i == 0 else ""),
            "train_frozen": f"{lr.frozen_lr:.3g}" if i == n - 1 else f"{lr.frozen_lr:.3g} (frozen: norm layers only)",
            "finetune": f"{g:.3g}",
        }
        for i, g in enumerate(lr.group_lrs)
    ]
    warning = f"<p class='warning'><b>Warning:</b> {esc(lr.warning)}</p>" if lr.warning else ""
    return (
        img_tag(png, "learning-rate finder")
        + warning
        + f"<p>Fine-tuning used max LRs <b>{lr.lo:.3g} .. {lr.hi:.3g}</b> (from <code>{esc(lr.source)}</code>), spread "
        "geometrically over the layer groups like fastai's <code>slice(lo, hi)</code>; the shaded band and the lines "
        "in the plot.</p>"
        + f"<div class='row'><div><h3>Suggestions</h3>{suggestions}</div><div><h3>One-cycle peak LR per layer "
        "group</h3>" + table_html(groups, ["layer group", "train_frozen", "finetune"]) + "</div></div>"
    )


def metric_cards(metrics: dict[str, float], n_valid: int) -> dict[str, str]:
    out = {
        "accuracy": f"{metrics['accuracy']:.4f}",
        "error rate": f"{metrics['error_rate']:.4f}",
        "valid loss": f"{metrics['valid_loss']:.4f}",
    }
    if f"top_{TOP_K}_accuracy" in metrics:
        out[f"top-{TOP_K} accuracy"] = f"{metrics[f'top_{TOP_K}_accuracy']:.4f}"
    return out | {"validation images": f"{n_valid:,}"}


def headline(metrics: dict[str, float], n_valid: int) -> str:
    return " &middot; ".join(f"{esc(k)} <b>{esc(v)}</b>" for k, v in metric_cards(metrics, n_valid).items())


def confusion_section(figures: dict[str, bytes], n_classes: int) -> str:
    note = (
        f"<p>{n_classes} classes are too many to read as one matrix: these are the {CONFUSED_VIEW_CLASSES} classes "
        "with the most "
        "errors (as actual or predicted class); <code>interpretation/confusion.csv</code> has the whole matrix.</p>"
        if n_classes > MAX_MATRIX_CLASSES
        else ""
    )
    images = img_tag(figures["confusion"], "confusion matrix, counts") + img_tag(
        figures["confusion_normalised"], "confusion matrix, share of each actual class"
    )
    return note + (
        f"<div class='row'>{images}</div>" if n_classes <= SIDE_BY_SIDE_CLASSES else images
    )  # larger ones need the full width


def most_confused_section(confused: list[dict[str, Any]], min_count: int) -> str:
    if not confused:
        return (
            f"<p>No class was predicted as another at least <code>report.most_confused_min</code> = {min_count} "
            "times.</p>"
        )
    return (
        f"<p>Pairs seen at least <code>report.most_confused_min</code> = {min_count} times, most frequent first.</p>"
        + table_html(confused[:MAX_TABLE_ROWS], ["actual", "predicted", "count"], sortable=True)
        + cut_note(len(confused), "most_confused.csv")
    )


def top_losses_section(png: bytes) -> str:
    return (
        "<p>The validation images the model got most wrong, as the model saw them (centre crop, resampled). "
        "Each title reads <i>prediction/actual</i>, then <i>loss / probability of the prediction</i>.</p>"
        + img_tag(png, "top losses")
    )


def cut_note(total: int, where: str) -> str:
    return f"<p>First {MAX_TABLE_ROWS} of {total:,}; {esc(where)} has them all.</p>" if total > MAX_TABLE_ROWS else ""


# --- summary.md ------------------------------------------------------------------------------------------------


def summary_markdown(
    title: str,
    metrics: dict[str, float],
    n_valid: int,
    confused: list[dict[str, Any]],
    min_count: int,
    profile: str,
    differences: list[tuple[str, str, str]],
) -> str:
    lines = [f"# {title}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in metric_cards(metrics, n_valid).items()]
    lines += ["", "## Most confused (actual → predicted)", ""]
    if confused:
        lines += ["| actual | predicted | count |", "| --- | --- | ---: |"]
        lines += [f"| {md(r['actual'])} | {md(r['predicted'])} | {r['count']} |" for r in confused[:SUMMARY_PAIRS]]
    else:
        lines.append(f"No class was predicted as another at least {min_count} times (report.most_confused_min).")
    lines += ["", f"## Params that differ from {profile or 'the profiles'}", ""]
    if not profile:
        lines.append("No profile to compare with.")
    elif differences:
        lines += ["| param | this run | profile |", "| --- | --- | --- |"]
        lines += [f"| {md(k)} | {md(v)} | {md(p)} |" for k, v, p in differences]
        lines += ["", f"{profile} is the closest profile: the one that differs in the fewest params."]
    else:
        lines.append(f"None: this run uses {profile} as it is.")
    return "\n".join(lines) + "\n"


def md(text: str) -> str:
    """A table cell in markdown: pipes escaped."""
    return str(text).replace("|", "\\|")
