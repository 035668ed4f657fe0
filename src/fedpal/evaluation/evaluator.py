"""Evaluate an algorithm's models under the one protocol of DESIGN §5.

- personalized: each client's personalized model on its own test split (weighted, unweighted, std, worst 10%,
  macro-F1 averaged over clients), and on its own validation split (the loss that selects the round);
- generalization: each client's model on a fixed, seeded, class-stratified sample of the pooled test data,
  over two pools from the same predictions: without its own samples (FedMosaic's "Others") and with them
  (FedAli's definition); eval.generalization_include_own picks the headline one;
- global: the global model on the whole pooled test set, for methods that have one;
- unseen (``evaluate_unseen``): held-out clients after the method's adaptation, and the global model zero-shot.
A model shared by all clients (FedAvg) is run once on the pooled data and sliced per client.

Inputs stay on the data's device (``run.device``), where models score them; scores and labels meet on the CPU,
where the summaries are numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from fedpal.algorithms.core.contract import Algorithm, ClientState, ClientView, Payload, ServerState
from fedpal.common.seeding import derive_seed
from fedpal.common.tensors import Tensors
from fedpal.config import EvalConfig
from fedpal.data.client_data import FederatedData
from fedpal.data.subsample import stratified_subsample
from fedpal.evaluation.client_report import ClientReport, Outcome, outcome
from fedpal.evaluation.client_side import ClientPredictions, host_tensors, predict_client
from fedpal.evaluation.metrics import macro_f1, macro_f1_of_confusion, summarize_clients
from fedpal.evaluation.task_breakdown import TaskBreakdown


class _OwnTest:
    """Per-client results of one model per client on its own test split, per inference mode.

    Shared by the personalized section and the unseen clients, so both are summarised by the same rules.
    """

    def __init__(self, modes: tuple[str, ...], sizes: np.ndarray, num_classes: int) -> None:
        self.modes = modes
        self.sizes = sizes
        self.num_classes = num_classes
        self.correct = {mode: np.zeros(sizes.size) for mode in modes}
        self.loss: np.ndarray = np.zeros(sizes.size)  # summed cross-entropy of the primary mode
        self.f1 = np.full(sizes.size, np.nan)  # macro-F1 of the primary mode

    def record(self, i: int, outcomes: dict[str, Outcome], labels: np.ndarray) -> None:
        for mode in self.modes:
            self.correct[mode][i] = (outcomes[mode].predictions == labels).sum()
        primary = outcomes[self.modes[0]]
        self.loss[i] = primary.loss_sum
        if labels.size:
            self.f1[i] = macro_f1(primary.predictions, labels, self.num_classes)

    def summary(self) -> dict[str, object]:
        """The primary mode: accuracies (summarize_clients), macro-F1 averaged over clients, loss, per client."""
        correct = self.correct[self.modes[0]]
        out: dict[str, object] = dict(summarize_clients(correct, self.sizes.astype(float)))
        out["macro_f1"] = float(np.nanmean(self.f1)) if np.isfinite(self.f1).any() else float("nan")
        out["loss"] = float(self.loss.sum() / max(self.sizes.sum(), 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            per_client = np.where(self.sizes > 0, correct / np.maximum(self.sizes, 1), np.nan)
        out["per_client_accuracy"] = [round(float(a), 6) for a in per_client]
        out["per_client_samples"] = self.sizes.tolist()
        return out

    def by_mode(self, mode: str) -> dict[str, float]:
        summary = summarize_clients(self.correct[mode], self.sizes.astype(float))
        return {"personalized_accuracy": summary["accuracy"], "personalized_unweighted": summary["accuracy_unweighted"]}


def _finite(values: Iterable[float]) -> np.ndarray:
    return np.array([v for v in values if np.isfinite(v)])


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


# Scores of one model (params, the state and payload it is evaluated with) on pooled inputs, per inference mode.
Scorer = Callable[[Tensors, ClientState, Payload, torch.Tensor], dict[str, torch.Tensor]]

# The generalization pools: the other clients' samples only ("others"), and every client's ("all").
POOLS = ("others", "all")


def _on_host(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores per inference mode on the CPU (one copy from a device)."""
    return dict(zip(scores, host_tensors(list(scores.values())), strict=True))


