"""The coordinate-wise trimmed mean (Yin et al. 2018; Flower's FedTrimmedAvg, FederatedScope's ``trimmedmean``).

Per coordinate, the floor(beta * n) largest and the floor(beta * n) smallest of the n clients' values are dropped and
the rest averaged. ``beta`` is the fraction trimmed from each side (default 0.2, Flower's); it must be below 0.5 so
that something is left. The mean of what is left is unweighted, as in Flower and FederatedScope: an inflated sample
count must not buy a client more say among the values that survive the trim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedpal.common.tensors import Tensors
from fedpal.robustness.client_values import (
    check_reference,
    client_order,
    finish,
    sort_along_clients,
    stacked_values,
    sum_along_clients,
)


def trimmed_count(beta: float, n: int) -> int:
    """How many values are dropped from each side: floor(beta * n); the 1e-9 keeps 0.29 * 100 at 29, not 28."""
    return math.floor(beta * n + 1e-9)


def check_beta(beta: float) -> None:
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean: beta is the fraction trimmed from each side, in [0, 0.5); got {beta}")


def trimmed_mean_along_clients(values: torch.Tensor, beta: float) -> torch.Tensor:
    """The trimmed mean over the first axis (clients)."""
    n = values.shape[0]
    cut = trimmed_count(beta, n)
    return sort_along_clients(values)[cut : n - cut].mean(dim=0)


@dataclass(frozen=True)
class TrimmedMean:
    """The trimmed-mean rule; ``weights`` are not used (unweighted, see the module)."""

    beta: float = 0.2

    def __post_init__(self) -> None:
        check_beta(self.beta)

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        reference: Tensors | None = None,
    ) -> Tensors:
        ids = client_order(parts, weights)
        check_reference(parts[ids[0]], reference)
        n = len(ids)
        cut = trimmed_count(self.beta, n)
        # the values are sorted as they came (float32 sorts faster and moves half the bytes; x -> x - reference is
        # monotone, so the kept rows are the same) and the kept rows summed in float64; the reference comes off the
        # mean by ``finish``'s counterpart here, which differs from the mean of float64 deltas by rounding only
        reduced: dict[str, torch.Tensor] = {}
        for name, values in stacked_values(parts, ids).items():
            kept = sort_along_clients(values)[cut : n - cut]
            reduced[name] = sum_along_clients(kept) / kept.shape[0]
            if reference is not None:
                reduced[name] = reduced[name] - reference[name].detach().to(dtype=torch.float64)
        return finish(reduced, parts[ids[0]], reference)
