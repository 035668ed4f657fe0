"""Multisource: five image sources with known identities, the ground truth for FedFomo's claim that clients find the
others that share their distribution. Every source keeps its own labels 0-9, so the same label means a digit in one
source and a garment or an animal in another: one model for all cannot fit every client.

Sources (group ids): 0 MNIST, 1 Fashion-MNIST, 2 Animal-MNIST, 3 inverted MNIST (255 - pixel) and 4 Fashion-MNIST
rotated by 90 degrees. Each is a fixed class-stratified sample of ``samples_per_source`` images (seed 0, the same
for every run seed; the transformed sources use other images than their originals).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedpal.data.sources import animal_mnist, fashion_mnist, mnist
from fedpal.data.sources.base import Dataset, DatasetOptions, DatasetSpec, decode_uint8_images
from fedpal.errors import UserError

SOURCES = ("mnist", "fashion_mnist", "animal_mnist", "mnist_inverted", "fashion_mnist_rotated")
PARTS = (mnist.SPEC, fashion_mnist.SPEC, animal_mnist.SPEC)


def locate(options: DatasetOptions) -> Path | None:
    """MNIST's path when all three underlying datasets are installed, else None."""
    paths = [spec.locate(options) for spec in PARTS]
    return paths[0] if all(p is not None for p in paths) else None


def _stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator, exclude: np.ndarray) -> np.ndarray:
    """``per_class`` indices of every class, none of them in ``exclude``."""
    free = np.ones(labels.size, dtype=bool)
    free[exclude] = False
    picks = []
    for c in range(10):
        members = np.flatnonzero((labels == c) & free)
        if members.size < per_class:
            raise UserError(f"multisource: {per_class} images of class {c} requested, {members.size} available")
        picks.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(picks))


def load_multisource(options: DatasetOptions) -> Dataset:
    per_class = options.samples_per_source // 10
    if per_class < 1:
        raise UserError("data.samples_per_source must be at least 10 (one image per class)")
    rng = np.random.default_rng(0)
    loaded = {spec.name: spec.load(options) for spec in PARTS}
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    used: dict[str, np.ndarray] = {}
    for source in SOURCES:
        base = source.split("_inverted")[0].split("_rotated")[0]
        data = loaded[base]
        rows = _stratified(data.y, per_class, rng, used.get(base, np.zeros(0, dtype=np.int64)))
        used[base] = np.concatenate([used.get(base, np.zeros(0, dtype=np.int64)), rows])
        x = data.x[rows]  # uint8 [n, 1, 28, 28]
        if source.endswith("_inverted"):
            x = 255 - x
        elif source.endswith("_rotated"):
            x = np.ascontiguousarray(np.rot90(x, k=1, axes=(2, 3)))
        images.append(x)
        labels.append(data.y[rows])
    groups = np.repeat(np.arange(len(SOURCES), dtype=np.int64), [len(y) for y in labels])
    return Dataset(
        name="multisource",
        x=np.concatenate(images),
        decode=decode_uint8_images,
        y=np.concatenate(labels),
        num_classes=10,
        class_names=tuple(f"class {c}" for c in range(10)),
        groups=groups,
    )


def install() -> None:
    for spec in PARTS:
        if not spec.is_installed():
            spec.install()


SPEC = DatasetSpec(
    name="multisource",
    description="MNIST, Fashion-MNIST, Animal-MNIST, inverted MNIST and rotated Fashion-MNIST as 5 known groups",
    install_command=" && ".join(spec.install_command for spec in PARTS),
    locate=locate,
    reader=load_multisource,
    installer=install,
    missing_hint="; it needs the mnist, fashion_mnist and animal_mnist datasets",
)
