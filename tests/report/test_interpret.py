import numpy as np
import pytest
import torch

from petpipe.report.interpret import (
    Interpretation,
    confusion_matrix,
    most_confused,
    most_confused_classes,
    normalise_rows,
    per_class_metrics,
    top_k_accuracy,
    top_losses,
)
from petpipe.train.engine import classification_metrics

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


def test_top_losses_largest_first_ties_in_item_order():
    losses = np.array([0.5, 2.0, 0.1, 2.0, 1.0])
    assert top_losses(losses, 3).tolist() == [1, 3, 4]
    assert top_losses(losses, 10).tolist() == [1, 3, 4, 0, 2]


# Ranks by hand: item 0 has its class 2nd, item 1 1st, item 2 4th (equal probabilities: lower index first), item 3 3rd.
PROBS = np.array([[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.05, 0.1, 0.8]])
PROB_TARGETS = np.array([2, 0, 3, 0])


@pytest.mark.parametrize(("k", "expected"), [(1, 1 / 4), (2, 2 / 4), (3, 3 / 4), (4, 1.0), (5, 1.0)])
def test_top_k_accuracy_by_hand(k, expected):
    assert top_k_accuracy(PROBS, PROB_TARGETS, k) == pytest.approx(expected)


def test_top_5_accuracy_with_more_classes_than_k():
    probs = np.array([[0.3, 0.25, 0.2, 0.15, 0.07, 0.03], [0.03, 0.07, 0.15, 0.2, 0.25, 0.3]])
    # item 0: class 5 is the least probable (6th); item 1: class 1 is 5th.
    assert top_k_accuracy(probs, np.array([5, 1]), 5) == pytest.approx(0.5)
    assert top_k_accuracy(probs, np.array([5, 1]), 1) == 0.0


def test_row_normalised_confusion_by_hand():
    shares = normalise_rows(confusion_matrix(TARGETS, PREDS, 3))
    np.testing.assert_allclose(shares, [[1 / 3, 2 / 3, 0], [1 / 2, 1 / 2, 0], [1 / 3, 0, 2 / 3]])
    assert normalise_rows(np.array([[0, 0], [1, 3]])).tolist() == [
        [0.0, 0.0],
        [0.25, 0.75],
    ]  # a class without images: zeros


def test_most_confused_classes_count_errors_as_actual_and_as_predicted():
    cm = confusion_matrix(TARGETS, PREDS, 3)  # errors: cat 2 + 2 = 4, dog 1 + 2 = 3, fox 1 + 0 = 1
    assert most_confused_classes(cm, 2).tolist() == [0, 1]
    assert most_confused_classes(cm, 1).tolist() == [0]
    assert most_confused_classes(np.eye(3, dtype=int), 2).tolist() == [0, 1]  # no errors: ties go to the lower index
