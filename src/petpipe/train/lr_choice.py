"""The fine-tuning LRs: ``finetune.max_lr`` as given, or ``auto`` from lr_find's suggestion.

Kept apart from ``lr_find`` (which needs torch) so the small ``choose_lr`` stage starts in a
fraction of a second, and so ``finetune`` depends on the chosen LRs rather than on lr_find's whole
result: with explicit LRs, a new lr_find curve leaves the chosen LRs, and so finetune, unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from petpipe.run.errors import PetpipeError

AUTO_LR_MULT = 100  # fastai fine_tune: slice(base_lr / lr_mult, base_lr), lr_mult=100


def auto_max_lr(suggestions: dict[str, float]) -> tuple[float, float]:
    """``finetune.max_lr: auto`` -> [valley / 100, valley] (fastai fine_tune's lr_mult=100)."""
    hi = suggestions["valley"]
    return hi / AUTO_LR_MULT, hi


def choose_max_lr(max_lr: tuple[float, float] | str, lr_find_result: Path) -> dict[str, float | str]:
    """``{"lo", "hi", "source"}``: the explicit pair, or ``auto`` from lr_find's valley suggestion."""
    if max_lr != "auto":
        lo, hi = max_lr
        return {"lo": lo, "hi": hi, "source": "finetune.max_lr"}
    try:
        result = json.loads(lr_find_result.read_text())
        valley = result["valley"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PetpipeError(
            f"finetune.max_lr: 'auto' needs lr_find's result {lr_find_result}, which cannot be read ({err}); run "
            "lr_find first"
        ) from None
    if valley is None:
        raise PetpipeError(
            "finetune.max_lr: 'auto' needs lr_find's valley suggestion, but lr_find could not suggest one "
            f"({result.get('warning')}); "
            "set finetune.max_lr to [lo, hi], or change lr_find.start_lr / lr_find.num_it and re-run"
        )
    lo, hi = auto_max_lr(result)
    return {"lo": lo, "hi": hi, "source": "lr_find valley"}


def read_chosen_lr(path: Path) -> tuple[float, float]:
    """(lo, hi) written by the choose_lr stage."""
    try:
        chosen = json.loads(path.read_text())
        return float(chosen["lo"]), float(chosen["hi"])
    except (OSError, ValueError, KeyError) as err:
        raise PetpipeError(
            f"cannot read the chosen LRs {path} ({type(err).__name__}: {err}); run the choose_lr stage (dvc repro "
            "choose_lr)"
        ) from None
