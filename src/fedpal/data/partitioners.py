"""Federated partitioners: decide which samples belong to which client.

Every partitioner is a pure function of the labels (and groups) and a numpy ``Generator``, so a seed
fixes the partition exactly. The result is one sorted ``int64`` index array per client and no sample is
given to two clients. Apart from ``natural`` with fewer clients than groups, every sample is used.

Most partitioners work on a count matrix ``[classes, clients]`` first (how many samples of each class a
client gets) and only at the end turn it into indices, via :func:`_assign_by_class`. Keeping the
decisions at count level is what makes the Dirichlet repair cheap and exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedpal.errors import UserError

__all__ = ["PARTITIONERS", "PartitionOptions", "partition"]

# How many times the Dirichlet proportions are drawn before the deterministic repair takes over.
_DIRICHLET_DRAWS = 10


@dataclass(frozen=True)
class PartitionOptions:
    """Knobs shared by the partitioners; each one reads only those it needs."""

    alpha: float = 0.1
    min_samples: int = 10
    classes_per_client: int = 2
    quantity_alpha: float = 1.0
    groups: np.ndarray | None = None


Partitioner = Callable[[np.ndarray, int, np.random.Generator, PartitionOptions], list[np.ndarray]]


# --------------------------------------------------------------------------------------------- helpers


def _group_by_client(client_of: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Turn a per-sample owner vector (-1 = unused) into one sorted index array per client."""
    used = np.flatnonzero(client_of >= 0)
    owners = client_of[used]
    # A stable sort by owner keeps the sample indices ascending inside each client.
    ordered = used[np.argsort(owners, kind="stable")].astype(np.int64, copy=False)
    sizes = np.bincount(owners, minlength=num_clients)
    return [np.array(part, dtype=np.int64) for part in np.split(ordered, np.cumsum(sizes)[:-1])]


