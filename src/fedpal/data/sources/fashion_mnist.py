"""Fashion-MNIST (70,000 images) from the IDX files of the Debian package ``dataset-fashion-mnist``.

No PyPI package ships it. The directory is a config key (``data.fashion_mnist_dir``) so that users without
root can extract the .deb anywhere and point fedpal at it.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fedpal.data.sources.base import (
    CorruptDatasetFile,
    Dataset,
    DatasetOptions,
    DatasetSpec,
    decode_uint8_images,
    run_install_step,
    uint8_images,
)
from fedpal.errors import UserError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = "usr/share/datasets/fashion-mnist"
USER_DIR = Path("~/.cache/fedpal/fashion-mnist")
IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
# (images, labels) per split, train first so the first 60,000 samples are the original training set.
SPLITS: tuple[tuple[str, str], ...] = (
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _has_all_files(directory: Path) -> bool:
    return all((directory / name).is_file() for split in SPLITS for name in split)


def locate(options: DatasetOptions) -> Path | None:
    """The directory holding the four IDX files: the configured one, or a ``dpkg-deb -x`` tree below it."""
    configured = Path(options.fashion_mnist_dir).expanduser()
    for candidate in (configured, configured / DEBIAN_DIR):
        if _has_all_files(candidate):
            return candidate
    return None


def _read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Decode one gzip IDX file (big-endian header: magic, count, then dims) into a uint8 array."""
    raw = gzip.decompress(path.read_bytes())
    ndim = 1 + len(item_shape)
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise CorruptDatasetFile(f"{path}: magic number {int(header[0])}, expected {magic}")
    dims = tuple(int(d) for d in header[1:])
    if dims[1:] != item_shape:
        raise CorruptDatasetFile(f"{path}: item shape {dims[1:]}, expected {item_shape}")
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if body.size != int(np.prod(dims)):
        raise CorruptDatasetFile(f"{path}: {body.size} bytes of data for shape {dims}")
    return body.reshape(dims)


def load_fashion_mnist(options: DatasetOptions) -> Dataset:
    """Train (60,000) then test (10,000), pixels scaled to [-1, 1]."""
    directory = locate(options)
    if directory is None:
        raise FileNotFoundError(options.fashion_mnist_dir)
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for image_file, label_file in SPLITS:
        split_images = _read_idx(directory / image_file, IMAGE_MAGIC, (28, 28))
        split_labels = _read_idx(directory / label_file, LABEL_MAGIC, ())
        if len(split_images) != len(split_labels):
            raise CorruptDatasetFile(f"{directory}: {len(split_images)} images but {len(split_labels)} labels")
        images.append(split_images)
        labels.append(split_labels)
    return Dataset(
        name="fashion_mnist",
        x=uint8_images(np.concatenate(images), 28, 28),
        decode=decode_uint8_images,
        y=np.concatenate(labels).astype(np.int64),
        num_classes=10,
        class_names=CLASS_NAMES,
    )


def install() -> None:
    """Root: apt-get install. Otherwise: download the .deb and unpack its files into ~/.cache/fedpal."""
    if shutil.which("apt-get") is None:
        raise UserError(
            f"installing dataset 'fashion_mnist' failed: apt-get not found (it ships only as the Debian "
            f"package {DEBIAN_PACKAGE}); put its IDX files in a directory and point data.fashion_mnist_dir "
            "at it"
        )
    what = "dataset 'fashion_mnist'"
    if os.geteuid() == 0:
        run_install_step(["apt-get", "update"], what)
        run_install_step(["apt-get", "install", "-y", DEBIAN_PACKAGE], what)
        return
    if shutil.which("dpkg-deb") is None:
        raise UserError(f"installing {what} failed: dpkg-deb not found")
    target = USER_DIR.expanduser()
    with tempfile.TemporaryDirectory(prefix="fedpal-fashion-") as tmp:
        run_install_step(["apt-get", "download", DEBIAN_PACKAGE], what, cwd=tmp)
        debs = sorted(Path(tmp).glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise UserError(f"installing {what} failed: apt-get download produced no .deb")
        unpacked = Path(tmp) / "root"
        run_install_step(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], what)
        source = unpacked / DEBIAN_DIR
        if not _has_all_files(source):
            raise UserError(f"installing {what} failed: the .deb holds no IDX files under /{DEBIAN_DIR}")
        target.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            for name in split:
                shutil.copyfile(source / name, target / name)
    print(f"Fashion-MNIST unpacked into {target}; set data.fashion_mnist_dir: {target} in your config")


SPEC = DatasetSpec(
    name="fashion_mnist",
    description="Fashion-MNIST, 70,000 28x28 clothing images, 10 classes",
    install_command=f"apt-get update && apt-get install -y {DEBIAN_PACKAGE}",
    locate=locate,
    reader=load_fashion_mnist,
    installer=install,
    missing_hint=(
        f"without root it unpacks into {USER_DIR}; set data.fashion_mnist_dir to a directory holding the IDX files"
    ),
)
