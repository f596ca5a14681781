"""The report's figures as PNG bytes (matplotlib, headless): confusion matrix, top losses, curves, LR finder."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: stages run without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def thumbnail(pixels: np.ndarray, side: int = 224) -> Image.Image:
    """An HxWx3 uint8 image as a PIL image at most ``side`` pixels wide and high."""
    img = Image.fromarray(pixels)
    img.thumbnail((side, side))
    return img


def figure_png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def confusion_figure(cm: np.ndarray, classes: list[str]) -> bytes:
    n = len(classes)
    side = min(4 + 0.3 * n, 18)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="Predicted", ylabel="Actual", title="Confusion matrix")
    ax.set_xticklabels(classes, rotation=90, fontsize=8 if n > 15 else 10)
    ax.set_yticklabels(classes, fontsize=8 if n > 15 else 10)
    if n <= 40:
        threshold = cm.max() / 2 if cm.size else 0
        for (i, j), value in np.ndenumerate(cm):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > threshold else "black")
    return figure_png(fig)


def top_losses_figure(images: Sequence[Image.Image], titles: Sequence[str]) -> bytes:
    """Grid of the worst-predicted images; titles read 'predicted/actual/loss/probability'."""
    cols = min(len(images), 3)
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img, cmap="gray" if img.mode == "L" else None)
        ax.set_title(title, fontsize=8)
    fig.suptitle("Prediction / Actual / Loss / Probability")
    return figure_png(fig)


def lr_find_figure(lrs: Sequence[float], losses: Sequence[float], suggestions: dict[str, float]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.set(xscale="log", xlabel="Learning rate", ylabel="Loss (smoothed)", title="LR range test")
    for (name, lr), marker in zip(suggestions.items(), "ov^s"):
        ax.plot(lr, np.interp(np.log(lr), np.log(lrs), losses), marker, label=f"{name}: {lr:.2e}")
    ax.legend()
    return figure_png(fig)


def curves_figure(histories: dict[str, list[dict[str, float]]]) -> bytes:
    """Train/valid loss and accuracy per epoch for each training stage, stages one after another."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    offset = 0
    for stage, rows in histories.items():
        epochs = [offset + r["epoch"] for r in rows]
        loss_ax.plot(epochs, [r["train_loss"] for r in rows], "o-", label=f"{stage} train")
        loss_ax.plot(epochs, [r["valid_loss"] for r in rows], "s--", label=f"{stage} valid")
        acc_ax.plot(epochs, [r["accuracy"] for r in rows], "o-", label=stage)
        offset += len(rows)
    loss_ax.set(xlabel="Epoch", ylabel="Loss (log scale)", title="Loss", yscale="log")
    acc_ax.set(xlabel="Epoch", ylabel="Accuracy", title="Validation accuracy")
    loss_ax.legend()
    acc_ax.legend()
    return figure_png(fig)
