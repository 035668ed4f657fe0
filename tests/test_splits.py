"""Per-client splits: exact coverage, stratification, minimum-per-part rule, chronology and gaps."""

from __future__ import annotations

import numpy as np
import pytest

from fedpal.data.partitioners import partition
from fedpal.data.splits import split_client
from fedpal.errors import UserError

FRACTIONS = (0.7, 0.15, 0.15)


def _labels(n: int = 3000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _assert_exact_split(indices: np.ndarray, parts: tuple[np.ndarray, ...]) -> None:
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    flat = np.concatenate(parts)
    assert flat.size == indices.size
    assert np.array_equal(np.sort(flat), np.sort(indices))


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "quantity"])
def test_each_client_index_in_exactly_one_part(name: str) -> None:
    labels = _labels()
    clients = partition(name, labels, 15, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for idx in clients:
        _assert_exact_split(idx, split_client(idx, labels, FRACTIONS, rng))


def test_stratified_proportions_within_one_per_class() -> None:
    labels = _labels(n=4000, classes=8)
    idx = np.random.default_rng(2).choice(4000, size=1500, replace=False)
    parts = split_client(idx, labels, FRACTIONS, np.random.default_rng(0))
    for c in range(8):
        total = int((labels[idx] == c).sum())
        for frac, part in zip(FRACTIONS, parts, strict=True):
            got = int((labels[part] == c).sum())
            assert abs(got - frac * total) <= 1, (c, frac, got, total)


def test_deterministic_and_seed_sensitive() -> None:
    labels = _labels()
    idx = np.arange(0, 3000, 2)
    a = split_client(idx, labels, FRACTIONS, np.random.default_rng(5))
    b = split_client(idx, labels, FRACTIONS, np.random.default_rng(5))
    c = split_client(idx, labels, FRACTIONS, np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_small_classes_rule() -> None:
    # Classes of sizes 1, 2, 3, 4: the fractions alone would give the small ones no val or test.
    labels = np.repeat(np.arange(4), [1, 2, 3, 4])
    idx = np.arange(labels.size)
    train, val, test = split_client(idx, labels, (0.8, 0.1, 0.1), np.random.default_rng(0))
    _assert_exact_split(idx, (train, val, test))
    for c, n in enumerate([1, 2, 3, 4]):
        counts = [int((labels[p] == c).sum()) for p in (train, val, test)]
        if n >= 3:
            assert counts[0] >= 1 and counts[1] >= 1 and counts[2] >= 1
        else:
            assert counts == [n, 0, 0]  # too few: all to train first
    # No val fraction: a 3-sample class still gets train and test, nothing in val.
    train, val, test = split_client(np.arange(3), np.zeros(3, int), (0.9, 0.0, 0.1), np.random.default_rng(0))
    assert (train.size, val.size, test.size) == (2, 0, 1)


def test_chronological_order_respected() -> None:
    n = 200
    labels = np.arange(n) % 2
    order = np.random.default_rng(0).permutation(n)  # chronological position, unrelated to index
    idx = np.arange(n)
    train, val, test = split_client(idx, labels, FRACTIONS, np.random.default_rng(0), order=order)
    _assert_exact_split(idx, (train, val, test))
    for c in range(2):
        tr, va, te = (order[p][labels[p] == c] for p in (train, val, test))
        assert tr.max() < va.min() and va.max() < te.min()
        assert (tr.size, va.size, te.size) == (70, 15, 15)
    # No randomness in chronological mode: the rng does not matter.
    again = split_client(idx, labels, FRACTIONS, np.random.default_rng(99), order=order)
    assert all(np.array_equal(x, y) for x, y in zip((train, val, test), again, strict=True))


def test_chronological_gap_drops_boundary_samples() -> None:
    n, gap = 100, 3
    labels = np.zeros(n, dtype=int)
    order = np.arange(n)[::-1].copy()  # time runs against the index
    idx = np.arange(n)
    train, val, test = split_client(idx, labels, (0.6, 0.2, 0.2), np.random.default_rng(0), order=order, gap=gap)
    tr, va, te = order[train], order[val], order[test]
    assert va.min() - tr.max() == gap + 1
    assert te.min() - va.max() == gap + 1
    assert tr.size + va.size + te.size == n - 2 * gap
    assert tr.min() == 0 and te.max() == n - 1
    # Without a val part there is a single boundary.
    train, val, test = split_client(idx, labels, (0.8, 0.0, 0.2), np.random.default_rng(0), order=order, gap=gap)
    assert val.size == 0 and train.size + test.size == n - gap
    assert order[test].min() - order[train].max() == gap + 1


def test_bad_arguments_raise() -> None:
    labels = _labels(n=50)
    idx = np.arange(50)
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="sum to 1"):
        split_client(idx, labels, (0.7, 0.2, 0.2), rng)
    with pytest.raises(UserError):
        split_client(idx, labels, (1.2, -0.1, -0.1), rng)
    with pytest.raises(UserError, match="order"):
        split_client(idx, labels, FRACTIONS, rng, gap=2)


def test_empty_client() -> None:
    parts = split_client(np.zeros(0, dtype=np.int64), _labels(), FRACTIONS, np.random.default_rng(0))
    assert all(p.size == 0 and p.dtype == np.int64 for p in parts)
