"""Class prototypes as tensors: per-class means in one ``index_add_``, nearest-prototype scores in one matrix.

Prototypes travel as ``{str(class): vector}`` so a message holds exactly the classes a party has, and the byte
counter sees exactly (number of classes) x D floats.
"""

from __future__ import annotations

import torch

ProtoDict = dict[str, torch.Tensor]


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums [C, D] and counts [C] of ``features`` [n, D], without a loop over samples."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)
    return sums, counts


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means [C, D] (zero rows for absent classes) and counts [C]."""
    sums, counts = class_sums(features, labels, num_classes)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def present_means(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means [k, D] of the rows with a positive count, in class order, and the mask [C] of those classes."""
    mask = counts > 0
    return sums[mask] / counts[mask].unsqueeze(1).to(sums.dtype), mask


def to_dict(prototypes: torch.Tensor, present: torch.Tensor) -> ProtoDict:
    """``{str(c): prototypes[c]}`` for the present classes."""
    return {str(c): prototypes[c].clone() for c in torch.nonzero(present).flatten().tolist()}


def from_dict(
    protos: ProtoDict, num_classes: int, dim: int, *, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked prototypes [C, D] (zeros where absent) and the presence mask [C], on ``device`` (the dict may be
    empty, so the caller names it)."""
    stacked = torch.zeros(num_classes, dim, device=device)
    present = torch.zeros(num_classes, dtype=torch.bool, device=device)
    for key, vector in protos.items():
        stacked[int(key)] = vector
        present[int(key)] = True
    return stacked, present


def average(
    uploads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], weighting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Server average of client prototypes, class by class, over the clients that hold the class.

    ``uploads``: (prototypes [C, D], present [C], class counts [C]) per client. ``weighting="uniform"`` gives
    every holding client the same weight (HtFLlib); ``"samples"`` weights by the client's class count.
    """
    stacked = torch.stack([p for p, _, _ in uploads])  # [K, C, D]
    present = torch.stack([m for _, m, _ in uploads]).to(stacked.dtype)  # [K, C]
    weights = present if weighting == "uniform" else present * torch.stack([n for _, _, n in uploads])
    total = weights.sum(0)  # [C]
    mean = (weights.unsqueeze(2) * stacked).sum(0) / total.clamp_min(1e-12).unsqueeze(1)
    return mean, total > 0


def mean_squared_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """mean_k (r_k - p_{c,k})^2 for every feature and class, [n, C], from one matrix product."""
    dim = features.shape[1]
    squared = features.pow(2).sum(1, keepdim=True) - 2 * features @ prototypes.T + prototypes.pow(2).sum(1)
    return squared.clamp_min(0) / dim


# How far below a row's lowest score a class without a global prototype is put: never predicted, finite loss.
ABSENT_MARGIN = 1e4


def nearest_prototype_scores(features: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Scores [n, C] whose argmax is the nearest present prototype: minus the mean squared distance."""
    scores = -mean_squared_distances(features, prototypes)
    if bool(present.all()) or scores.numel() == 0:
        return scores
    floor = scores.min(dim=1, keepdim=True).values - ABSENT_MARGIN
    return torch.where(present.unsqueeze(0), scores, floor)
