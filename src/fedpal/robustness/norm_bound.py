"""Norm bounding (Sun et al. 2019, "Can you really backdoor federated learning?"; FederatedScope's
``normbounding``): every client's delta from the reference is scaled down to L2 norm at most C, then the deltas are
averaged as today's mean does (sample-weighted when given weights).

The norm is joint over the parameter set (all tensors of the payload key together), so a client cannot spread a
large update over many tensors each under the bound. A delta already within the bound is left exactly as it is.
Without a reference the values themselves are bounded (meaningful only for values that are already updates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedpal.common.tensors import Tensors
from fedpal.engine.mean_fold import MeanFold
from fedpal.robustness.client_values import averaging_weights, check_reference, client_delta, client_order, finish


def joint_norm(delta: Tensors) -> float:
    """The L2 norm of all tensors of the set together, in float64."""
    return math.sqrt(sum(float((v.to(torch.float64) ** 2).sum()) for v in delta.values()))


def bound_norm(delta: Tensors, C: float) -> Tensors:
    """The delta scaled by C / norm when its joint norm exceeds C; otherwise the same tensors, untouched."""
    norm = joint_norm(delta)
    if norm <= C:
        return dict(delta)
    scale = C / norm
    return {name: v * scale for name, v in delta.items()}


@dataclass(frozen=True)
class NormBound:
    """The norm-bounding rule with bound ``C`` > 0 (weighted mean of the bounded deltas)."""

    C: float

    def __post_init__(self) -> None:
        if isinstance(self.C, bool) or not (isinstance(self.C, int | float) and math.isfinite(self.C) and self.C > 0):
            raise ValueError(f"norm_bound: C is the largest L2 norm of a client's delta, a number > 0; got {self.C!r}")

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        reference: Tensors | None = None,
    ) -> Tensors:
        ids = client_order(parts, weights)
        check_reference(parts[ids[0]], reference)
        fold = MeanFold()
        for cid, weight in zip(ids, averaging_weights(ids, weights), strict=True):
            fold.add(bound_norm(client_delta(parts[cid], reference), self.C), weight)
        return finish(fold.mean(), parts[ids[0]], reference)
