"""Offline dataset loaders: each dataset is read from files shipped inside an installed package.

Use :func:`fedpal.data.sources.registry.load_dataset` (or ``registry.DATASETS``) rather than the per-dataset
modules, so every caller gets the same not-installed errors and install commands.
"""

from fedpal.data.sources.base import Dataset, DatasetOptions, DatasetSpec
from fedpal.data.sources.registry import DATASETS, get_dataset_spec, load_dataset

__all__ = ["DATASETS", "Dataset", "DatasetOptions", "DatasetSpec", "get_dataset_spec", "load_dataset"]
