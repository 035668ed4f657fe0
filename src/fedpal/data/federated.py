"""build_federated_data: every client's train / val / test tensors (``fedpal.data.client_data``), built from one config.

Source -> optional class-stratified subsample -> partitioner -> per-client split -> seeded hold-out of unseen
clients -> optional device shift (``data.device_shift``: each client's own sensor rotation, gain and bias) ->
normalisation (HAR channel groups are z-scored with statistics of the training clients' pooled
training windows only) -> tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from fedpal.common.seeding import derive_seed
from fedpal.config import DataConfig
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.data.device_shift import check_imu_windows, shift_clients
from fedpal.data.latent_distributions import latent_groups
from fedpal.data.partitioners import group_of_client, partition
from fedpal.data.sources.base import Dataset, DatasetOptions
from fedpal.data.sources.registry import load_dataset
from fedpal.data.splits import split_client
from fedpal.data.subsample import stratified_subsample
from fedpal.errors import ConfigError, UserError


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
