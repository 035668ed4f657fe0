"""A client's evaluation summed up where its data live: the numbers the evaluator needs, not the scores.

On an engine whose clients run on other machines (Flower), a client scores its personalized model on its own test
and validation splits and sends counts and sums: correct predictions per inference mode, the summed cross-entropy,
its macro-F1, per-task accuracies on a task stream, and, when the server asks, the global model's correct count and
confusion matrix (their sums over clients give the pooled global accuracy and macro-F1 exactly). The evaluator turns
reports into the same sections as scores (``Evaluator.evaluate_reports``); the generalization probe, which needs
other clients' test data, is not part of a report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

from fedpal.algorithms.core.contract import Algorithm, ClientState, ClientView, Payload
from fedpal.common.tensors import Tensors
from fedpal.data.client_data import ClientData
from fedpal.evaluation.client_side import host_tensors, predict_client
from fedpal.evaluation.metrics import macro_f1


@dataclass
class Outcome:
    """Predictions and per-sample cross-entropy of one model on one split (on the CPU)."""

    predictions: np.ndarray
    losses: np.ndarray

    @property
    def loss_sum(self) -> float:
        return float(self.losses.sum())


def outcome(scores: torch.Tensor, labels: torch.Tensor) -> Outcome:
    """Scores [n, C] against labels, as every evaluation path computes them."""
    losses = (
        F.cross_entropy(scores, labels, reduction="none") if labels.numel() else torch.zeros(0, device=labels.device)
    )
    return Outcome(scores.argmax(dim=1).numpy(), losses.numpy())


def confusion(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


@dataclass
class ClientReport:
    """One client's evaluation in numbers (see the module docstring); lists so that it travels as plain values."""

    test_size: int
    correct: dict[str, float]  # per inference mode, on the client's own test split
    loss_sum: float  # primary mode, own test split
    macro_f1: float  # primary mode, own test split (NaN without test samples)
    val_size: int
    val_correct: float
    val_loss_sum: float
    task_accuracy: list[float] | None = None  # per task of a task stream, own test split (NaN: no sample)
    global_correct: float | None = None  # the global model on the own test split
    global_confusion: list[int] | None = None  # flattened [C, C]
    diagnostics: dict[str, float] | None = None  # the method's numbers of the client's state (client_diagnostics)
    backdoor_hits: int | None = None  # a benign client's triggered samples predicted as the target (a backdoor run)
    backdoor_samples: int | None = None  # and how many triggered samples it has

    def as_message(self) -> dict[str, object]:
        return asdict(self)


def report_client(
    algorithm: Algorithm,
    view: ClientView,
    state: ClientState,
    payload: Payload,
    own: ClientData,
    num_classes: int,
    label_tasks: list[int] | None = None,
    personalized_is_global: bool = False,
) -> ClientReport:
    """Score the client's personalized model on its own splits and sum it up; when that model is the global one
    (``personalized_is_global``), its score is also the report's global score."""
    modes = algorithm.inference_modes()
    scores = predict_client(algorithm, view, state, payload, own.test_x, own.val_x, None)
    test_y, val_y = own.test_y.cpu(), own.val_y.cpu()
    labels = test_y.numpy()
    outcomes = {mode: outcome(scores.test[mode], test_y) for mode in modes}
    primary = outcomes[modes[0]]
    val = outcome(scores.val, val_y)
    report = ClientReport(
        test_size=int(labels.size),
        correct={mode: float((outcomes[mode].predictions == labels).sum()) for mode in modes},
        loss_sum=primary.loss_sum,
        macro_f1=macro_f1(primary.predictions, labels, num_classes),
        val_size=int(val_y.numel()),
        val_correct=float((val.predictions == val_y.numpy()).sum()),
        val_loss_sum=val.loss_sum,
        diagnostics=algorithm.client_diagnostics(state),
    )
    if label_tasks:
        task_of = np.asarray(label_tasks, dtype=np.int64)
        tasks = task_of[labels]
        counts = np.bincount(tasks, minlength=int(task_of.max()) + 1)
        hits = np.bincount(tasks, (primary.predictions == labels).astype(float), minlength=counts.size)
        with np.errstate(invalid="ignore", divide="ignore"):
            report.task_accuracy = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan).tolist()
    if personalized_is_global:  # the evaluator sums a shared model's losses per client in float64 (bincount)
        report.loss_sum = float(np.bincount(np.zeros(primary.losses.size, np.int64), primary.losses, minlength=1)[0])
        report.val_loss_sum = float(np.bincount(np.zeros(val.losses.size, np.int64), val.losses, minlength=1)[0])
        report.global_correct = report.correct[modes[0]]
        report.global_confusion = confusion(primary.predictions, labels, num_classes).reshape(-1).tolist()
    return report


def report_global(
    algorithm: Algorithm,
    holder: ClientView,
    payload: Payload,
    params: Tensors,
    own: ClientData,
    num_classes: int,
    report: ClientReport,
) -> None:
    """Add the global model's score on the client's own test split to ``report``: the model held by a fresh
    ``holder`` (client 0, with its evaluation ``payload``, as the evaluator scores the global model)."""
    fresh = algorithm.init_client(holder)
    scores = algorithm.predict_scores(holder, fresh, payload, params, own.test_x)[algorithm.inference_modes()[0]]
    (host,) = host_tensors([scores])
    labels = own.test_y.cpu()
    predicted = outcome(host, labels).predictions
    report.global_correct = float((predicted == labels.numpy()).sum())
    report.global_confusion = confusion(predicted, labels.numpy(), num_classes).reshape(-1).tolist()
