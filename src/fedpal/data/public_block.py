"""The public block of a source dataset: rows set aside for training done outside the federation (a trunk's
pre-training, the adapters' A/B alignment), drawn by one rule wherever it is needed, so the multi-task
pre-training and the task stream agree on which rows are public.

The rule, over the rows allowed (``free``; all rows by default): for a source with natural groups (HAPT users,
Shakespeare roles), whole groups whose rows are all free, taken from the last in sorted order until ``count`` rows
are reached; otherwise a class-stratified sample of ``count`` free rows, drawn with a fixed seed.
"""

from __future__ import annotations

import numpy as np

from fedpal.common.seeding import derive_seed
from fedpal.data.sources.base import Dataset
from fedpal.data.subsample import stratified_subsample


def public_block(
    name: str, source: Dataset, count: int, free: np.ndarray | None = None
) -> tuple[np.ndarray, list[int]]:
    """(sorted rows, the groups taken whole) of source ``name``'s public block; ``free`` masks the rows allowed.
    The rows may be empty when too little is free; the caller says what that means."""
    free = np.ones(len(source), dtype=bool) if free is None else free
    if source.groups is not None:
        names, inverse = np.unique(source.groups, return_inverse=True)
        sizes = np.bincount(inverse, minlength=names.size)
        whole = np.flatnonzero(np.bincount(inverse, weights=~free, minlength=names.size) == 0)[::-1]  # last first
        enough = np.searchsorted(np.cumsum(sizes[whole]), count) + 1  # groups needed to reach `count` rows
        chosen = whole[:enough]
        return np.sort(np.flatnonzero(np.isin(inverse, chosen))), sorted(int(g) for g in names[chosen])
    rng = np.random.default_rng(derive_seed(0, "public", name))  # fixed: only ``free`` can move the block
    candidates = np.flatnonzero(free)
    return np.sort(candidates[stratified_subsample(source.y[candidates], count, rng)]), []
