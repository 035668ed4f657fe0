"""Bulyan (El Mhamdi et al., ICML 2018; Flower's Bulyan, FederatedScope's ``bulyan``).

Two steps over n replies with f byzantine clients, which need n >= 4f + 3 (fewer is a configuration that cannot
work: ``UserError``):
1. selection: the theta = n - 2f replies of lowest Krum score (Multi-Krum's choice: scores over all n replies on
   the joint flattened vector, ties to the lower client id);
2. per coordinate, the median of the theta chosen values, and the mean of the beta = theta - 2f chosen values
   nearest to it (ties to the lower client id).
The paper (and Flower's legacy function) picks the theta replies one at a time, re-running Krum on the shrinking
pool; its last picks then count fewer neighbours than there are byzantine clients (a single one at the end), so f
colluding near-identical replies score as well as any benign pair. Flower's current Bulyan selects by Multi-Krum,
as here, where every score counts n - f - 2 >= 3f + 1 neighbours.
Unweighted, as in Flower and FederatedScope: neither step reads a sample count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedpal.common.tensors import Tensors
from fedpal.errors import UserError
from fedpal.robustness.client_values import client_order, finish, joint_values, stacked_deltas
from fedpal.robustness.coordinate_median import median_along_clients
from fedpal.robustness.krum import check_byzantine_count, krum_ranking


def check_bulyan_clients(f: int, n: int) -> None:
    if n < 4 * f + 3:
        raise UserError(
            f"bulyan with f={f} byzantine clients needs at least 4f+3 = {4 * f + 3} clients per round, got {n}"
        )


def mean_nearest_median(values: torch.Tensor, count: int) -> torch.Tensor:
    """Per coordinate, the mean of the ``count`` values (over the first axis) nearest to their median; equal
    distances go to the lower row."""
    gaps = (values - median_along_clients(values)).abs()
    if gaps.device.type == "cpu":  # NumPy's stable argsort along an axis is about 2x torch's here
        nearest = torch.from_numpy(np.argsort(gaps.numpy(), axis=0, kind="stable")[:count])
    else:
        nearest = gaps.sort(dim=0, stable=True).indices[:count]
    return values.gather(0, nearest).mean(dim=0)


@dataclass(frozen=True)
class Bulyan:
    """The Bulyan rule (unweighted; ``weights`` only checked)."""

    f: int = 0

    def __post_init__(self) -> None:
        check_byzantine_count(self.f)

    def choose(
        self, parts: Mapping[int, Tensors], reference: Tensors | None
    ) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        """All ids, the stack rows of the theta chosen (ascending) and the stacked deltas of all clients."""
        ids = client_order(parts, None)
        check_bulyan_clients(self.f, len(ids))
        stacked = stacked_deltas(parts, ids, reference)
        chosen = set(krum_ranking(joint_values(parts, ids), ids, self.f)[: len(ids) - 2 * self.f])
        return ids, [row for row, cid in enumerate(ids) if cid in chosen], stacked

    def select(self, parts: Mapping[int, Tensors], reference: Tensors | None = None) -> list[int]:
        """The theta chosen clients' ids, in ascending order."""
        ids, rows, _ = self.choose(parts, reference)
        return [ids[row] for row in rows]

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        reference: Tensors | None = None,
    ) -> Tensors:
        client_order(parts, weights)
        ids, rows, stacked = self.choose(parts, reference)
        beta = len(rows) - 2 * self.f
        index = torch.tensor(rows, device=next(iter(stacked.values())).device)
        reduced = {name: mean_nearest_median(v.index_select(0, index), beta) for name, v in stacked.items()}
        return finish(reduced, parts[ids[0]], reference)
