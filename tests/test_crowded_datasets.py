"""Crowded-class datasets: MNIST (classes 0-9), Fashion-MNIST (10-19) and Animal-MNIST (20-29) as one task."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tests.conftest import tiny_config

import fedpal
from fedpal.config import DataConfig
from fedpal.data.sources import registry
from fedpal.data.sources.base import Dataset
from fedpal.errors import UserError
from fedpal.pretraining.multitask import public_rows

SOURCES = {
    "mnist_fashion": ("mnist", "fashion_mnist"),
    "mnist_fashion_animal": ("mnist", "fashion_mnist", "animal_mnist"),
}


def installed(name: str) -> None:
    if not registry.get_dataset_spec(name).is_installed():
        pytest.skip(f"dataset {name} not installed")


def image_set(data: Dataset, label: int) -> set[bytes]:
    return {row.tobytes() for row in data.x[data.y == label]}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_classes_are_the_sources_side_by_side_and_balanced(name: str) -> None:
    installed(name)
    data = registry.load_dataset(name)
    sources = [registry.load_dataset(source) for source in SOURCES[name]]
    assert data.num_classes == 10 * len(sources) and len(data.class_names) == data.num_classes
    counts = np.bincount(data.y, minlength=data.num_classes)
    smallest = min(int(np.bincount(s.y, minlength=10).min()) for s in sources)
    assert counts.tolist() == [smallest] * data.num_classes  # every class cut to the smallest class's count
    assert data.groups is not None and np.array_equal(data.groups, data.y // 10)  # group = source
    for k, source in enumerate(sources):  # class 10k + c holds source k's images of class c, and only those
        for c in range(10):
            assert image_set(data, 10 * k + c) <= image_set(source, c), (source.name, c)  # (Animal-MNIST repeats some)
        assert data.class_names[10 * k] == f"{source.name}: {source.class_names[0]}"


def test_fashion_images_decode_as_in_their_own_source() -> None:
    installed("mnist_fashion")
    data, fashion = registry.load_dataset("mnist_fashion"), registry.load_dataset("fashion_mnist")
    assert data.x.shape[1:] == (1, 28, 28) and data.x.dtype == np.uint8
    row = int(np.flatnonzero(data.y == 13)[0])  # a Fashion-MNIST dress (class 3)
    match = next(i for i in np.flatnonzero(fashion.y == 3) if np.array_equal(fashion.x[i], data.x[row]))
    ours, theirs = data.inputs(np.array([row])), fashion.inputs(np.array([match]))
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)
    assert ours.min() >= -1 and ours.max() <= 1


def test_the_sample_is_fixed_whatever_the_run_seed() -> None:
    installed("mnist_fashion_animal")
    first, second = registry.load_dataset("mnist_fashion_animal"), registry.load_dataset("mnist_fashion_animal")
    assert np.array_equal(first.x, second.x) and np.array_equal(first.y, second.y)


def test_a_tiny_run_on_thirty_classes() -> None:
    installed("mnist_fashion_animal")
    raw = tiny_config(
        "fedproto",
        data={"dataset": "mnist_fashion_animal", "max_samples": 900, "num_clients": 3, "alpha": 1.0},
        train={"rounds": 1},
    )
    result = fedpal.run(raw)
    assert math.isfinite(result.personalized_accuracy)
    assert 0.0 <= result.personalized_accuracy <= 1.0


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_a_source_they_contain_cannot_pre_train(name: str) -> None:
    installed("mnist")
    mnist = registry.load_dataset("mnist")
    with pytest.raises(UserError, match=rf"part of data\.dataset '{name}'"):
        public_rows("mnist", mnist, DataConfig(dataset=name), 0, 50)


def test_missing_sources_name_every_install_step() -> None:
    spec = registry.get_dataset_spec("mnist_fashion_animal")
    for source in SOURCES["mnist_fashion_animal"]:
        assert registry.get_dataset_spec(source).install_command in spec.install_command
    assert "mnist, fashion_mnist, animal_mnist" in spec.not_installed_message()
