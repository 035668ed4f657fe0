"""The one registry of datasets fedpal can load offline, keyed by the name used in configs and on the CLI."""

from __future__ import annotations

import difflib

from fedpal.data.sources import animal_mnist, crowded, digits, fashion_mnist, hapt, mnist, multisource, shakespeare
from fedpal.data.sources.base import Dataset, DatasetOptions, DatasetSpec
from fedpal.errors import UserError

__all__ = ["DATASETS", "get_dataset_spec", "load_dataset"]

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in sorted(
        (
            animal_mnist.SPEC,
            digits.SPEC,
            fashion_mnist.SPEC,
            hapt.SPEC,
            mnist.SPEC,
            multisource.SPEC,
            shakespeare.SPEC,
            *crowded.SPECS,
        ),
        key=lambda s: s.name,
    )
}


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec called ``name``; an unknown name is a one-line UserError listing the known ones."""
    spec = DATASETS.get(name)
    if spec is not None:
        return spec
    known = sorted(DATASETS)
    message = f"unknown dataset {name!r}; known: {', '.join(known)}"
    close = difflib.get_close_matches(str(name).lower().replace("-", "_"), known, n=1, cutoff=0.6)
    if close:
        message += f"; did you mean {close[0]!r}?"
    raise UserError(message)


def load_dataset(name: str, options: DatasetOptions | None = None) -> Dataset:
    """Load a dataset by name (raises DatasetNotInstalled with the install command when it is absent)."""
    return get_dataset_spec(name).load(options or DatasetOptions())
