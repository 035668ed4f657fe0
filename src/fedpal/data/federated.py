"""FederatedData: every client's train / val / test tensors, resident in memory, built from one config.

Source -> optional class-stratified subsample -> partitioner -> per-client split -> seeded hold-out of unseen
clients -> optional device shift (``data.device_shift``: each client's own sensor rotation, gain and bias) ->
normalisation (HAR channel groups are z-scored with statistics of the training clients' pooled
training windows only) -> tensors.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedpal.common.seeding import derive_seed
from fedpal.config import DataConfig
from fedpal.data.device_shift import check_imu_windows, shift_clients
from fedpal.data.latent_distributions import latent_groups
from fedpal.data.partitioners import group_of_client, partition
from fedpal.data.sources.base import Dataset, DatasetOptions
from fedpal.data.sources.registry import load_dataset
from fedpal.data.splits import split_client
from fedpal.errors import ConfigError, UserError

SPLITS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


@dataclass
class ClientData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def to(self, device: torch.device | str) -> ClientData:
        """This client's splits on ``device``; itself when they are there already. Each split is copied on its own
        unless together they cover the storage they view (a client is a small part of its federation's)."""
        return _clients_on([self], torch.device(device))[0]


def _is_on(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


def _clients_on(clients: list[ClientData], device: torch.device) -> list[ClientData]:
    """The clients with every split on ``device``, the same objects when nothing has to move.

    The federation's splits are views of one ``x_all`` and one ``y_all``: a storage that the splits cover is
    copied once and the splits are cut from the copy again (same offsets and strides), so the device holds one copy
    of the data, not one per split. A split of a storage they do not cover is copied alone (its own elements).
    """
    tensors = [getattr(c, split) for c in clients for split in SPLITS]
    if all(_is_on(t, device) for t in tensors):
        return clients

    def key(t: torch.Tensor) -> tuple[str, int]:
        return str(t.device), t.untyped_storage().data_ptr()

    viewed: Counter[tuple[str, int]] = Counter()  # bytes of each storage the splits view
    for t in tensors:
        viewed[key(t)] += t.numel() * t.element_size()
    copies: dict[tuple[str, int], torch.UntypedStorage] = {}

    def moved(t: torch.Tensor) -> torch.Tensor:
        if _is_on(t, device):
            return t
        k = key(t)
        if viewed[k] < t.untyped_storage().nbytes():
            return t.to(device)
        if k not in copies:
            storage = t.untyped_storage()
            as_bytes = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            copies[k] = as_bytes.to(device).untyped_storage()
        view = torch.empty(0, dtype=t.dtype, device=device)
        return view.set_(copies[k], t.storage_offset(), t.shape, t.stride())

    return [ClientData(*(moved(getattr(c, split)) for split in SPLITS)) for c in clients]


@dataclass
class FederatedData:
    dataset: str
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    clients: list[ClientData]  # the federation: the clients that train, numbered 0..n-1
    # Clients held out from training entirely (data.unseen_clients), evaluated after the method's adaptation.
    unseen: list[ClientData] = field(default_factory=list)
    # Partition index (natural partition: the user's index) of each training and each held-out client.
    client_ids: list[int] = field(default_factory=list)
    unseen_ids: list[int] = field(default_factory=list)
    # Tasks over time: (client id, round, the client's data) -> its data in that round. None: data never change.
    schedule: Callable[[int, int, ClientData], ClientData] | None = None
    # The true group (source, latent distribution) each training then held-out client draws from, when known.
    client_groups: list[int] = field(default_factory=list)
    # data.target_shift: the client whose validation and test splits each training client uses (else itself).
    target_clients: list[int] = field(default_factory=list)
    # Task streams (FedMosaic): the task of each class of the union label space, each task's name and source
    # dataset, each training client's tasks in the order it meets them, and (client, round) -> the tasks that
    # client has met by that round. Empty / None for every other federation.
    label_tasks: list[int] = field(default_factory=list)
    task_names: tuple[str, ...] = ()
    task_sources: tuple[str, ...] = ()
    client_tasks: list[list[int]] = field(default_factory=list)
    tasks_seen: Callable[[int, int], list[int]] | None = None
    # Inputs that no client holds (task streams: the public block), for the adapters' once-only A/B alignment.
    public_x: torch.Tensor | None = None
    poisoned: bool = False  # the training data of an [attack]'s malicious clients are poisoned already

    def __post_init__(self) -> None:
        """Hand-made federations need not number their clients: they are partitions 0..n-1, then the held-out."""
        n = len(self.clients)
        self.client_ids = self.client_ids or list(range(n))
        self.unseen_ids = self.unseen_ids or list(range(n, n + len(self.unseen)))

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client(self, cid: int) -> ClientData:
        """Training client ``cid``; ids from num_clients on name the held-out clients, as the engine numbers them."""
        n = self.num_clients
        return self.clients[cid] if cid < n else self.unseen[cid - n]

    def client_at(self, cid: int, round: int) -> ClientData:
        """Client ``cid``'s data in ``round``: what the engine gives the algorithm (the schedule, if any, decides;
        the methods never know)."""
        data = self.client(cid)
        return data if self.schedule is None else self.schedule(cid, round, data)

    def to(self, device: torch.device | str) -> FederatedData:
        """The federation with every client's splits on ``device`` (training and held-out clients, one copy of
        the storage they share); itself when the data are there already. The schedule, if any, is kept: it then
        receives and must return clients on ``device``."""
        everyone = self.clients + self.unseen
        moved = _clients_on(everyone, torch.device(device))
        if moved is everyone:
            return self
        n = len(self.clients)
        return dataclasses.replace(self, clients=moved[:n], unseen=moved[n:])

    def label_counts(self) -> np.ndarray:
        """Samples per client per class over all three splits, [clients, classes]."""
        counts = np.zeros((self.num_clients, self.num_classes), dtype=np.int64)
        for i, c in enumerate(self.clients):
            for y in (c.train_y, c.val_y, c.test_y):
                counts[i] += np.bincount(y.cpu().numpy(), minlength=self.num_classes)
        return counts


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


def _zscore_groups(x: np.ndarray, train_mask: np.ndarray, groups: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """One mean and std per channel group, from training samples only (no test statistics leak)."""
    out = x.astype(np.float32, copy=True)
    for group in groups:
        idx = list(group)
        values = x[train_mask][:, idx]
        mean, std = float(values.mean()), float(values.std()) or 1.0
        out[:, idx] = (x[:, idx] - mean) / std
    return out


def build_federated_data(cfg: DataConfig, seed: int) -> FederatedData:
    if cfg.dataset == "task_stream" and cfg.device_shift:
        raise UserError("data.device_shift needs a dataset of IMU windows, not 'task_stream' (a mix of tasks)")
    if cfg.dataset == "task_stream":  # FedMosaic's tasks over time: a federation of its own making
        from fedpal.data.task_stream import build_task_stream

        return build_task_stream(cfg, seed)
    options = DatasetOptions(
        fashion_mnist_dir=cfg.fashion_mnist_dir,
        har_keep_transitions=cfg.har_keep_transitions,
        samples_per_source=cfg.samples_per_source,
        min_text_chars=cfg.min_text_chars,
    )
    source: Dataset = load_dataset(cfg.dataset, options)
    if cfg.device_shift:  # before any work: refuse data that are not 3-axis sensor windows
        check_imu_windows(cfg.dataset, source.x.shape[1:], source.channel_groups)
    keep = stratified_subsample(source.y, cfg.max_samples, np.random.default_rng(derive_seed(seed, "subsample")))
    labels = source.y[keep]
    groups = source.groups[keep] if source.groups is not None else None
    order = source.order[keep] if source.order is not None else None
    if cfg.partition == "natural" and groups is None:
        raise UserError(f"partition 'natural' needs a dataset with natural clients; '{cfg.dataset}' has none")
    num_clients = cfg.num_clients
    if cfg.partition == "natural" and num_clients == 0 and groups is not None:
        num_clients = int(np.unique(groups).size)
    if cfg.partition == "grouped" and groups is None:
        raise UserError(
            f"partition 'grouped' needs a dataset with groups (e.g. 'multisource'); '{cfg.dataset}' has none"
        )
    if cfg.partition == "latent":
        groups = latent_groups(
            source.inputs(keep), labels, source.num_classes, cfg.distributions, seed, cfg.embed_fraction
        )
    parts = partition(
        "grouped" if cfg.partition == "latent" else cfg.partition,
        labels,
        num_clients,
        np.random.default_rng(derive_seed(seed, "partition")),
        alpha=cfg.alpha,
        min_samples=cfg.min_samples,
        classes_per_client=cfg.classes_per_client,
        quantity_alpha=cfg.quantity_alpha,
        groups=groups,
    )
    chronological = cfg.split == "chronological" or (cfg.split == "auto" and order is not None)
    if chronological and order is None:
        raise UserError(f"split 'chronological' needs time-ordered data; '{cfg.dataset}' has no order")
    if cfg.unseen_clients >= len(parts):
        raise ConfigError(
            f"config key 'data.unseen_clients' must be below the number of clients ({len(parts)}) so that some "
            f"train, got {cfg.unseen_clients}"
        )
    fractions = (cfg.train_fraction, cfg.val_fraction, cfg.test_fraction)
    # Text is cut in time as one sequence per client: one "class" for the split.
    by_time_only = chronological and not source.stratified_time_split
    split_labels = np.zeros_like(labels) if by_time_only else labels
    splits = []
    for cid, indices in enumerate(parts):  # seeded by the partition index: a client splits the same held out or not
        rng = np.random.default_rng(derive_seed(seed, "split", cid))
        splits.append(
            split_client(
                indices, split_labels, fractions, rng, order=order if chronological else None, gap=cfg.split_gap
            )
        )
    unseen_ids = held_out_clients(len(parts), cfg.unseen_clients, seed)
    client_ids = sorted(set(range(len(parts))) - set(unseen_ids))
    # One copy of the data, ordered client by client (training clients, then held-out ones) and split by split,
    # so every client tensor is a view.
    ordered = [splits[cid] for cid in client_ids + unseen_ids]
    order = np.concatenate([np.concatenate(parts_) for parts_ in ordered]).astype(np.int64)
    if source.channel_groups:
        x = source.inputs(keep)
        if cfg.device_shift:  # each client's device, before the statistics: they see what a deployment would
            x = shift_clients(x, parts, cfg.device_shift_seed, cfg.device_shift_gain, cfg.device_shift_bias)
        train_mask = np.zeros(labels.shape[0], dtype=bool)
        for cid in client_ids:  # the held-out clients' data must not shape anything the federation trains on
            train_mask[splits[cid][0]] = True
        x_ordered = _zscore_groups(x, train_mask, source.channel_groups)[order]
    else:  # decoded after ordering: the float inputs exist once
        x_ordered = source.inputs(keep[order])
    # float32 inputs, or int64 token ids (text) as the source decodes them
    x_all = torch.from_numpy(np.ascontiguousarray(x_ordered, dtype=np.float32 if x_ordered.dtype.kind == "f" else None))
    y_all = torch.from_numpy(labels[order].astype(np.int64))
    clients = []
    start = 0
    for train, val, test in ordered:
        a, b, c = start + len(train), start + len(train) + len(val), start + len(train) + len(val) + len(test)
        clients.append(ClientData(x_all[start:a], y_all[start:a], x_all[a:b], y_all[a:b], x_all[b:c], y_all[b:c]))
        start = c
    training, targets = clients[: len(client_ids)], list(range(len(client_ids)))
    if cfg.target_shift:
        training, targets = shift_targets(training, np.random.default_rng(derive_seed(seed, "target-shift")))
    client_groups: list[int] = []
    if cfg.partition in ("grouped", "latent") and groups is not None:
        names = np.unique(groups[groups >= 0])
        by_partition = names[group_of_client(len(parts), names.size)]
        client_groups = [int(by_partition[p]) for p in client_ids + unseen_ids]
    return FederatedData(
        dataset=cfg.dataset,
        num_classes=source.num_classes,
        class_names=tuple(source.class_names),
        input_shape=tuple(source.x.shape[1:]),
        clients=training,
        unseen=clients[len(client_ids) :],
        client_ids=client_ids,
        unseen_ids=unseen_ids,
        client_groups=client_groups,
        target_clients=targets if cfg.target_shift else [],
    )


def shift_targets(clients: list[ClientData], rng: np.random.Generator) -> tuple[list[ClientData], list[int]]:
    """Client i keeps its training split and takes the validation and test splits of client targets[i], a random
    derangement (nobody keeps its own)."""
    targets = target_derangement(len(clients), rng)
    shifted = [
        ClientData(c.train_x, c.train_y, clients[t].val_x, clients[t].val_y, clients[t].test_x, clients[t].test_y)
        for c, t in zip(clients, targets, strict=True)
    ]
    return shifted, targets


def target_derangement(n: int, rng: np.random.Generator) -> list[int]:
    """A random permutation of the n clients in which nobody keeps its own index: whose splits each one takes."""
    if n < 2:
        raise UserError("data.target_shift needs at least 2 training clients")
    while True:
        targets = [int(t) for t in rng.permutation(n)]
        if all(t != i for i, t in enumerate(targets)):
            return targets


def held_out_clients(num_partitions: int, count: int, seed: int) -> list[int]:
    """The sorted partition indices of the ``count`` clients held out from training, drawn with their own seed."""
    if count <= 0:
        return []
    rng = np.random.default_rng(derive_seed(seed, "unseen-clients"))
    return sorted(int(c) for c in rng.choice(num_partitions, size=count, replace=False))
