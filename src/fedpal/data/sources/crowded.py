"""Crowded classes: MNIST, Fashion-MNIST and Animal-MNIST as one task whose classes are the union of theirs, the
setting where ProtoNorm says averaged prototypes crowd together (specs/protonorm.md, DATA.md's 30-class stress test).

``mnist_fashion``: MNIST digits are classes 0-9, Fashion-MNIST garments classes 10-19 (20 classes);
``mnist_fashion_animal``: besides them Animal-MNIST's animals are classes 20-29 (30 classes). Every source is read by
its own loader, so the images are the same 1x28x28 uint8 pixels, decoded to [-1, 1] by the one image decoder.
Every class keeps the same number of images, the smallest class count among the sources (MNIST's digit 5 has 6,313;
Animal-MNIST has 1,000 per class), so that the only change from a single source is how many classes there are and
not how often each is seen: a fixed sample, seed 0, the same for every run seed. ``groups`` holds each image's
source (0 MNIST, 1 Fashion-MNIST, 2 Animal-MNIST).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedpal.data.sources import animal_mnist, fashion_mnist, mnist
from fedpal.data.sources.base import Dataset, DatasetOptions, DatasetSpec, decode_uint8_images

CLASSES_PER_SOURCE = 10


def _locator(parts: tuple[DatasetSpec, ...]) -> Callable[[DatasetOptions], Path | None]:
    def locate(options: DatasetOptions) -> Path | None:
        """The first source's path when every source is installed, else None."""
        paths = [spec.locate(options) for spec in parts]
        return paths[0] if all(p is not None for p in paths) else None

    return locate


def _reader(name: str, parts: tuple[DatasetSpec, ...]) -> Callable[[DatasetOptions], Dataset]:
    def load(options: DatasetOptions) -> Dataset:
        """Source k's class c becomes class 10 k + c; every class cut to the smallest class's count."""
        loaded = [spec.load(options) for spec in parts]
        per_class = min(int(np.bincount(data.y, minlength=CLASSES_PER_SOURCE).min()) for data in loaded)
        rng = np.random.default_rng(0)
        images, labels, groups = [], [], []
        for k, data in enumerate(loaded):
            if data.num_classes != CLASSES_PER_SOURCE or data.x.shape[1:] != (1, 28, 28) or data.x.dtype != np.uint8:
                raise ValueError(f"{name}: source '{data.name}' is not 10 classes of 1x28x28 uint8 images")
            rows = np.sort(
                np.concatenate([rng.choice(np.flatnonzero(data.y == c), per_class, replace=False) for c in range(10)])
            )
            images.append(data.x[rows])
            labels.append(data.y[rows] + CLASSES_PER_SOURCE * k)
            groups.append(np.full(rows.size, k, dtype=np.int64))
        class_names = tuple(f"{data.name}: {label}" for data in loaded for label in data.class_names)
        return Dataset(
            name=name,
            x=np.concatenate(images),
            decode=decode_uint8_images,
            y=np.concatenate(labels).astype(np.int64),
            num_classes=CLASSES_PER_SOURCE * len(parts),
            class_names=class_names,
            groups=np.concatenate(groups),
        )

    return load


def _installer(parts: tuple[DatasetSpec, ...]) -> Callable[[], None]:
    def install() -> None:
        for spec in parts:
            if not spec.is_installed():
                spec.install()

    return install


def _spec(name: str, description: str, parts: tuple[DatasetSpec, ...]) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        description=description,
        install_command=" && ".join(spec.install_command for spec in parts),
        locate=_locator(parts),
        reader=_reader(name, parts),
        installer=_installer(parts),
        missing_hint=f"it needs the {', '.join(spec.name for spec in parts)} datasets",
    )


MNIST_FASHION_PARTS = (mnist.SPEC, fashion_mnist.SPEC)
MNIST_FASHION_ANIMAL_PARTS = (mnist.SPEC, fashion_mnist.SPEC, animal_mnist.SPEC)
MNIST_FASHION = _spec(
    "mnist_fashion",
    "MNIST digits (classes 0-9) and Fashion-MNIST (10-19) as one 20-class task, 6,313 images per class",
    MNIST_FASHION_PARTS,
)
MNIST_FASHION_ANIMAL = _spec(
    "mnist_fashion_animal",
    "MNIST (classes 0-9), Fashion-MNIST (10-19) and Animal-MNIST (20-29) as one 30-class task, 1,000 images per class",
    MNIST_FASHION_ANIMAL_PARTS,
)
SPECS = (MNIST_FASHION, MNIST_FASHION_ANIMAL)
# the source datasets each crowded dataset is built from (a pre-training split of one of them would overlap it)
COMPOSITION: dict[str, tuple[str, ...]] = {
    MNIST_FASHION.name: tuple(part.name for part in MNIST_FASHION_PARTS),
    MNIST_FASHION_ANIMAL.name: tuple(part.name for part in MNIST_FASHION_ANIMAL_PARTS),
}
