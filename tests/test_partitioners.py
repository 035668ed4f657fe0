"""Partitioners: exact coverage, determinism, the skew each one promises, and loud impossible requests."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedpal.data.partition_report import format_partition_table, partition_table, save_partition_heatmap
from fedpal.data.partitioners import PARTITIONERS, _take_from_largest, partition
from fedpal.errors import UserError


def _labels(n: int = 2000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _groups(n: int, num_groups: int = 7, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_groups, size=n) * 3 + 100  # non-contiguous ids


def _run(name: str, labels: np.ndarray, num_clients: int, seed: int, **kw: object) -> list[np.ndarray]:
    if name in ("natural", "grouped") and "groups" not in kw:
        kw["groups"] = _groups(labels.size)
    return partition(name, labels, num_clients, np.random.default_rng(seed), **kw)


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique inside a client"
    flat = np.concatenate(parts)
    assert flat.size == n, "every sample exactly once"
    assert np.array_equal(np.sort(flat), np.arange(n))


def _mean_entropy(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> float:
    counts = partition_table([labels[p] for p in parts], classes).astype(float)
    prob = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(prob > 0, prob * np.log(prob), 0.0).sum(axis=1)
    return float(ent.mean())


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_every_sample_in_exactly_one_client(name: str) -> None:
    labels = _labels()
    clients = 7 if name == "natural" else 20
    parts = _run(name, labels, clients, seed=3)
    assert len(parts) == clients
    _assert_disjoint_cover(parts, labels.size)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_deterministic_for_a_seed(name: str) -> None:
    labels = _labels()
    clients = 7 if name == "natural" else 20
    a = _run(name, labels, clients, seed=11)
    b = _run(name, labels, clients, seed=11)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    if name != "natural":  # natural uses no randomness by design
        c = _run(name, labels, clients, seed=12)
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_unknown_partitioner_names_the_known_ones() -> None:
    with pytest.raises(UserError, match="dirichlet"):
        partition("nope", _labels(), 5, np.random.default_rng(0))


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "quantity"])
def test_more_clients_than_samples_raises(name: str) -> None:
    with pytest.raises(UserError):
        partition(name, _labels(n=30), 31, np.random.default_rng(0), min_samples=0)


def test_iid_sizes_even() -> None:
    parts = _run("iid", _labels(n=1003), 10, seed=0)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_smaller_alpha_more_skew() -> None:
    labels = _labels(n=5000)
    low = _mean_entropy(labels, _run("dirichlet", labels, 20, seed=0, alpha=0.1), 10)
    high = _mean_entropy(labels, _run("dirichlet", labels, 20, seed=0, alpha=100.0), 10)
    assert low < high - 0.5
    assert high > 0.95 * np.log(10)  # near uniform


def test_dirichlet_500_clients_terminates_fast_and_meets_min_samples() -> None:
    labels = _labels(n=70_000, classes=10)
    start = time.perf_counter()
    parts = _run("dirichlet", labels, 500, seed=0, alpha=0.1, min_samples=10)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    assert min(p.size for p in parts) >= 10
    _assert_disjoint_cover(parts, labels.size)


def test_dirichlet_small_dataset_many_clients() -> None:
    labels = _labels(n=1797, classes=10)
    start = time.perf_counter()
    parts = _run("dirichlet", labels, 100, seed=5, alpha=0.1, min_samples=10)
    assert time.perf_counter() - start < 5.0
    assert min(p.size for p in parts) >= 10
    _assert_disjoint_cover(parts, labels.size)


def test_dirichlet_exact_min_samples_budget() -> None:
    labels = _labels(n=1000)
    parts = _run("dirichlet", labels, 100, seed=2, alpha=0.05, min_samples=10)
    assert [p.size for p in parts] == [10] * 100
    with pytest.raises(UserError, match="min_samples"):
        _run("dirichlet", labels, 101, seed=2, min_samples=10)


def test_dirichlet_bad_alpha() -> None:
    with pytest.raises(UserError, match="alpha"):
        _run("dirichlet", _labels(), 5, seed=0, alpha=0.0)


def test_take_from_largest_water_fills() -> None:
    values = np.array([50, 3, 20, 20, 1])
    take = _take_from_largest(values, 40)
    assert take.sum() == 40
    assert np.all(take <= values)
    assert take[1] == 0 and take[4] == 0  # small entries untouched
    left = values - take
    assert left[0] - min(left[2], left[3]) <= 1  # cut down to a common level
    assert np.array_equal(_take_from_largest(values, 0), np.zeros(5, dtype=np.int64))


@pytest.mark.parametrize(("clients", "k"), [(10, 2), (20, 3), (5, 2), (10, 10), (12, 5)])
def test_shards_exact_classes_per_client(clients: int, k: int) -> None:
    labels = _labels(n=3000)
    parts = _run("shards", labels, clients, seed=4, classes_per_client=k)
    _assert_disjoint_cover(parts, labels.size)
    assert [np.unique(labels[p]).size for p in parts] == [k] * clients
    sizes = np.array([p.size for p in parts])
    assert sizes.max() <= 2 * sizes.min()  # balanced, not one client hoarding


def test_shards_at_most_k_with_tiny_classes() -> None:
    labels = np.concatenate([np.zeros(2, dtype=int), np.ones(500, dtype=int), np.full(500, 2)])
    parts = _run("shards", labels, 9, seed=0, classes_per_client=2)
    _assert_disjoint_cover(parts, labels.size)
    assert all(np.unique(labels[p]).size <= 2 for p in parts)


def test_shards_impossible_requests() -> None:
    with pytest.raises(UserError, match="classes_per_client"):
        _run("shards", _labels(classes=4), 10, seed=0, classes_per_client=5)
    with pytest.raises(UserError, match="cover"):
        _run("shards", _labels(classes=10), 3, seed=0, classes_per_client=2)


def test_natural_one_client_per_group() -> None:
    labels = _labels(n=500)
    groups = _groups(500, num_groups=6)
    parts = _run("natural", labels, 0, seed=0, groups=groups)
    values = np.unique(groups)
    assert len(parts) == values.size
    for value, p in zip(values, parts, strict=True):
        assert np.array_equal(p, np.flatnonzero(groups == value))
    _assert_disjoint_cover(parts, labels.size)


def test_natural_fewer_clients_takes_first_groups() -> None:
    labels = _labels(n=500)
    groups = _groups(500, num_groups=6)
    parts = _run("natural", labels, 2, seed=0, groups=groups)
    first = np.unique(groups)[:2]
    assert [np.unique(groups[p]).tolist() for p in parts] == [[first[0]], [first[1]]]
    assert sum(p.size for p in parts) == int(np.isin(groups, first).sum())


def test_natural_errors() -> None:
    labels = _labels(n=100)
    with pytest.raises(UserError, match="groups"):
        partition("natural", labels, 0, np.random.default_rng(0))
    with pytest.raises(UserError, match="groups"):
        _run("natural", labels, 50, seed=0, groups=_groups(100, num_groups=4))


def test_quantity_skew_grows_as_alpha_shrinks() -> None:
    labels = _labels(n=20_000)

    def spread(qa: float) -> float:
        sizes = np.array([p.size for p in _run("quantity", labels, 50, seed=1, quantity_alpha=qa)])
        assert sizes.min() >= 10 and sizes.sum() == labels.size
        return float(sizes.std() / sizes.mean())

    assert spread(0.2) > 2 * spread(50.0)


def test_quantity_impossible_min_samples() -> None:
    with pytest.raises(UserError, match="min_samples"):
        _run("quantity", _labels(n=100), 20, seed=0, min_samples=6)


def test_partition_table_and_markdown_totals() -> None:
    labels = _labels(n=600, classes=4)
    parts = _run("dirichlet", labels, 5, seed=0, alpha=0.5, min_samples=5)
    counts = partition_table([labels[p] for p in parts], 4)
    assert counts.shape == (5, 4)
    assert np.array_equal(counts.sum(axis=0), np.bincount(labels, minlength=4))
    assert [int(r) for r in counts.sum(axis=1)] == [p.size for p in parts]
    text = format_partition_table(counts, class_names=["a", "b", "c", "d"])
    lines = text.splitlines()
    assert lines[0] == "| client | a | b | c | d | total |"
    assert len(lines) == 2 + 5 + 1
    assert lines[-1] == "| **total** | " + " | ".join(str(v) for v in np.bincount(labels)) + " | 600 |"
    assert lines[2].endswith(f"| {parts[0].size} |")
    with pytest.raises(UserError):
        partition_table([np.array([0, 4])], 4)


@pytest.mark.parametrize("clients", [4, 500])
def test_heatmap_written(tmp_path, clients: int) -> None:
    counts = np.random.default_rng(0).integers(0, 50, size=(clients, 10))
    out = tmp_path / "sub" / f"heat{clients}.png"
    save_partition_heatmap(counts, out, title="test")
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_grouped_clients_each_draw_from_one_group_in_even_shares() -> None:
    labels = _labels(2100)
    groups = _groups(labels.size, num_groups=5)
    groups[:100] = -1  # nobody's samples (a latent partition's embedding split)
    parts = partition("grouped", labels, 15, np.random.default_rng(0), groups=groups)
    names = np.unique(groups[groups >= 0])
    for client, part in enumerate(parts):
        assert set(groups[part].tolist()) == {int(names[client // 3])}  # clients 0-2 -> first group, ...
    for g in range(5):
        sizes = [parts[c].size for c in range(3 * g, 3 * g + 3)]
        assert sum(sizes) == int((groups == names[g]).sum()) and max(sizes) - min(sizes) <= 1
    assert np.concatenate(parts).size == labels.size - 100


def test_grouped_errors() -> None:
    labels = _labels(100)
    with pytest.raises(UserError, match="groups"):
        partition("grouped", labels, 5, np.random.default_rng(0))
    with pytest.raises(UserError, match="cannot cover"):
        partition("grouped", labels, 2, np.random.default_rng(0), groups=_groups(100, num_groups=5))
