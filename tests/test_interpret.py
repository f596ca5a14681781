import numpy as np
import pytest
import torch

from petpipe.engine import classification_metrics
from petpipe.interpret import Interpretation, confusion_matrix, most_confused, per_class_metrics, top_losses

CLASSES = ["cat", "dog", "fox"]
TARGETS = np.array([0, 0, 0, 1, 1, 2, 2, 2])
PREDS = np.array([0, 1, 1, 1, 0, 2, 2, 0])


def test_confusion_rows_are_actual_columns_predicted():
    cm = confusion_matrix(TARGETS, PREDS, 3)
    assert cm.tolist() == [[1, 2, 0], [1, 1, 0], [1, 0, 2]]


def test_most_confused_sorted_by_count():
    cm = confusion_matrix(TARGETS, PREDS, 3)
    assert most_confused(cm, CLASSES) == [("cat", "dog", 2), ("dog", "cat", 1), ("fox", "cat", 1)]
    assert most_confused(cm, CLASSES, min_count=2) == [("cat", "dog", 2)]


def test_per_class_metrics_by_hand():
    rows = {r["class"]: r for r in per_class_metrics(confusion_matrix(TARGETS, PREDS, 3), CLASSES)}
    assert rows["cat"]["precision"] == pytest.approx(1 / 3) and rows["cat"]["recall"] == pytest.approx(1 / 3)
    assert rows["dog"]["precision"] == pytest.approx(1 / 3) and rows["dog"]["recall"] == pytest.approx(1 / 2)
    assert rows["fox"]["precision"] == pytest.approx(1.0) and rows["fox"]["recall"] == pytest.approx(2 / 3)
    assert rows["fox"]["f1"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3)) and rows["fox"]["support"] == 3


def test_class_never_predicted_has_zero_precision_not_nan():
    rows = per_class_metrics(confusion_matrix(np.array([0, 1]), np.array([0, 0]), 2), ["a", "b"])
    assert rows[1]["precision"] == 0.0 and rows[1]["f1"] == 0.0


def test_interpretation_losses_and_top_losses():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [4.0, 0.0]])
    targets = torch.tensor([0, 1, 1])
    interp = Interpretation.from_logits(logits, targets)
    assert interp.losses[2] == pytest.approx(-np.log(np.exp(0) / (np.exp(4) + 1)), rel=1e-5)
    assert top_losses(interp.losses, 2).tolist()[0] == 2
    metrics = classification_metrics(logits, targets)
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["error_rate"] == pytest.approx(1 / 3)
    assert metrics["valid_loss"] == pytest.approx(float(interp.losses.mean()), rel=1e-6)
