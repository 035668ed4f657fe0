"""Lloyd's k-means with scikit-learn's semantics (one run from a given init), for FedAli's server.

FedAli rebuilds each layer's global prototype bank by clustering all clients' local banks, starting from their
sample-weighted, index-aligned mean, so cluster k stays "prototype k" from round to round. This follows
``sklearn.cluster.KMeans(n_clusters=K, init=centres, n_init=1)`` (algorithm "lloyd"): stop when the labels no
longer change or the squared centre shift falls to ``tol`` times the mean feature variance, at most ``max_iter``
iterations; a cluster left empty is re-seeded with the point farthest from its centre (which leaves its old
cluster). Written in torch (float64) so the server needs no scikit-learn and runs anywhere torch does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    centres: torch.Tensor
    labels: torch.Tensor
    iterations: int
    relocated: int  # empty clusters re-seeded over the whole run


def _squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return (
        (x * x).sum(dim=1, keepdim=True) - 2.0 * x @ centres.T + (centres * centres).sum(dim=1).unsqueeze(0)
    ).clamp_min_(0.0)


def kmeans(x: torch.Tensor, init: torch.Tensor, max_iter: int = 300, tol: float = 1e-4) -> KMeansResult:
    """Cluster the rows of ``x`` into ``len(init)`` clusters from the given centres; centres come back in order."""
    points = x.detach().to(torch.float64)
    centres = init.detach().to(torch.float64).clone()
    k = centres.shape[0]
    threshold = tol * float(points.var(dim=0, unbiased=False).mean())
    previous: torch.Tensor | None = None
    labels = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    relocated = 0
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        distances = _squared_distances(points, centres)
        labels = distances.argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=k).to(torch.float64)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            relocated += int(empty.numel())
            own = distances.gather(1, labels[:, None]).squeeze(1)
            farthest = own.argsort(descending=True, stable=True)[: empty.numel()]
            for cluster, point in zip(empty.tolist(), farthest.tolist(), strict=True):
                sums[labels[point]] -= points[point]
                counts[labels[point]] -= 1
                sums[cluster] = points[point]
                counts[cluster] = 1
        new = sums / counts.clamp_min(1.0)[:, None]
        shift = float(((new - centres) ** 2).sum())
        centres = new
        if previous is not None and torch.equal(labels, previous):
            break
        if shift <= threshold:
            break
        previous = labels
    return KMeansResult(centres.to(x.dtype), labels, iterations, relocated)
