"""FedFomo's data settings: latent-distribution clients, the multisource dataset (with Animal-MNIST) and target
shift, each with the ground truth the benchmark needs (the group of every client, the target of every client)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.conftest import tiny_config

from fedpal.config import from_dict
from fedpal.data.federated import build_federated_data
from fedpal.data.sources import registry
from fedpal.errors import UserError


def federation(**data):
    cfg = from_dict(tiny_config("fedfomo", data={"max_samples": 0, **data}))
    return build_federated_data(cfg.data, cfg.seed)


def test_target_shift_swaps_validation_and_test_splits_but_keeps_training_data() -> None:
    plain, shifted = federation(num_clients=5), federation(num_clients=5, target_shift=True)
    targets = shifted.target_clients
    assert sorted(targets) == list(range(5)) and all(t != i for i, t in enumerate(targets))
    for i, t in enumerate(targets):
        mine, theirs = plain.clients[i], plain.clients[t]
        assert torch.equal(shifted.clients[i].train_x, mine.train_x)
        assert torch.equal(shifted.clients[i].test_y, theirs.test_y) and torch.equal(
            shifted.clients[i].val_x, theirs.val_x
        )
    assert federation(num_clients=5, target_shift=True).target_clients == targets  # seeded
    assert plain.target_clients == []


def test_latent_clients_share_their_embedding_group() -> None:
    data = federation(partition="latent", num_clients=6, distributions=3, embed_fraction=0.2)
    assert data.client_groups == [0, 0, 1, 1, 2, 2]
    total = sum(c.train_y.numel() + c.val_y.numel() + c.test_y.numel() for c in data.clients)
    assert total == pytest.approx(1797 * 0.8, abs=10)  # the embedding split belongs to no client
    again = federation(partition="latent", num_clients=6, distributions=3, embed_fraction=0.2)
    assert all(torch.equal(a.train_x, b.train_x) for a, b in zip(data.clients, again.clients, strict=True))
    # a latent group is a region of input space: its clients' label mixes are alike, other groups' differ
    mixes = [np.bincount(c.train_y.numpy(), minlength=10) / c.train_y.numel() for c in data.clients]
    within = np.mean([np.abs(mixes[2 * g] - mixes[2 * g + 1]).sum() for g in range(3)])
    across = np.mean([np.abs(mixes[a] - mixes[b]).sum() for a in range(6) for b in range(6) if a // 2 != b // 2])
    assert within < across


def test_grouped_needs_groups() -> None:
    with pytest.raises(UserError, match="multisource"):
        federation(partition="grouped")


def _installed(name: str) -> None:
    if not registry.get_dataset_spec(name).is_installed():
        pytest.skip(f"dataset {name} not installed")


def test_animal_mnist() -> None:
    _installed("animal_mnist")
    ds = registry.load_dataset("animal_mnist")
    assert ds.x.shape == (10_000, 1, 28, 28) and ds.x.dtype == np.uint8
    assert np.bincount(ds.y).tolist() == [1000] * 10 and ds.class_names[0] == "bear"
    x = ds.inputs(np.arange(100))
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1


def test_multisource_has_five_known_sources() -> None:
    _installed("multisource")
    options = registry.DatasetOptions(samples_per_source=200)
    ds = registry.get_dataset_spec("multisource").load(options)
    assert ds.groups is not None and np.bincount(ds.groups).tolist() == [200] * 5
    for g in range(5):
        assert np.bincount(ds.y[ds.groups == g], minlength=10).tolist() == [20] * 10
    mean = [float(ds.x[ds.groups == g].mean()) for g in range(5)]
    assert mean[3] > 255 - mean[0] - 15  # inverted MNIST is mostly white (255 - a mostly black digit)
    mnist, inverted = ds.x[ds.groups == 0], 255 - ds.x[ds.groups == 3]
    assert not any((inverted == image).all() for image in mnist[:50])  # other images than the MNIST source
    cfg = from_dict(
        tiny_config(
            "fedfomo",
            data={
                "dataset": "multisource",
                "partition": "grouped",
                "num_clients": 10,
                "samples_per_source": 200,
                "max_samples": 0,
            },
        )
    )
    data = build_federated_data(cfg.data, cfg.seed)
    assert data.client_groups == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