class Evaluator:
    def __init__(
        self, data: FederatedData, cfg: EvalConfig, seed: int, malicious: frozenset[int] = frozenset()
    ) -> None:
        self.data = data
        self.malicious = malicious  # an [attack]'s clients: the personalized section also summarises the others
        self.cfg = cfg
        self.num_classes = data.num_classes
        # Inputs on the data's device (central scoring and the probe run there); labels on the CPU, once.
        self.test_x = torch.cat([c.test_x for c in data.clients])
        self.test_y = torch.cat([c.test_y for c in data.clients]).cpu()
        self.val_x = torch.cat([c.val_x for c in data.clients])
        self.val_y = torch.cat([c.val_y for c in data.clients]).cpu()
        self.labels = [(c.test_y.cpu(), c.val_y.cpu()) for c in data.clients]  # (test, val) per client
        self.unseen_test_y = [c.test_y.cpu() for c in data.unseen]
        self.test_owner = np.concatenate([np.full(c.test_y.shape[0], i) for i, c in enumerate(data.clients)])
        self.val_owner = np.concatenate([np.full(c.val_y.shape[0], i) for i, c in enumerate(data.clients)])
        self.test_sizes = np.array([c.test_y.shape[0] for c in data.clients])
        self.val_sizes = np.array([c.val_y.shape[0] for c in data.clients])
        rng = np.random.default_rng(derive_seed(seed, "generalization-sample"))
        sample = stratified_subsample(self.test_y.numpy(), cfg.generalization_samples, rng)
        self.gen_index = torch.from_numpy(sample)
        self.gen_owner = self.test_owner[sample]
        self.gen_y = self.test_y.numpy()[sample]
        self.gen_x = self.test_x[self.gen_index.to(self.test_x.device)]
        n = data.num_clients
        if 0 < cfg.generalization_clients < n:
            crng = np.random.default_rng(derive_seed(seed, "generalization-clients"))
            self.gen_clients = np.sort(crng.choice(n, cfg.generalization_clients, replace=False))
        else:
            self.gen_clients = np.arange(n)
        self.gen_set = set(self.gen_clients.tolist())

    @staticmethod
    def direct_scorer(algorithm: Algorithm, view: Callable[[int], ClientView]) -> Scorer:
        """Scores of one model on pooled inputs, computed in this process on client 0's module."""

        def score(params: Tensors, state: ClientState, payload: Payload, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return algorithm.predict_scores(view(0), state, payload, params, x)

        return score

    def probe(self, cid: int) -> torch.Tensor | None:
        """The generalization sample, for the clients whose generalization is measured (None for the others)."""
        return self.gen_x if cid in self.gen_set else None

    # ---- helpers
    def _outcomes(
        self,
        algorithm: Algorithm,
        client_view: ClientView,
        state: ClientState,
        payload: Payload,
        params: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> dict[str, Outcome]:
        """One model's outcome on (x, y) in every inference mode of the algorithm."""
        scores = _on_host(algorithm.predict_scores(client_view, state, payload, params, x))
        return {mode: outcome(scores[mode], y) for mode in algorithm.inference_modes()}

    def _generalization(self, client: int, predictions: np.ndarray) -> dict[str, tuple[float, float]]:
        """Accuracy and macro-F1 of one client's predictions on the sample, in both pools: "others" leaves the
        client's own samples out, "all" keeps them. One set of predictions serves both."""
        masks = {"others": self.gen_owner != client, "all": np.ones_like(self.gen_owner, dtype=bool)}
        pools = {}
        for pool, mask in masks.items():
            if not mask.any():
                pools[pool] = (float("nan"), float("nan"))
                continue
            preds, labels = predictions[mask], self.gen_y[mask]
            pools[pool] = (float((preds == labels).mean()), macro_f1(preds, labels, self.num_classes))
        return pools

    # ---- the protocol
    def evaluate(
        self,
        algorithm: Algorithm,
        server: ServerState,
        client_states: dict[int, ClientState],
        payloads: dict[int, Payload],
        view: Callable[[int], ClientView],
        predictions: Mapping[int, ClientPredictions] | Iterable[tuple[int, ClientPredictions]] | None = None,
        scorer: Scorer | None = None,
    ) -> dict[str, object]:
        """Every client's personalized model (from its own state and its evaluation payload) under the protocol;
        the global model (``global_params`` of the server) as a fresh client holding it.

        ``predictions``: the clients' own scores (``predict_client``, run by the engine's executor wherever client
        work runs), by client id or as (id, scores) pairs that are consumed one at a time (the engine streams them,
        so it never holds every client's scores); without them they are computed here on ``view``. A model shared by
        all clients is run once on the pooled data, through ``scorer`` (the engine spreads its chunks over its
        workers) or here."""
        score = scorer or self.direct_scorer(algorithm, view)
        n = self.data.num_clients
        modes = algorithm.inference_modes()
        primary = modes[0]
        own = _OwnTest(modes, self.test_sizes, self.num_classes)
        tasks = TaskBreakdown(self.data.label_tasks, n, self.gen_y) if self.data.label_tasks else None
        val_correct: np.ndarray = np.zeros(n)
        val_loss: np.ndarray = np.zeros(n)
        # generalization per mode, per client, per pool: (accuracy, macro-F1)
        gen: dict[str, dict[int, dict[str, tuple[float, float]]]] = {mode: {} for mode in modes}
        global_params = algorithm.global_params(server)
        result: dict[str, object] = {}

        if algorithm.personalized_is_global:
            first = view(0)
            params = algorithm.personalized_params(first, client_states[0], payloads[0])
            test_scores = _on_host(score(params, client_states[0], payloads[0], self.test_x))
            val_scores = _on_host(score(params, client_states[0], payloads[0], self.val_x))
            test_labels, val_labels = self.test_y.numpy(), self.val_y.numpy()
            # The pooled test set is the clients' test splits back to back: client cid owns one slice of it.
            bounds = np.concatenate([[0], np.cumsum(self.test_sizes)])
            for mode in modes:
                test = outcome(test_scores[mode], self.test_y)
                hit = test.predictions == test_labels
                own.correct[mode] = np.bincount(self.test_owner, hit, minlength=n).astype(float)
                gen_predictions = test.predictions[self.gen_index.numpy()]
                for cid in self.gen_clients:
                    gen[mode][int(cid)] = self._generalization(int(cid), gen_predictions)
                if mode != primary:
                    continue
                if tasks is not None:  # one model: every client's row is the same model's
                    for cid in range(n):
                        lo, hi = bounds[cid], bounds[cid + 1]
                        tasks.record_own(cid, test.predictions[lo:hi], test_labels[lo:hi])
                    for cid in self.gen_clients:
                        tasks.record_sample(int(cid), gen_predictions, self.gen_y)
                val = outcome(val_scores[mode], self.val_y)
                own.loss = np.bincount(self.test_owner, test.losses, minlength=n)
                val_correct = np.bincount(self.val_owner, val.predictions == val_labels, minlength=n)
                val_loss = np.bincount(self.val_owner, val.losses, minlength=n)
                for cid in range(n):
                    lo, hi = bounds[cid], bounds[cid + 1]
                    if hi > lo:
                        own.f1[cid] = macro_f1(test.predictions[lo:hi], test_labels[lo:hi], self.num_classes)
                if global_params is not None:
                    result["global"] = {
                        "accuracy": float(hit.mean()),
                        "macro_f1": macro_f1(test.predictions, test_labels, self.num_classes),
                    }
        else:
            if predictions is None:  # in this process, on the given views
                predictions = (
                    (
                        cid,
                        predict_client(
                            algorithm, view(cid), client_states[cid], payloads[cid], c.test_x, c.val_x, self.probe(cid)
                        ),
                    )
                    for cid, c in enumerate(self.data.clients)
                )
            seen = 0
            for cid, scores in predictions.items() if isinstance(predictions, Mapping) else predictions:
                test_y, val_y = self.labels[cid]
                seen += 1
                outcomes = {mode: outcome(scores.test[mode], test_y) for mode in modes}
                own.record(cid, outcomes, test_y.numpy())
                if tasks is not None:
                    tasks.record_own(cid, outcomes[primary].predictions, test_y.numpy())
                if scores.probe is not None:
                    for mode in modes:
                        gen[mode][cid] = self._generalization(cid, scores.probe[mode].argmax(dim=1).numpy())
                    if tasks is not None:
                        tasks.record_sample(cid, scores.probe[primary].argmax(dim=1).numpy(), self.gen_y)
                val = outcome(scores.val, val_y)
                val_correct[cid] = (val.predictions == val_y.numpy()).sum()
                val_loss[cid] = val.loss_sum
            if seen != n:
                raise ValueError(f"evaluation needs the scores of all {n} clients, got {seen}")
            if global_params is not None:
                fresh = algorithm.init_client(view(0))
                global_scores = _on_host(score(global_params, fresh, payloads[0], self.test_x))
                test_primary = outcome(global_scores[primary], self.test_y)
                labels = self.test_y.numpy()
                result["global"] = {
                    "accuracy": float((test_primary.predictions == labels).mean()),
                    "macro_f1": macro_f1(test_primary.predictions, labels, self.num_classes),
                }
        return self._sections(modes, own, val_correct, val_loss, gen, tasks, result)

    def evaluate_reports(
        self, algorithm: Algorithm, reports: Iterable[tuple[int, ClientReport]], expected: int
    ) -> dict[str, object]:
        """The protocol's sections from the clients' own reports (``client_report``), for an engine whose clients
        evaluate where their data live: personalized, validation and per-task figures equal those computed from
        scores; the generalization sample and the pooled probe need other clients' data and are left out (NaN,
        marked ``simulator_only``). A client that did not report (a node lost) counts as not evaluated: its
        per-client entries are NaN and it weighs nothing; ``evaluated_clients`` says how many did."""
        n = self.data.num_clients
        modes = algorithm.inference_modes()
        sizes = np.zeros(n, dtype=np.int64)
        val_sizes = np.zeros(n, dtype=np.int64)
        own = _OwnTest(modes, sizes, self.num_classes)
        tasks = TaskBreakdown(self.data.label_tasks, n, self.gen_y) if self.data.label_tasks else None
        val_correct, val_loss = np.zeros(n), np.zeros(n)
        global_correct, global_total, global_confusion = 0.0, 0, np.zeros((self.num_classes,) * 2, dtype=np.int64)
        has_global = True  # every report carries the global model's score
        reported = 0
        for cid, report in reports:
            reported += 1
            sizes[cid], val_sizes[cid] = report.test_size, report.val_size
            for mode in modes:
                own.correct[mode][cid] = report.correct[mode]
            own.loss[cid] = report.loss_sum
            own.f1[cid] = report.macro_f1
            val_correct[cid], val_loss[cid] = report.val_correct, report.val_loss_sum
            if tasks is not None and report.task_accuracy is not None:
                tasks.own[cid] = np.asarray(report.task_accuracy, dtype=float)
            if report.global_confusion is None:
                has_global = False
            else:
                global_correct += float(report.global_correct or 0.0)
                global_total += report.test_size
                global_confusion += np.asarray(report.global_confusion, dtype=np.int64).reshape(global_confusion.shape)
        result: dict[str, object] = {}
        if has_global and reported:
            result["global"] = {
                "accuracy": float(global_correct / max(global_total, 1)),
                "macro_f1": macro_f1_of_confusion(global_confusion),
            }
        gen: dict[str, dict[int, dict[str, tuple[float, float]]]] = {mode: {} for mode in modes}
        result = self._sections(modes, own, val_correct, val_loss, gen, tasks, result, val_sizes)
        generalization = result["generalization"]
        assert isinstance(generalization, dict)
        generalization.update(samples=0, simulator_only=True)
        result["evaluated_clients"] = reported
        if reported != expected:
            result["unevaluated_clients"] = expected - reported
        return result

    def _sections(
        self,
        modes: tuple[str, ...],
        own: _OwnTest,
        val_correct: np.ndarray,
        val_loss: np.ndarray,
        gen: dict[str, dict[int, dict[str, tuple[float, float]]]],
        tasks: TaskBreakdown | None,
        result: dict[str, object],
        val_sizes: np.ndarray | None = None,
    ) -> dict[str, object]:
        """The personalized, validation, generalization (and per-mode, per-task) sections from the tallies."""
        primary = modes[0]
        val_total = (self.val_sizes if val_sizes is None else val_sizes).sum()
        headline = "all" if self.cfg.generalization_include_own else "others"
        if len(modes) > 1:
            by_mode: dict[str, object] = {}
            for mode in modes:
                gen_accs = _finite(pools[headline][0] for pools in gen[mode].values())
                by_mode[mode] = {**own.by_mode(mode), "generalization_accuracy": _mean(gen_accs)}
            result["inference"] = {"primary": primary, **by_mode}
        result["personalized"] = own.summary()
        if self.malicious:  # what an attack costs the clients it did not control
            benign = np.array([c not in self.malicious for c in range(own.sizes.size)])
            result["benign"] = dict(summarize_clients(own.correct[primary][benign], own.sizes[benign].astype(float)))
        result["validation"] = {
            "loss": float(val_loss.sum() / max(val_total, 1)) if val_total else float("nan"),
            "accuracy": float(val_correct.sum() / max(val_total, 1)) if val_total else float("nan"),
        }
        by_pool = {
            pool: (
                _finite(pools[pool][0] for pools in gen[primary].values()),
                _finite(pools[pool][1] for pools in gen[primary].values()),
            )
            for pool in POOLS
        }
        accs, f1s = by_pool[headline]
        result["generalization"] = {
            "accuracy": _mean(accs),
            "macro_f1": _mean(f1s),
            "accuracy_std": float(accs.std()) if accs.size else float("nan"),
            "include_own": self.cfg.generalization_include_own,
            "samples": int(self.gen_index.numel()),
            **{pool: {"accuracy": _mean(a), "macro_f1": _mean(f)} for pool, (a, f) in by_pool.items()},
        }
        if tasks is not None:
            result["tasks"] = tasks.summary()
        return result

    def evaluate_unseen(
        self,
        algorithm: Algorithm,
        server: ServerState,
        adapted: dict[int, ClientState],
        payloads: dict[int, Payload],
        view: Callable[[int], ClientView],
        predictions: dict[int, ClientPredictions] | None = None,
    ) -> dict[str, object]:
        """The held-out clients (ids num_clients + j) on their own test splits: each one's personalized model after
        the method's adaptation (``adapted``: their states), and the global model zero-shot, for methods with one.

        Zero-shot runs the global model with a fresh client state: the model as the client receives it.
        """
        n = self.data.num_clients
        modes = algorithm.inference_modes()
        sizes = np.array([c.test_y.shape[0] for c in self.data.unseen])
        personalized = _OwnTest(modes, sizes, self.num_classes)
        zero_shot = _OwnTest(modes[:1], sizes, self.num_classes)
        global_params = algorithm.global_params(server)
        for j, (client, test_y) in enumerate(zip(self.data.unseen, self.unseen_test_y, strict=True)):
            client_view, state, payload = view(n + j), adapted[n + j], payloads[n + j]
            labels = test_y.numpy()
            own = (predictions or {}).get(n + j) or predict_client(
                algorithm, client_view, state, payload, client.test_x, client.val_x, None
            )
            personalized.record(j, {mode: outcome(own.test[mode], test_y) for mode in modes}, labels)
            if global_params is not None:
                fresh = algorithm.init_client(client_view)
                zero_shot.record(
                    j,
                    self._outcomes(algorithm, client_view, fresh, payload, global_params, client.test_x, test_y),
                    labels,
                )
        result: dict[str, object] = {
            "clients": len(self.data.unseen),
            "client_ids": list(self.data.unseen_ids),
            "personalized": personalized.summary(),
            "zero_shot": zero_shot.summary() if global_params is not None else None,
        }
        if len(modes) > 1:
            result["inference"] = {"primary": modes[0], **{mode: personalized.by_mode(mode) for mode in modes}}
        return result
