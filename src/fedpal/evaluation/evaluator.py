"""Evaluate an algorithm's models under the one protocol of DESIGN §5.

- personalized: each client's personalized model on its own test split (weighted, unweighted, std, worst 10%,
  macro-F1 averaged over clients), and on its own validation split (the loss that selects the round);
- generalization: each client's model on a fixed, seeded, class-stratified sample of the pooled test data,
  excluding its own samples by default (FedMosaic's "Others"), or including them (FedAli's definition);
- global: the global model on the whole pooled test set, for methods that have one.
A model shared by all clients (FedAvg) is run once on the pooled data and sliced per client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from fedpal.algorithms.base import Algorithm, ClientState, ClientView, ServerState, derive_seed
from fedpal.config import EvalConfig
from fedpal.data.federated import FederatedData, stratified_subsample
from fedpal.evaluation.metrics import macro_f1, summarize_clients


@dataclass
class _Outcome:
    """Predictions and summed loss of one model on one client's split."""

    predictions: np.ndarray
    losses: np.ndarray  # per-sample cross-entropy

    @property
    def loss_sum(self) -> float:
        return float(self.losses.sum())


class Evaluator:
    def __init__(self, data: FederatedData, cfg: EvalConfig, seed: int) -> None:
        self.data = data
        self.cfg = cfg
        self.num_classes = data.num_classes
        self.test_x = torch.cat([c.test_x for c in data.clients])
        self.test_y = torch.cat([c.test_y for c in data.clients])
        self.val_x = torch.cat([c.val_x for c in data.clients])
        self.val_y = torch.cat([c.val_y for c in data.clients])
        self.test_owner = np.concatenate([np.full(c.test_y.shape[0], i) for i, c in enumerate(data.clients)])
        self.val_owner = np.concatenate([np.full(c.val_y.shape[0], i) for i, c in enumerate(data.clients)])
        self.test_sizes = np.array([c.test_y.shape[0] for c in data.clients])
        self.val_sizes = np.array([c.val_y.shape[0] for c in data.clients])
        rng = np.random.default_rng(derive_seed(seed, "generalization-sample"))
        sample = stratified_subsample(self.test_y.numpy(), cfg.generalization_samples, rng)
        self.gen_index = torch.from_numpy(sample)
        self.gen_owner = self.test_owner[sample]
        self.gen_y = self.test_y.numpy()[sample]
        self.gen_x = self.test_x[self.gen_index]
        n = data.num_clients
        if 0 < cfg.generalization_clients < n:
            crng = np.random.default_rng(derive_seed(seed, "generalization-clients"))
            self.gen_clients = np.sort(crng.choice(n, cfg.generalization_clients, replace=False))
        else:
            self.gen_clients = np.arange(n)

    # ---- helpers
    @staticmethod
    def _outcome(scores: torch.Tensor, y: torch.Tensor) -> _Outcome:
        losses = F.cross_entropy(scores, y, reduction="none") if y.numel() else torch.zeros(0)
        return _Outcome(scores.argmax(dim=1).numpy(), losses.numpy())

    def _generalization(self, client: int, predictions: np.ndarray) -> tuple[float, float]:
        mask = (
            np.ones_like(self.gen_owner, dtype=bool)
            if self.cfg.generalization_include_own
            else (self.gen_owner != client)
        )
        if not mask.any():
            return float("nan"), float("nan")
        preds, labels = predictions[mask], self.gen_y[mask]
        return float((preds == labels).mean()), macro_f1(preds, labels, self.num_classes)

    # ---- the protocol
    def evaluate(
        self,
        algorithm: Algorithm,
        server: ServerState,
        client_states: dict[int, ClientState],
        view: Callable[[int], ClientView],
    ) -> dict[str, object]:
        n = self.data.num_clients
        modes = algorithm.inference_modes()
        primary = modes[0]
        correct = {mode: np.zeros(n) for mode in modes}
        test_loss: np.ndarray = np.zeros(n)
        val_correct: np.ndarray = np.zeros(n)
        val_loss: np.ndarray = np.zeros(n)
        f1 = np.full(n, np.nan)
        gen_acc: dict[str, dict[int, float]] = {mode: {} for mode in modes}
        gen_f1: dict[int, float] = {}
        global_params = algorithm.global_params(server)
        result: dict[str, object] = {}

        if algorithm.personalized_is_global:
            first = view(0)
            params = algorithm.personalized_params(first, client_states[0], server)
            test_scores = algorithm.predict_scores(first, client_states[0], server, params, self.test_x)
            val_scores = algorithm.predict_scores(first, client_states[0], server, params, self.val_x)
            test_labels, val_labels = self.test_y.numpy(), self.val_y.numpy()
            # The pooled test set is the clients' test splits back to back: client cid owns one slice of it.
            bounds = np.concatenate([[0], np.cumsum(self.test_sizes)])
            for mode in modes:
                test = self._outcome(test_scores[mode], self.test_y)
                hit = test.predictions == test_labels
                correct[mode] = np.bincount(self.test_owner, hit, minlength=n).astype(float)
                gen_predictions = test.predictions[self.gen_index.numpy()]
                for cid in self.gen_clients:
                    acc, f1_gen = self._generalization(int(cid), gen_predictions)
                    gen_acc[mode][int(cid)] = acc
                    if mode == primary:
                        gen_f1[int(cid)] = f1_gen
                if mode != primary:
                    continue
                val = self._outcome(val_scores[mode], self.val_y)
                test_loss = np.bincount(self.test_owner, test.losses, minlength=n)
                val_correct = np.bincount(self.val_owner, val.predictions == val_labels, minlength=n)
                val_loss = np.bincount(self.val_owner, val.losses, minlength=n)
                for cid in range(n):
                    lo, hi = bounds[cid], bounds[cid + 1]
                    if hi > lo:
                        f1[cid] = macro_f1(test.predictions[lo:hi], test_labels[lo:hi], self.num_classes)
                if global_params is not None:
                    result["global"] = {
                        "accuracy": float(hit.mean()),
                        "macro_f1": macro_f1(test.predictions, test_labels, self.num_classes),
                    }
        else:
            gen_set = set(self.gen_clients.tolist())
            for cid, client in enumerate(self.data.clients):
                client_view = view(cid)
                state = client_states[cid]
                params = algorithm.personalized_params(client_view, state, server)
                test_scores = algorithm.predict_scores(client_view, state, server, params, client.test_x)
                labels = client.test_y.numpy()
                gen_scores = (
                    algorithm.predict_scores(client_view, state, server, params, self.gen_x) if cid in gen_set else {}
                )
                for mode in modes:
                    test = self._outcome(test_scores[mode], client.test_y)
                    correct[mode][cid] = (test.predictions == labels).sum()
                    if mode == primary:
                        test_loss[cid] = test.loss_sum
                        if labels.size:
                            f1[cid] = macro_f1(test.predictions, labels, self.num_classes)
                    if gen_scores:
                        acc, f1_gen = self._generalization(cid, gen_scores[mode].argmax(dim=1).numpy())
                        gen_acc[mode][cid] = acc
                        if mode == primary:
                            gen_f1[cid] = f1_gen
                val_scores = algorithm.predict_scores(client_view, state, server, params, client.val_x)
                val = self._outcome(val_scores[primary], client.val_y)
                val_correct[cid] = (val.predictions == client.val_y.numpy()).sum()
                val_loss[cid] = val.loss_sum
            if global_params is not None:
                first = view(0)
                scores = algorithm.predict_scores(first, client_states[0], server, global_params, self.test_x)
                test = self._outcome(scores[primary], self.test_y)
                labels = self.test_y.numpy()
                result["global"] = {
                    "accuracy": float((test.predictions == labels).mean()),
                    "macro_f1": macro_f1(test.predictions, labels, self.num_classes),
                }
        if len(modes) > 1:
            by_mode: dict[str, object] = {}
            for mode in modes:
                summary = summarize_clients(correct[mode], self.test_sizes.astype(float))
                accs = np.array([v for v in gen_acc[mode].values() if np.isfinite(v)])
                by_mode[mode] = {
                    "personalized_accuracy": summary["accuracy"],
                    "personalized_unweighted": summary["accuracy_unweighted"],
                    "generalization_accuracy": float(accs.mean()) if accs.size else float("nan"),
                }
            result["inference"] = {"primary": primary, **by_mode}
        diagnostics = algorithm.diagnostics(server, client_states)
        if diagnostics:
            result["diagnostics"] = diagnostics
        correct_primary = correct[primary]
        gen_primary = gen_acc[primary]

        personalized: dict[str, object] = dict(summarize_clients(correct_primary, self.test_sizes.astype(float)))
        personalized["macro_f1"] = float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan")
        personalized["loss"] = float(test_loss.sum() / max(self.test_sizes.sum(), 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            per_client = np.where(self.test_sizes > 0, correct_primary / np.maximum(self.test_sizes, 1), np.nan)
        personalized["per_client_accuracy"] = [round(float(a), 6) for a in per_client]
        personalized["per_client_samples"] = self.test_sizes.tolist()
        result["personalized"] = personalized
        result["validation"] = {
            "loss": float(val_loss.sum() / max(self.val_sizes.sum(), 1)) if self.val_sizes.sum() else float("nan"),
            "accuracy": float(val_correct.sum() / max(self.val_sizes.sum(), 1))
            if self.val_sizes.sum()
            else float("nan"),
        }
        accs = np.array([v for v in gen_primary.values() if np.isfinite(v)])
        f1s = np.array([v for v in gen_f1.values() if np.isfinite(v)])
        result["generalization"] = {
            "accuracy": float(accs.mean()) if accs.size else float("nan"),
            "macro_f1": float(f1s.mean()) if f1s.size else float("nan"),
            "accuracy_std": float(accs.std()) if accs.size else float("nan"),
            "include_own": self.cfg.generalization_include_own,
            "samples": int(self.gen_index.numel()),
        }
        return result
