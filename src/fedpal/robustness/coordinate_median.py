"""The coordinate-wise median (Yin et al. 2018; Flower's FedMedian, FederatedScope's ``median``).

Each coordinate of each tensor is the median of the clients' values there; with an even number of clients, the mean
of the two middle values (as NumPy's median). It is unweighted, as in Flower and FederatedScope: a sample count is
something a byzantine client can inflate, and the median must not let one claim outvote the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedpal.common.tensors import Tensors
from fedpal.robustness.client_values import (
    as_delta,
    check_reference,
    client_order,
    finish,
    sort_along_clients,
    stacked_values,
)


def middle_rows(n: int) -> slice:
    """The rows of n sorted values whose mean is their median: the middle one, or the middle two for even n."""
    return slice((n - 1) // 2, n // 2 + 1)


def mean_of_middle(rows: torch.Tensor) -> torch.Tensor:
    """The median from ``middle_rows``: the one row, or the mean of the two."""
    return rows[0] if rows.shape[0] == 1 else (rows[0] + rows[1]) / 2


def median_along_clients(values: torch.Tensor) -> torch.Tensor:
    """The median over the first axis (clients); an even count gives the mean of the middle two."""
    return mean_of_middle(sort_along_clients(values)[middle_rows(values.shape[0])])


def coordinate_median(
    parts: Mapping[int, Tensors], weights: Mapping[int, float] | None = None, reference: Tensors | None = None
) -> Tensors:
    """The reference plus the coordinate-wise median of the clients' deltas (the median of the values without a
    reference). ``weights`` are not used (unweighted, see the module).

    The values are sorted as they came (float32 sorts faster and moves half the bytes) and only the middle rows
    become float64 deltas: x -> x - reference is monotone, so they are the middle rows of the sorted deltas, and
    the result is the same bit for bit."""
    ids = client_order(parts, weights)
    check_reference(parts[ids[0]], reference)
    rows = middle_rows(len(ids))
    reduced = {
        name: mean_of_middle(as_delta(sort_along_clients(values)[rows], None if reference is None else reference[name]))
        for name, values in stacked_values(parts, ids).items()
    }
    return finish(reduced, parts[ids[0]], reference)
