"""One-cycle schedules and discriminative learning rates, as pure functions (fastai's formulas).

fastai (callback/schedule.py): ``sched_cos(start, end, pos)`` anneals with half a cosine;
``fit_one_cycle`` warms the LR up from ``lr_max/div`` to ``lr_max`` over ``pct_start`` of the
steps, then anneals to ``lr_max/div_final``, while the momentum (Adam's beta1) goes
0.95 -> 0.85 -> 0.95. ``slice(lo, hi)`` spreads LRs geometrically over the layer groups.
"""

from __future__ import annotations

import math

import torch

DIV = 25.0  # fastai fit_one_cycle: div
DIV_FINAL = 1e5  # fastai fit_one_cycle: div_final
MOMS = (0.95, 0.85, 0.95)  # fastai fit_one_cycle: moms


def sched_cos(start: float, end: float, pos: float) -> float:
    """Cosine from ``start`` (pos=0) to ``end`` (pos=1)."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def two_phase(pos: float, pct_start: float, start: float, middle: float, end: float) -> float:
    """Cosine start -> middle over [0, pct_start), then middle -> end over [pct_start, 1]."""
    if pos < pct_start:
        return sched_cos(start, middle, pos / pct_start)
    return sched_cos(middle, end, (pos - pct_start) / (1 - pct_start))


def one_cycle_lr(pos: float, lr_max: float, pct_start: float, div: float = DIV, div_final: float = DIV_FINAL) -> float:
    return two_phase(pos, pct_start, lr_max / div, lr_max, lr_max / div_final)


def one_cycle_mom(pos: float, pct_start: float, moms: tuple[float, float, float] = MOMS) -> float:
    return two_phase(pos, pct_start, *moms)


def even_mults(start: float, stop: float, n: int) -> list[float]:
    """``n`` values from ``start`` to ``stop``, evenly spaced on a log scale."""
    if n == 1:
        return [stop]
    step = (stop / start) ** (1 / (n - 1))
    return [start * step**i for i in range(n)]


def discriminative_lrs(lo: float, hi: float, n_groups: int) -> list[float]:
    """fastai ``slice(lo, hi)``: geometric from ``lo`` (first group) to ``hi`` (head)."""
    return even_mults(lo, hi, n_groups)


def exp_lr(pos: float, start_lr: float, end_lr: float) -> float:
    """LR range test: exponential growth from ``start_lr`` (pos=0) to ``end_lr`` (pos=1)."""
    return start_lr * (end_lr / start_lr) ** pos


class OneCycle:
    """Sets each param group's LR and beta1 from the one-cycle formulas at every step."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_max: list[float], total_steps: int, pct_start: float):
        if len(lr_max) != len(optimizer.param_groups):
            raise ValueError(f"{len(lr_max)} learning rates for {len(optimizer.param_groups)} parameter groups")
        self.optimizer, self.lr_max, self.total_steps, self.pct_start = (
            optimizer,
            lr_max,
            max(total_steps, 1),
            pct_start,
        )
        self.step_num = 0

    def apply(self) -> None:
        """Set the hyper-parameters for the coming step."""
        pos = min(self.step_num / self.total_steps, 1.0)
        mom = one_cycle_mom(pos, self.pct_start)
        for group, lr_max in zip(self.optimizer.param_groups, self.lr_max):
            group["lr"] = one_cycle_lr(pos, lr_max, self.pct_start)
            group["betas"] = (mom, group["betas"][1])

    def step(self) -> None:
        self.step_num += 1
