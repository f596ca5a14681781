"""The report's figures as PNG bytes: sample batch, class counts, curves, LR finder, confusion, top losses.

Imported by the report stage alone: editing a figure re-runs only the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from petpipe.train.lr_plot import DPI, figure_png, plt

FROZEN_COLOUR, UNFROZEN_COLOUR = "#dbe9f6", "#fde7d4"
MARGIN = 0.1  # inches of white around a grid: what a tight bounding box would leave (savefig.pad_inches)
TITLE_INCHES = 0.4  # a grid's title row


def image_grid(
    images: np.ndarray, titles: Sequence[str], suptitle: str, *, cols: int = 4, tile: float = 2.2, fontsize: int = 8
) -> bytes:
    """uint8 images [n, H, W, 3] (all one size) in a grid, each ``tile`` inches wide under its title (any number of
    lines).

    One canvas in one axes, pixels drawn as they are: far cheaper than one axes per image.
    """
    n, height, width = len(images), *(images.shape[1:3] if len(images) else (1, 1))
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    per_inch = width / tile  # canvas pixels per inch
    title_px = round((0.16 * max((t.count("\n") + 1 for t in titles), default=1) * fontsize / 8 + 0.08) * per_inch)
    space_px = round(0.15 * per_inch)
    cell_w, cell_h = width + space_px, height + title_px
    canvas = np.full((rows * cell_h, cols * cell_w - space_px, 3), 255, dtype=np.uint8)
    # Laid out to fit (MARGIN inches around the canvas and its title), so it is drawn once: measuring a tight bounding
    # box would draw every tile and title twice (benchmarks/RESULTS.md, "The report's image grids drawn once").
    width_in, height_in = canvas.shape[1] / per_inch, canvas.shape[0] / per_inch
    fig_w, fig_h = width_in + 2 * MARGIN, height_in + TITLE_INCHES + 2 * MARGIN
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    fig.subplots_adjust(
        left=MARGIN / fig_w, right=1 - MARGIN / fig_w, bottom=MARGIN / fig_h, top=1 - (MARGIN + TITLE_INCHES) / fig_h
    )
    for k, (image, title) in enumerate(zip(images, titles)):
        top, left = (k // cols) * cell_h + title_px, (k % cols) * cell_w
        canvas[top : top + height, left : left + width] = image
        ax.text(left + width / 2, top - 0.03 * per_inch, title, ha="center", va="bottom", fontsize=fontsize)
    # Small inputs (digits) scaled up: show their pixels; large ones (224 px) barely scaled: resample smoothly.
    ax.imshow(canvas, interpolation="nearest" if DPI / per_inch >= 2 else "antialiased")
    ax.axis("off")
    fig.suptitle(suptitle, y=1 - (MARGIN + 0.05) / fig_h, va="top")
    return figure_png(fig, tight=False)


def pair_title(predicted: str, actual: str, width: int = 30) -> str:
    """fastai's 'prediction/actual', on two lines when it would run into the next tile."""
    return f"{predicted}/{actual}" if len(predicted) + len(actual) < width else f"{predicted}/\n{actual}"


def class_counts_figure(classes: Sequence[str], train: Sequence[int], valid: Sequence[int]) -> bytes:
    """Horizontal bars, train and valid stacked, one row per class (first class on top)."""
    y = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.24 * len(classes)))
    ax.barh(y, train, color="#4c78a8", label="train")
    ax.barh(y, valid, left=train, color="#f58518", label="valid")
    ax.set_yticks(y, classes, fontsize=8 if len(classes) > 15 else 10)
    ax.invert_yaxis()
    ax.set(xlabel="Images", title="Images per class and split")
    ax.legend(loc="lower right")
    return figure_png(fig)


def curves_figure(stages: dict[str, list[dict[str, float]]]) -> bytes:
    """Loss (log scale) and validation accuracy of the training stages on one epoch axis.

    ``stages`` maps each stage name to its per-epoch rows, in training order; the first stage is the
    frozen one, and its end (the unfreezing) is marked.
    """
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    offset, spans = 0, []
    for stage, rows in stages.items():
        epochs = [offset + r["epoch"] for r in rows]
        loss_ax.plot(
            epochs, [r["train_loss"] for r in rows], "o-", color="#4c78a8", label="train" if not spans else None
        )
        loss_ax.plot(
            epochs, [r["valid_loss"] for r in rows], "s--", color="#f58518", label="valid" if not spans else None
        )
        acc_ax.plot(epochs, [r["accuracy"] for r in rows], "o-", color="#54a24b")
        spans.append((stage, offset + 0.5, offset + len(rows) + 0.5))
        offset += len(rows)
    for ax in (loss_ax, acc_ax):
        for (stage, start, end), colour in zip(spans, (FROZEN_COLOUR, UNFROZEN_COLOUR)):
            ax.axvspan(start, end, color=colour, zorder=0)
            ax.text(
                (start + end) / 2,
                0.02,
                stage,
                transform=ax.get_xaxis_transform(),
                ha="center",
                fontsize=8,
                color="#555",
            )
        for _, _, end in spans[:-1]:
            ax.axvline(end, color="#888", linestyle=":")
        ax.set_xlim(0.5, offset + 0.5)
        ax.set_xticks(range(1, offset + 1))
    loss_ax.set(xlabel="Epoch (both stages)", ylabel="Loss (log scale)", title="Loss", yscale="log")
    acc_ax.set(xlabel="Epoch (both stages)", ylabel="Accuracy", title="Validation accuracy")
    loss_ax.legend()
    return figure_png(fig)


def confusion_figure(cm: np.ndarray, classes: Sequence[str], *, title: str, normalised: bool = False) -> bytes:
    """Rows actual, columns predicted; counts, or row shares (``normalised``) printed in the cells."""
    n = len(classes)
    side = min(4 + 0.3 * n, 18)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalised else None)
    ax.set(xticks=range(n), yticks=range(n), xlabel="Predicted", ylabel="Actual", title=title)
    ax.set_xticklabels(classes, rotation=90, fontsize=8 if n > 15 else 10)
    ax.set_yticklabels(classes, fontsize=8 if n > 15 else 10)
    threshold = (1 if normalised else cm.max()) / 2
    for (i, j), value in np.ndenumerate(cm):
        if value:
            text = (f"{value:.2f}".lstrip("0") if value < 1 else "1") if normalised else str(value)
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=6 if n > 15 else 8,
                color="white" if value > threshold else "black",
                # Inside its cell, so inside the axes, the tight bounding box need not measure it (at a hundred classes
                # and more a count can spill past its cell: unreadable there anyway).
                in_layout=False,
            )
    return figure_png(fig)
