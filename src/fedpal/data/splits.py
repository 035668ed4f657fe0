"""Per-client train/val/test split, stratified by label, optionally chronological.

Each client is split on its own so that personalised evaluation measures the client's own distribution.
The cut sizes are computed for all classes at once and samples are routed by their rank inside their
class, so there is no loop over samples and none over classes.
"""

from __future__ import annotations

import numpy as np

from fedpal.errors import UserError

__all__ = ["split_client"]

_PARTS = 3  # train, val, test


def _part_sizes(class_sizes: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Integer train/val/test counts per class, shape ``[classes, 3]``, each row summing to the class size.

    Val and test are ``round(fraction * count)`` (half up) and train takes the rest, so val and test are
    within 1/2 and train within 1 of their exact shares, and rounding losses go to train: a class of one
    or two samples trains unless a fraction is big enough to claim a sample on its own. Then a class with
    >= 3 samples gets >= 1 sample in every part whose fraction is positive (taken from its currently
    largest part), and any non-empty class keeps >= 1 training sample when the train fraction is positive.
    """
    n = class_sizes.astype(np.int64)
    held_out = np.floor(n[:, None] * fractions[None, 1:] + 0.5 + 1e-9).astype(np.int64)
    # Both halves rounding up can exceed the class by one (tiny train fraction); trim the larger one.
    over = np.maximum(held_out.sum(axis=1) - n, 0)
    held_out[np.arange(n.size), np.argmax(held_out, axis=1)] -= over
    sizes = np.column_stack([n - held_out.sum(axis=1), held_out])

    wanted = fractions > 0
    rows = np.arange(n.size)
    for part in range(_PARTS):
        if not wanted[part]:
            continue
        # Train must be non-empty for every non-empty class; the other parts only from 3 samples up.
        eligible = n >= 1 if part == 0 else n >= 3
        lacking = rows[eligible & (sizes[:, part] == 0)]
        donor = np.argmax(sizes[lacking], axis=1)
        sizes[lacking, donor] -= 1
        sizes[lacking, part] += 1
    return sizes


def split_client(
    indices: np.ndarray,
    labels: np.ndarray,
    fractions: tuple[float, float, float],
    rng: np.random.Generator,
    *,
    order: np.ndarray | None = None,
    gap: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split one client's sample ``indices`` into sorted (train, val, test) index arrays.

    ``labels`` and ``order`` are dataset-wide arrays indexed by ``indices`` (as produced by the
    partitioners). Without ``order`` each class is shuffled with ``rng`` before cutting. With ``order``
    (chronological position) each class is sorted by it and cut train -> val -> test with no shuffling;
    ``gap`` samples are then dropped at each boundary between parts with a positive fraction, so
    overlapping windows cannot leak across it. Cut sizes are computed on the class size minus the gaps;
    a class too short to afford the gaps keeps all its samples in train.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (_PARTS,) or not np.isfinite(fr).all() or (fr < 0).any():
        raise UserError(f"split fractions must be three non-negative numbers, got {fractions}")
    if abs(fr.sum() - 1.0) > 1e-6:
        raise UserError(f"split fractions must sum to 1, got {fractions} (sum {fr.sum():.6g})")
    gap = int(gap)
    if gap < 0:
        raise UserError(f"split gap must be >= 0, got {gap}")
    if gap > 0 and order is None:
        raise UserError("split gap needs a chronological order; pass order= or set gap to 0")

    indices = np.asarray(indices, dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    if indices.size == 0:
        return empty, empty.copy(), empty.copy()
    _, class_ids = np.unique(np.asarray(labels)[indices], return_inverse=True)
    class_sizes = np.bincount(class_ids)

    secondary = rng.random(indices.size) if order is None else np.asarray(order)[indices]
    # Stable lexsort: ties in order keep the index order, so the chronological split is deterministic.
    by_class = np.lexsort((secondary, class_ids))
    sorted_class = class_ids[by_class]
    starts = np.cumsum(class_sizes) - class_sizes
    rank = np.arange(indices.size) - starts[sorted_class]

    # A gap sits in front of every positive-fraction part except the first one.
    positive = fr > 0
    gap_before = np.zeros(_PARTS, dtype=np.int64)
    gap_before[positive] = gap
    gap_before[np.argmax(positive)] = 0
    usable = class_sizes - gap_before.sum()
    too_short = usable <= 0
    usable = np.where(too_short, class_sizes, usable)
    sizes = _part_sizes(usable, fr)
    gaps = np.where(too_short[:, None], 0, gap_before[None, :])

    # Part p of a class occupies ranks [begin[p], begin[p] + sizes[p]); gaps lie between.
    begin = np.cumsum(gaps + sizes, axis=1) - sizes
    r = rank[:, None]
    inside = (r >= begin[sorted_class]) & (r < (begin + sizes)[sorted_class])
    part_of = np.where(inside.any(axis=1), np.argmax(inside, axis=1), -1)
    ordered = indices[by_class]
    train, val, test = (np.sort(ordered[part_of == p]) for p in range(_PARTS))
    return train, val, test
