"""The engine's one reduction point: every average of client values in every method goes through here.

Methods receive a ``reduce`` callable in ``aggregate`` (see ``fedpal.algorithms.core.contract.Reduce``); the
engine configures it once per run, so a robust aggregator, clipping or noise added here acts for all methods.
Today's reducer is the weighted mean (sample-weighted when the method passes sample counts).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedpal.algorithms.core.contract import ReduceKind
from fedpal.common.tensors import Tensors


def weighted_mean(items: list[tuple[Tensors, float]]) -> Tensors:
    """Sum of w_i * params_i / sum of w_i, accumulated in place in the given order (no stacking of all replies)."""
    total = float(sum(w for _, w in items))
    if total <= 0:
        raise ValueError("a weighted mean needs a positive total weight")
    first, _ = items[0]
    out = {
        k: torch.zeros_like(v, dtype=torch.float32 if not v.is_floating_point() else v.dtype) for k, v in first.items()
    }
    for params, weight in items:
        for k, acc in out.items():
            acc.add_(params[k], alpha=weight / total)
    return {k: v.to(first[k].dtype) for k, v in out.items()}


class MeanReducer:
    """The default reducer: the weighted mean over clients in ascending id order (uniform without weights)."""

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
        ids = sorted(parts)
        return weighted_mean([(parts[c], 1.0 if weights is None else float(weights[c])) for c in ids])
