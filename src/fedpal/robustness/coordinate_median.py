"""The coordinate-wise median (Yin et al. 2018; Flower's FedMedian, FederatedScope's ``median``).

Each coordinate of each tensor is the median of the clients' values there; with an even number of clients, the mean
of the two middle values (as NumPy's median). It is unweighted, as in Flower and FederatedScope: a sample count is
something a byzantine client can inflate, and the median must not let one claim outvote the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedpal.common.tensors import Tensors
from fedpal.robustness.rule import client_order, finish, stacked_deltas


def median_along_clients(values: torch.Tensor) -> torch.Tensor:
    """The median over the first axis (clients); an even count gives the mean of the middle two."""
    ordered = values.sort(dim=0).values
    middle = ordered.shape[0] // 2
    if ordered.shape[0] % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def coordinate_median(
    parts: Mapping[int, Tensors], weights: Mapping[int, float] | None = None, reference: Tensors | None = None
) -> Tensors:
    """The reference plus the coordinate-wise median of the clients' deltas (the median of the values without a
    reference). ``weights`` are not used (unweighted, see the module)."""
    ids = client_order(parts, weights)
    stacked = stacked_deltas(parts, ids, reference)
    return finish({name: median_along_clients(v) for name, v in stacked.items()}, parts[ids[0]], reference)
