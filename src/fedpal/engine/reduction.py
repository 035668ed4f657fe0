"""The engine's one reduction point: every average of client values in every method goes through here.

Methods receive a ``reduce`` callable in ``aggregate`` (see ``fedpal.algorithms.core.contract.Reduce``); the
engine configures it once per run, so a robust aggregator, clipping or noise added here acts for all methods.
Today's reducer is the weighted mean (sample-weighted when the method passes sample counts).

The mean is a fold (``mean_fold.py``): sum w_i * x_i in float64, client by client in ascending id order, then
divide by sum w_i and cast back. The order is fixed, so the result is the same whether the replies are all held
(``weighted_mean``) or folded one by one as they arrive (``streamed_reduction.py``), which keeps a round's memory
flat in the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from fedpal.algorithms.core import prototypes as protos
from fedpal.algorithms.core.contract import ClassUpload, ReduceKind
from fedpal.common.tensors import Tensors
from fedpal.config import AggregationConfig
from fedpal.engine.mean_fold import weighted_mean
from fedpal.engine.streamed_reduction import folded_mean
from fedpal.robustness.class_wise import class_wise
from fedpal.robustness.rule import build_rule


class MeanReducer:
    """The default reducer: the weighted mean over clients in ascending id order (uniform without weights).

    ``streams``: the driver may fold a method's declared reply field as replies arrive (``streamed_reduction``);
    the reducer then returns that fold's mean when ``aggregate`` asks for it. A reducer that needs every reply at
    once (a median, a trimmed mean) says False.
    """

    streams = True

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}  # how many reductions of each kind ran (for tests and diagnostics)

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        *,
        kind: ReduceKind = "update",
        reference: Tensors | None = None,
    ) -> Tensors:
        if not parts:
            raise ValueError("nothing to reduce")
        if weights is not None and set(weights) != set(parts):
            raise ValueError("reduce: weights must name exactly the clients of parts")
        self.calls[kind] = self.calls.get(kind, 0) + 1
        folded = folded_mean(parts, weights)
        if folded is not None:
            return folded
        ids = sorted(parts)
        return weighted_mean([(parts[c], 1.0 if weights is None else float(weights[c])) for c in ids])

    def prototypes(
        self, uploads: Mapping[int, ClassUpload], weighting: Literal["uniform", "samples"]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-class mean over the holders of each class, clients in ascending id order."""
        self.calls["prototypes"] = self.calls.get("prototypes", 0) + 1
        return protos.average([uploads[c] for c in sorted(uploads)], weighting)


class RobustReducer(MeanReducer):
    """A robust rule (``fedpal.robustness``) at the reduction point: model updates go through
    ``aggregation.rule`` as deltas from the reference the clients started from, prototype payloads through
    ``aggregation.prototype_rule`` per class over the clients that reported it; other statistics (banks, counts)
    keep the weighted mean. It needs every reply of a round at once, so nothing is folded as replies arrive."""

    streams = False

    def __init__(self, settings: AggregationConfig) -> None:
        super().__init__()
        self.settings = settings
        by_rule: dict[str, dict[str, Any]] = {
            "trimmed_mean": {"beta": settings.beta},
            "krum": {"f": settings.byzantine},
            "multikrum": {"f": settings.byzantine, "m": settings.select or None},
            "bulyan": {"f": settings.byzantine},
            "norm_bound": {"C": settings.norm_bound},
        }
        self.rule = build_rule(settings.rule, **by_rule.get(settings.rule, {}))

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        *,
        kind: ReduceKind = "update",
        reference: Tensors | None = None,
    ) -> Tensors:
        if kind != "update" or self.settings.rule == "mean":
            return super().__call__(parts, weights, kind=kind, reference=reference)
        if not parts:
            raise ValueError("nothing to reduce")
        self.calls[kind] = self.calls.get(kind, 0) + 1
        return self.rule(parts, weights, reference)

    def prototypes(
        self, uploads: Mapping[int, ClassUpload], weighting: Literal["uniform", "samples"]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rule = self.settings.prototype_rule
        if rule == "mean":
            return super().prototypes(uploads, weighting)
        self.calls["prototypes"] = self.calls.get("prototypes", 0) + 1
        parts = {
            cid: {int(k): p[k] for k in torch.nonzero(held).flatten().tolist()} for cid, (p, held, _) in uploads.items()
        }
        counts = {cid: {int(k): float(n[k]) for k in parts[cid]} for cid, (_, _, n) in uploads.items()}
        reduced = class_wise(rule, parts, counts if weighting == "samples" else None, beta=self.settings.beta)
        first, _, _ = next(iter(uploads.values()))
        mean = torch.zeros_like(first)
        present = torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
        for k, value in reduced.items():
            mean[k], present[k] = value, True
        return mean, present


def build_reducer(settings: AggregationConfig) -> MeanReducer:
    """The run's reducer: today's weighted mean unless a robust rule is configured."""
    if settings.rule == "mean" and settings.prototype_rule == "mean":
        return MeanReducer()
    return RobustReducer(settings)
