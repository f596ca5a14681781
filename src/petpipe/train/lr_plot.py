"""Matplotlib (headless) figures as PNG bytes, shared by lr_find and the report: the LR-finder plot.

The report's own figures live in ``report.figures`` so that editing them re-runs the report alone.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: stages run without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Byte-reproducible files: no matplotlib version in the PNG (same bytes after an upgrade that draws the same),
# and a fixed SVG id salt should anyone save SVG. Agg PNGs carry no timestamp.
PNG_METADATA = {"Software": None}
DPI = 110
matplotlib.rcParams["svg.hashsalt"] = "petpipe"


def figure_png(fig: plt.Figure, dpi: int = DPI, *, tight: bool = True) -> bytes:
    """The figure as PNG bytes (closed afterwards); identical inputs give identical bytes.

    ``tight``: cropped to what is drawn plus a margin (``savefig.pad_inches``, 0.1 in), which draws the figure twice,
    once to measure it; a figure whose layout already fits its canvas passes False and is drawn once.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None, metadata=PNG_METADATA)
    plt.close(fig)
    return buffer.getvalue()


def lr_find_figure(
    lrs: Sequence[float],
    losses: Sequence[float],
    suggestions: dict[str, float],
    chosen: tuple[float, float] | None = None,
    group_lrs: Sequence[float] = (),
) -> bytes:
    """The LR range test with its suggestions; with ``chosen``, the fine-tuning LRs [lo, hi] shaded
    and one line per layer group's peak LR (``group_lrs``), as the report shows it."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs, losses, color="#4c78a8")
    if chosen is not None:
        ax.axvspan(*chosen, color="#f58518", alpha=0.15, label=f"fine-tuning LRs: {chosen[0]:.2e} .. {chosen[1]:.2e}")
    for lr in group_lrs:
        ax.axvline(lr, color="#f58518", linewidth=1)
    for (name, lr), marker in zip(suggestions.items(), "ov^sD"):
        ax.plot(lr, np.interp(np.log(lr), np.log(lrs), losses), marker, label=f"{name}: {lr:.2e}")
    ax.set(
        xscale="log",
        xlabel="Learning rate",
        ylabel="Loss (smoothed)",
        title="LR range test" + ("" if suggestions else " (no suggestions)"),
    )
    if ax.get_legend_handles_labels()[0]:  # nothing to label when lr_find could not suggest and no LRs are chosen
        ax.legend(fontsize=8)
    return figure_png(fig)
