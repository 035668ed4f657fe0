"""Animal-MNIST (10,000 28x28 white-on-black animal silhouettes, 10 classes of 1,000) from PyPI
``animal-mnist==0.4``, read without importing the package (its loader imports TensorFlow).

The package has no train/test split; the federation's per-client splits make one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedpal.data.sources.base import (
    CorruptDatasetFile,
    Dataset,
    DatasetOptions,
    decode_uint8_images,
    locate_package_file,
    pip_dataset_spec,
    uint8_images,
)
from fedpal.data.sources.safe_unpickle import load_numpy_pickle

DISTRIBUTION = "animal-mnist"
REQUIREMENT = "animal-mnist==0.4"
FOLDER = "animal_mnist/data/Animal_MNIST"
IMAGES = f"{FOLDER}/animal_data_version_3.gz"
LABELS = f"{FOLDER}/animal_label_version_3.gz"
CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def locate(options: DatasetOptions) -> Path | None:
    """The images' path (the labels sit beside it), or None when animal-mnist is not installed."""
    images = locate_package_file(DISTRIBUTION, IMAGES)
    return images if images is not None and locate_package_file(DISTRIBUTION, LABELS) is not None else None


def load_animal_mnist(options: DatasetOptions) -> Dataset:
    path = locate(options)
    if path is None:
        raise FileNotFoundError(IMAGES)
    images = load_numpy_pickle(path)
    labels = load_numpy_pickle(path.with_name(Path(LABELS).name))
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise CorruptDatasetFile(f"{path}: expected uint8 images of 28x28")
    if not isinstance(labels, np.ndarray) or labels.shape != (len(images),):
        raise CorruptDatasetFile(f"{path}: expected one label per image")
    return Dataset(
        name="animal_mnist",
        x=uint8_images(images, 28, 28),
        decode=decode_uint8_images,
        y=labels.astype(np.int64),
        num_classes=10,
        class_names=CLASS_NAMES,
    )


SPEC = pip_dataset_spec(
    "animal_mnist", "Animal-MNIST, 10,000 28x28 animal silhouettes, 10 classes", REQUIREMENT, locate, load_animal_mnist
)