def _assign_by_class(class_ids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Give client ``k`` ``counts[c, k]`` randomly chosen samples of class ``c``, for all c and k.

    ``counts`` rows must sum to the class sizes. Samples are grouped by class with a random order inside
    each class, and the owners are laid out class-major in the same order, so one scatter does it all.
    """
    num_classes, num_clients = counts.shape
    order = np.lexsort((rng.random(class_ids.size), class_ids))
    owners = np.repeat(np.tile(np.arange(num_clients), num_classes), counts.ravel())
    client_of = np.empty(class_ids.size, dtype=np.int64)
    client_of[order] = owners
    return _group_by_client(client_of, num_clients)


def _apportion(totals: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """Split each integer ``totals[r]`` over a row of ``proportions`` into integers that sum exactly.

    Rounding the cumulative sum (rather than each share) keeps every share within one of its exact value,
    never negative, and the row total exact, without any correction loop.
    """
    totals = np.asarray(totals, dtype=np.int64)
    cum = np.cumsum(proportions, axis=1)
    cum = cum / cum[:, -1:]
    edges = np.floor(cum * totals[:, None] + 0.5).astype(np.int64)
    edges = np.minimum(edges, totals[:, None])
    edges[:, -1] = totals
    return np.diff(edges, axis=1, prepend=0)


def _take_from_largest(values: np.ndarray, amount: int) -> np.ndarray:
    """How much to take from each entry so that exactly ``amount`` is removed, largest entries first.

    This is water-filling from the top: every entry is cut down to a common level ``L`` (entries below it
    are untouched) and the few units still missing are taken one each from entries above ``L``, biggest
    first. Found by bisection on ``L``, so the cost is O(len(values) * log(max)).
    """
    values = np.asarray(values, dtype=np.int64)
    if amount <= 0:
        return np.zeros_like(values)
    if amount > int(values.sum()):
        raise ValueError("cannot take more than the total")
    # Invariant: removing everything above lo yields >= amount; above hi yields < amount.
    lo, hi = 0, int(values.max())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if int(np.maximum(values - mid, 0).sum()) >= amount:
            lo = mid
        else:
            hi = mid
    take = np.maximum(values - hi, 0)
    missing = amount - int(take.sum())
    above = np.flatnonzero(values > lo)
    above = above[np.argsort(-values[above], kind="stable")]
    take[above[:missing]] += 1
    return take


def _dirichlet_rows(rng: np.random.Generator, alpha: float, rows: int, cols: int) -> np.ndarray:
    """Draw ``rows`` Dirichlet(alpha) vectors, replacing any degenerate row (tiny alpha) by a one-hot."""
    props = rng.dirichlet(np.full(cols, alpha), size=rows)
    bad = ~np.isfinite(props).all(axis=1) | (props.sum(axis=1) <= 0)
    if bad.any():
        props[bad] = 0.0
        props[np.flatnonzero(bad), rng.integers(cols, size=int(bad.sum()))] = 1.0
    return props


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"partition option {name} must be > 0, got {value}")


# --------------------------------------------------------------------------------------------- partitioners


def iid_partition(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opts: PartitionOptions
) -> list[np.ndarray]:
    """Shuffle and deal out evenly: the homogeneous baseline every skewed setting is compared with."""
    n = labels.size
    sizes = np.full(num_clients, n // num_clients) + (np.arange(num_clients) < n % num_clients)
    client_of = np.empty(n, dtype=np.int64)
    client_of[rng.permutation(n)] = np.repeat(np.arange(num_clients), sizes)
    return _group_by_client(client_of, num_clients)


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opts: PartitionOptions
) -> list[np.ndarray]:
    """Label skew: per class, client shares ~ Dir(alpha); small alpha puts each class on few clients.

    Why not PFLlib's loop: it redraws everything until every client has ``min_samples``, which for many
    clients and small alpha may practically never happen. Here termination holds by construction:

    1. Draw the ``[classes, clients]`` proportions at most ``_DIRICHLET_DRAWS`` times and keep the draw
       with the smallest total shortfall below ``min_samples`` (stop early if it is zero). Shares are
       turned into integer counts by rounding the cumulative sum, so each class is used exactly.
    2. Repair deterministically: the total shortfall ``D`` is taken from the largest clients by
       water-filling (they are cut down to a common level, which is never below ``min_samples`` because
       ``min_samples * num_clients <= n``); each donor gives from its most plentiful classes, again by
       water-filling. The removed samples, grouped by class, are dealt out in contiguous runs to the
       short clients, so a repaired client mostly receives one or two classes and the skew survives.

    The only failure is the impossible request ``min_samples * num_clients > n``, checked up front.
    """
    _check_positive("alpha", opts.alpha)
    n, m = labels.size, opts.min_samples
    if m * num_clients > n:
        raise UserError(
            f"dirichlet partition needs min_samples * num_clients <= samples: "
            f"{m} * {num_clients} > {n}; lower min_samples or num_clients"
        )
    _, class_ids = np.unique(labels, return_inverse=True)
    class_sizes = np.bincount(class_ids)
    num_classes = class_sizes.size

    best, best_short = None, -1
    for _ in range(_DIRICHLET_DRAWS):
        props = _dirichlet_rows(rng, opts.alpha, num_classes, num_clients)
        counts = _apportion(class_sizes, props)
        short = int(np.maximum(m - counts.sum(axis=0), 0).sum())
        if best is None or short < best_short:
            best, best_short = counts, short
        if short == 0:
            break
    assert best is not None
    counts = best

    if best_short > 0:
        sizes = counts.sum(axis=0)
        need = np.maximum(m - sizes, 0)
        give = _take_from_largest(sizes, best_short)
        taken = np.zeros(num_classes, dtype=np.int64)
        for donor in np.flatnonzero(give):
            from_classes = _take_from_largest(counts[:, donor], int(give[donor]))
            counts[:, donor] -= from_classes
            taken += from_classes
        pool_classes = np.repeat(np.arange(num_classes), taken)
        pool_clients = np.repeat(np.arange(num_clients), need)
        np.add.at(counts, (pool_classes, pool_clients), 1)

    if int(counts.sum(axis=0).min()) < m:  # cannot happen given the checks above; keep the promise loud
        raise UserError(f"dirichlet partition could not give every client {m} samples")
    return _assign_by_class(class_ids, counts, rng)


def shards_partition(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opts: PartitionOptions
) -> list[np.ndarray]:
    """Pathological non-IID (McMahan shards), made exact: every client holds ``classes_per_client`` classes.

    Client class sets are consecutive windows of a cyclic sequence of a random class permutation, so the
    classes inside a window are always distinct and every class is used by the same number of clients
    (within one). Each class is then cut into equal shards, one per client holding it. A client can end
    up with fewer than k classes only if a class has fewer samples than clients holding it.
    """
    k = opts.classes_per_client
    _, class_ids = np.unique(labels, return_inverse=True)
    class_sizes = np.bincount(class_ids)
    num_classes = class_sizes.size
    if k < 1:
        raise UserError(f"shards partition needs classes_per_client >= 1, got {k}")
    if k > num_classes:
        raise UserError(f"shards partition: classes_per_client={k} exceeds the {num_classes} classes present")
    if num_clients * k < num_classes:
        raise UserError(f"shards partition: {num_clients} clients x {k} classes cannot cover all {num_classes} classes")
    slots = num_clients * k
    cycle = rng.permutation(num_classes)
    seq = np.tile(cycle, -(-slots // num_classes))[:slots].reshape(num_clients, k)
    seq = seq[rng.permutation(num_clients)]

    slot_client = np.repeat(np.arange(num_clients), k)
    slot_class = seq.ravel()
    by_class = np.argsort(slot_class, kind="stable")
    slot_client, slot_class = slot_client[by_class], slot_class[by_class]
    shards_per_class = np.bincount(slot_class, minlength=num_classes)
    rank = np.arange(slots) - np.repeat(np.cumsum(shards_per_class) - shards_per_class, shards_per_class)
    base = class_sizes[slot_class] // shards_per_class[slot_class]
    extra = rank < class_sizes[slot_class] % shards_per_class[slot_class]

    counts = np.zeros((num_classes, num_clients), dtype=np.int64)
    counts[slot_class, slot_client] = base + extra
    return _assign_by_class(class_ids, counts, rng)


def natural_partition(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opts: PartitionOptions
) -> list[np.ndarray]:
    """One client per existing group (writer, user, site): the dataset's own heterogeneity.

    Clients follow the sorted distinct group values. ``num_clients == 0`` means every group; a smaller
    positive ``num_clients`` keeps only the first ``num_clients`` groups in that sorted order and their
    samples alone (the other groups' samples are left out). The rng is not used.
    """
    if opts.groups is None:
        raise UserError("natural partition needs per-sample groups, and this dataset has none")
    groups = np.asarray(opts.groups)
    if groups.shape != labels.shape:
        raise UserError(f"natural partition: groups has shape {groups.shape}, labels {labels.shape}")
    _, group_ids = np.unique(groups, return_inverse=True)
    num_groups = int(group_ids.max()) + 1 if group_ids.size else 0
    if num_clients == 0:
        num_clients = num_groups
    if num_clients > num_groups:
        raise UserError(f"natural partition: {num_clients} clients requested but only {num_groups} groups")
    client_of = np.where(group_ids < num_clients, group_ids, -1).astype(np.int64)
    return _group_by_client(client_of, num_clients)


def quantity_partition(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opts: PartitionOptions
) -> list[np.ndarray]:
    """Quantity skew: size = ``min_samples`` + a Dir(quantity_alpha) share of the rest; content is iid."""
    _check_positive("quantity_alpha", opts.quantity_alpha)
    n, m = labels.size, opts.min_samples
    if m * num_clients > n:
        raise UserError(f"quantity partition needs min_samples * num_clients <= samples: {m} * {num_clients} > {n}")
    props = _dirichlet_rows(rng, opts.quantity_alpha, 1, num_clients)
    sizes = m + _apportion(np.array([n - m * num_clients]), props)[0]
    client_of = np.empty(n, dtype=np.int64)
    client_of[rng.permutation(n)] = np.repeat(np.arange(num_clients), sizes)
    return _group_by_client(client_of, num_clients)


def group_of_client(num_clients: int, num_groups: int) -> np.ndarray:
    """The group each client of a grouped partition draws from: consecutive blocks of clients, as even as possible
    (15 clients over 5 groups: 0,0,0,1,1,1,...)."""
    return np.concatenate(
        [np.full(len(b), g) for g, b in enumerate(np.array_split(np.arange(num_clients), num_groups))]
    )


def grouped_partition(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, opts: PartitionOptions
) -> list[np.ndarray]:
    """Clients drawn from a few hidden distributions (FedFomo's latent and multisource settings): each sample belongs
    to a group (a source dataset, a latent cluster; -1 = nobody's); the clients are spread over the groups in
    consecutive blocks and each group's shuffled samples are cut evenly among its clients."""
    if opts.groups is None:
        raise UserError("grouped partition needs per-sample groups (a multisource dataset, or partition 'latent')")
    groups = np.asarray(opts.groups)
    if groups.shape != labels.shape:
        raise UserError(f"grouped partition: groups has shape {groups.shape}, labels {labels.shape}")
    names = np.unique(groups[groups >= 0])
    if num_clients < names.size:
        raise UserError(f"grouped partition: {num_clients} clients cannot cover {names.size} groups")
    client_group = group_of_client(num_clients, names.size)
    client_of = np.full(labels.size, -1, dtype=np.int64)
    for g, name in enumerate(names):
        members = np.flatnonzero(client_group == g)
        samples = rng.permutation(np.flatnonzero(groups == name))
        for client, part in zip(members, np.array_split(samples, members.size), strict=True):
            client_of[part] = client
    return _group_by_client(client_of, num_clients)


PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid_partition,
    "dirichlet": dirichlet_partition,
    "shards": shards_partition,
    "natural": natural_partition,
    "quantity": quantity_partition,
    "grouped": grouped_partition,
}


def partition(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.1,
    min_samples: int = 10,
    classes_per_client: int = 2,
    quantity_alpha: float = 1.0,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split sample indices over clients with the named partitioner; one sorted int64 array per client.

    ``num_clients`` may be 0 only for ``natural`` (meaning one client per group).
    """
    if name not in PARTITIONERS:
        raise UserError(f"unknown partitioner {name!r}; known: {', '.join(sorted(PARTITIONERS))}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"partition needs a 1-D label array, got shape {labels.shape}")
    n = labels.size
    num_clients = int(num_clients)
    if min_samples < 0:
        raise UserError(f"partition option min_samples must be >= 0, got {min_samples}")
    if name == "natural":
        if num_clients < 0:
            raise UserError(f"natural partition needs num_clients >= 0, got {num_clients}")
    elif num_clients < 1:
        raise UserError(f"{name} partition needs num_clients >= 1, got {num_clients}")
    elif num_clients > n:
        raise UserError(f"{name} partition: more clients ({num_clients}) than samples ({n})")
    opts = PartitionOptions(
        alpha=float(alpha),
        min_samples=int(min_samples),
        classes_per_client=int(classes_per_client),
        quantity_alpha=float(quantity_alpha),
        groups=groups,
    )
    return PARTITIONERS[name](labels, num_clients, rng, opts)
