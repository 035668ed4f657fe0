"""Per-task accuracy of every client's personalized model, for federations that are task streams (FedMosaic).

The paper scores a client on its own tasks (Self) and on other clients' tasks (Others), every task counting
equally. The evaluator records, for each client and each task of the union label space, the accuracy on the
client's own test split and on the generalization sample (every client's test data); which tasks count as Self at a
round (those met so far) and as Others (tasks the client does not hold) is the report's choice, from the
federation's ``client_tasks`` and the round's ``tasks_seen``, so nothing here depends on the schedule.
"""

from __future__ import annotations

import numpy as np


class TaskBreakdown:
    """Accuracy per (client, task): on the client's own test split ("own") and on the generalization sample
    ("sample"); NaN where the client was not scored or the split holds no sample of the task."""

    def __init__(self, label_tasks: list[int], num_clients: int, sample_labels: np.ndarray) -> None:
        self.task_of = np.asarray(label_tasks, dtype=np.int64)
        self.num_tasks = int(self.task_of.max()) + 1
        self.sample_tasks = self.task_of[sample_labels]
        self.own = np.full((num_clients, self.num_tasks), np.nan)
        self.sample = np.full((num_clients, self.num_tasks), np.nan)

    def _per_task(self, hits: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        counts = np.bincount(tasks, minlength=self.num_tasks)
        correct = np.bincount(tasks, hits.astype(float), minlength=self.num_tasks)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)

    def record_own(self, cid: int, predictions: np.ndarray, labels: np.ndarray) -> None:
        self.own[cid] = self._per_task(predictions == labels, self.task_of[labels])

    def record_sample(self, cid: int, predictions: np.ndarray, labels: np.ndarray) -> None:
        self.sample[cid] = self._per_task(predictions == labels, self.sample_tasks)

    def summary(self) -> dict[str, list[list[float | None]]]:
        def rows(table: np.ndarray) -> list[list[float | None]]:
            return [[None if np.isnan(v) else float(v) for v in row] for row in table]

        return {"own": rows(self.own), "sample": rows(self.sample)}
