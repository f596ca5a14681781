"""Interpretation of validation predictions: confusion, most confused, top losses, top-k accuracy, per-class metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Interpretation:
    probs: np.ndarray  # (n, classes) softmax probabilities
    targets: np.ndarray  # (n,) true class indices
    losses: np.ndarray  # (n,) per-item cross-entropy

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> Interpretation:
        losses = nn.functional.cross_entropy(logits, targets, reduction="none")
        return cls(logits.softmax(1).numpy(), targets.numpy(), losses.numpy())


def top_k_accuracy(probs: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Share of items whose actual class is among the ``k`` most probable (equal probabilities: lower class index
    first)."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, : min(k, probs.shape[1])]
    return float((top == targets[:, None]).any(axis=1).mean())


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are actual classes, columns predicted ones."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (targets, preds), 1)
    return cm


def normalise_rows(cm: np.ndarray) -> np.ndarray:
    """Each row (actual class) divided by its total: the share of that class predicted as each class (0 where empty)."""
    totals = cm.sum(1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)


def most_confused_classes(cm: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the ``n`` classes with the most errors, as actual or as predicted class.

    The view of a confusion matrix too large to read: its rows and columns for these classes.
    Equal error counts: lower class index first.
    """
    off = cm.copy()
    np.fill_diagonal(off, 0)
    errors = off.sum(0) + off.sum(1)
    return np.sort(np.argsort(-errors, kind="stable")[:n])


def most_confused(cm: np.ndarray, classes: list[str], min_count: int = 1) -> list[tuple[str, str, int]]:
    """(actual, predicted, count) off the diagonal, most frequent first (fastai's ``most_confused``)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = [(classes[a], classes[p], int(off[a, p])) for a, p in zip(*np.nonzero(off >= min_count))]
    return sorted(pairs, key=lambda t: (-t[2], t[0], t[1]))


def top_losses(losses: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest losses, largest first."""
    return np.argsort(-losses, kind="stable")[:k]


def per_class_metrics(cm: np.ndarray, classes: list[str]) -> list[dict[str, float | int | str]]:
    """Precision, recall, F1 and support for each class (0 where undefined)."""
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return [
        {"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for c, p, r, f, s in zip(classes, precision, recall, f1, actual)
    ]
