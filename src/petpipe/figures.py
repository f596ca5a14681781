"""Matplotlib (headless) figures as PNG bytes, shared by lr_find and the report: the LR-finder plot.

The report's own figures live in ``report_figures`` so that editing them re-runs the report alone.
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


def figure_png(fig: plt.Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (closed afterwards); identical inputs give identical bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(fig)
    return buffer.getvalue()


def lr_find_figure(lrs: Sequence[float], losses: Sequence[float], suggestions: dict[str, float]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.set(xscale="log", xlabel="Learning rate", ylabel="Loss (smoothed)", title="LR range test")
    for (name, lr), marker in zip(suggestions.items(), "ov^s"):
        ax.plot(lr, np.interp(np.log(lr), np.log(lrs), losses), marker, label=f"{name}: {lr:.2e}")
    ax.legend()
    return figure_png(fig)
