"""Metric arithmetic on predictions and per-client counts; pure numpy so it can be checked by hand."""

from __future__ import annotations

import math

import numpy as np


def macro_f1(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions (scikit-learn's rule)."""
    if labels.size == 0:
        return float("nan")
    confusion = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )
    return macro_f1_of_confusion(confusion)


def macro_f1_of_confusion(confusion: np.ndarray) -> float:
    """``macro_f1`` from counts [true class, predicted class]: confusions of parts of a set add up to the set's."""
    if confusion.sum() == 0:
        return float("nan")
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean())


def worst_fraction_mean(values: np.ndarray, fraction: float = 0.1) -> float:
    """Mean of the lowest ceil(fraction * n) values: the worst 10% of clients by default."""
    if values.size == 0:
        return float("nan")
    k = max(1, math.ceil(fraction * values.size))
    return float(np.sort(values)[:k].mean())


def summarize_clients(correct: np.ndarray, total: np.ndarray) -> dict[str, float]:
    """Sample-weighted accuracy (sum correct / sum samples, as PFLlib reports), unweighted mean, std, worst 10%.

    Clients with no test samples are left out of the per-client statistics.
    """
    has = total > 0
    per_client = correct[has] / total[has]
    return {
        "accuracy": float(correct.sum() / max(total.sum(), 1)),
        "accuracy_unweighted": float(per_client.mean()) if per_client.size else float("nan"),
        "accuracy_std": float(per_client.std()) if per_client.size else float("nan"),
        "accuracy_worst10": worst_fraction_mean(per_client),
    }
