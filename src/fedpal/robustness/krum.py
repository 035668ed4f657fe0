"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017; Flower's Krum/MultiKrum, FederatedScope's ``krum``).

Each client's reply is one vector: all its tensors flattened and concatenated in sorted name order (the distances
between deltas from a reference are the distances between the values, so the reference only has to match). With f
byzantine clients among n, a client's score is the sum of the squared L2 distances to its n - f - 2 nearest other
clients; a benign client sits among other benign ones and scores low, an outlier far from everyone scores high. Krum
returns the reply of the lowest score; Multi-Krum the mean of the m lowest (default m = n - f). Equal scores go to
the lower client id, so the choice never depends on arrival order.

The guarantee needs n > 2f + 2; fewer clients per round is a configuration that cannot work (``UserError``).
Krum's choice is unweighted (a sample count does not move a score). Multi-Krum averages the chosen replies with
the averaging weights when it is given them, sample-weighted as today's mean and as Flower's MultiKrum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedpal.common.tensors import Tensors
from fedpal.engine.mean_fold import MeanFold
from fedpal.errors import UserError
from fedpal.robustness.client_values import averaging_weights, check_reference, client_order, joint_values


def check_byzantine_count(f: int) -> None:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f is the number of byzantine clients, an integer >= 0; got {f!r}")


def check_krum_clients(rule: str, f: int, n: int) -> None:
    """Krum's assumption n > 2f + 2, as one line a user can act on."""
    if n <= 2 * f + 2:
        raise UserError(
            f"{rule} with f={f} byzantine clients needs more than 2f+2 = {2 * f + 2} clients per round, got {n}"
        )


# columns per block: a block of n rows in float64 (n x 8k x 8 bytes) stays in cache while every pair is compared
COLUMNS_PER_BLOCK = 1 << 13


def squared_distances(vectors: torch.Tensor) -> torch.Tensor:
    """The n x n matrix of squared L2 distances between the rows, in float64.

    A block of columns at a time (made float64 there, so float32 rows are never copied whole), each block's pairs by
    ``torch.pdist``, which takes the differences themselves (not |x|^2 + |y|^2 - 2 x.y, which cancels badly for
    close replies): identical rows are exactly 0 apart, and the squares agree with the exact values to float64
    rounding (a square root and back per block).
    """
    n = vectors.shape[0]
    squared = torch.zeros(n * (n - 1) // 2, dtype=torch.float64, device=vectors.device)
    for start in range(0, vectors.shape[1], COLUMNS_PER_BLOCK):
        squared += torch.pdist(vectors[:, start : start + COLUMNS_PER_BLOCK].to(torch.float64)).square()
    upper, lower = torch.triu_indices(n, n, offset=1, device=vectors.device)
    distances = torch.zeros(n, n, dtype=torch.float64, device=vectors.device)
    distances[upper, lower] = squared
    distances[lower, upper] = squared
    return distances


def krum_scores(distances: torch.Tensor, f: int) -> list[float]:
    """Each client's sum of squared distances to its n - f - 2 nearest others (at least one: n > f + 2)."""
    n = distances.shape[0]
    neighbours = n - f - 2
    if neighbours < 1:
        raise ValueError(f"a Krum score needs n > f + 2 clients; got n={n}, f={f}")
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(float(others.sort().values[:neighbours].sum()))
    return scores


def krum_ranking(vectors: torch.Tensor, ids: list[int], f: int) -> list[int]:
    """All client ids (``ids``: the row order of ``vectors``, one joint vector per client) from the best (lowest)
    Krum score to the worst; equal scores in ascending id order."""
    scores = krum_scores(squared_distances(vectors), f)
    return [cid for _, cid in sorted(zip(scores, ids, strict=True))]


@dataclass(frozen=True)
class Krum:
    """Krum: the reply of the client with the lowest score (unweighted; ``weights`` only checked)."""

    f: int = 0

    def __post_init__(self) -> None:
        check_byzantine_count(self.f)

    def select(self, parts: Mapping[int, Tensors], reference: Tensors | None = None) -> int:
        """The chosen client's id."""
        ids = client_order(parts, None)
        check_krum_clients("krum", self.f, len(ids))
        check_reference(parts[ids[0]], reference)
        return krum_ranking(joint_values(parts, ids), ids, self.f)[0]

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        reference: Tensors | None = None,
    ) -> Tensors:
        client_order(parts, weights)
        chosen = parts[self.select(parts, reference)]
        # the reply itself: reference + its delta is the reply, and this way it is so bit for bit
        return {name: value.detach().clone() for name, value in chosen.items()}


@dataclass(frozen=True)
class MultiKrum:
    """Multi-Krum: the (weighted) mean of the m clients with the lowest scores; m = n - f when None."""

    f: int = 0
    m: int | None = None

    def __post_init__(self) -> None:
        check_byzantine_count(self.f)
        if self.m is not None and (isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1):
            raise ValueError(f"multikrum: m is the number of clients averaged, an integer >= 1; got {self.m!r}")

    def choose(self, parts: Mapping[int, Tensors], reference: Tensors | None) -> tuple[list[int], list[int]]:
        """All ids and the chosen ids, both ascending."""
        ids = client_order(parts, None)
        n = len(ids)
        check_krum_clients("multikrum", self.f, n)
        m = n - self.f if self.m is None else self.m
        if m > n:
            raise UserError(f"multikrum averages m={m} clients but a round has only {n}")
        check_reference(parts[ids[0]], reference)
        return ids, sorted(krum_ranking(joint_values(parts, ids), ids, self.f)[:m])

    def select(self, parts: Mapping[int, Tensors], reference: Tensors | None = None) -> list[int]:
        """The chosen clients' ids, in ascending order."""
        return self.choose(parts, reference)[1]

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        reference: Tensors | None = None,
    ) -> Tensors:
        client_order(parts, weights)
        _, chosen = self.choose(parts, reference)
        # today's mean over the chosen replies (the mean of their deltas plus the reference, without the deltas)
        fold = MeanFold()
        for cid, weight in zip(chosen, averaging_weights(chosen, weights), strict=True):
            fold.add(parts[cid], weight)
        return fold.mean()
