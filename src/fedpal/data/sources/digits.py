"""scikit-learn's bundled digits (1,797 8x8 images), read from the CSV inside the installed wheel.

Importing sklearn costs seconds and pulls scipy; the data is one small gzip CSV, so fedpal reads the file.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fedpal.data.sources.base import (
    CorruptDatasetFile,
    Dataset,
    DatasetOptions,
    locate_package_file,
    pip_dataset_spec,
)

DISTRIBUTION = "scikit-learn"
REQUIREMENT = "scikit-learn==1.9.1"
DATA_FILE = "sklearn/datasets/data/digits.csv.gz"
CLASS_NAMES: tuple[str, ...] = tuple(str(digit) for digit in range(10))


def locate(options: DatasetOptions) -> Path | None:
    """The CSV's path, or None when scikit-learn is not installed."""
    return locate_package_file(DISTRIBUTION, DATA_FILE)


def load_digits(options: DatasetOptions) -> Dataset:
    """Rows of 64 pixel values 0..16 followed by the label; pixels scaled to [-1, 1] via (v/16 - 0.5)/0.5."""
    path = locate(options)
    if path is None:
        raise FileNotFoundError(DATA_FILE)
    with gzip.open(path, "rt", encoding="ascii") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != 65:
        raise CorruptDatasetFile(f"{path}: expected 65 columns, got {table.shape[1]}")
    pixels = table[:, :64]
    if pixels.min() < 0 or pixels.max() > 16:
        raise CorruptDatasetFile(f"{path}: pixel values outside 0..16")
    x = ((pixels / 16.0 - 0.5) / 0.5).astype(np.float32).reshape(-1, 1, 8, 8)
    return Dataset(
        name="digits",
        x=x,
        y=table[:, 64].astype(np.int64),
        num_classes=10,
        class_names=CLASS_NAMES,
    )


SPEC = pip_dataset_spec(
    "digits", "scikit-learn digits, 1,797 8x8 digits, 10 classes (fast unit tests)", REQUIREMENT, locate, load_digits
)
