"""A class-stratified subsample: the same share of every class, so a smaller dataset keeps its label distribution."""

from __future__ import annotations

import numpy as np


def stratified_subsample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a class-stratified sample of ``size`` (sorted), keeping class proportions."""
    if size <= 0 or size >= labels.shape[0]:
        return np.arange(labels.shape[0])
    chosen = []
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts / counts.sum() * size).astype(int)
    quotas[np.argsort(-counts)[: size - quotas.sum()]] += 1
    for cls, quota in zip(classes, quotas, strict=True):
        members = np.flatnonzero(labels == cls)
        chosen.append(rng.choice(members, size=quota, replace=False))
    return np.sort(np.concatenate(chosen))
