"""Exact conversion of fedpal messages and client states to and from Flower records.

A value (a payload, reply or client state; DESIGN §2) becomes three records whose keys start with the caller's
prefix, so several values sit side by side in one ``RecordDict``
(``RecordDict({**to_records(a, "t0."), **to_records(b, "t1.")})``):

* ``{prefix}arrays``, an ``ArrayRecord``: every tensor as a Flower ``Array`` in Flower's own ``.npy`` format, so
  Flower tools can read it (``Array.numpy()``). A dtype numpy lacks (bfloat16, complex32, float8) travels as the
  raw bits of a same-width integer dtype and the layout names the real one;
* ``{prefix}numbers``, a ``ConfigRecord`` of every scalar (int, float, bool, str), or a ``MetricRecord`` with
  ``numbers="metric"`` for replies, which Flower expects to hold metrics (int and float only; a bool travels as
  0/1 there and the layout restores it);
* ``{prefix}layout``, a ``ConfigRecord`` holding the structure as JSON text: dict keys with their types (str or
  int) and order, list vs tuple, None, and which entry of the other two records each leaf is.

Protobuf maps do not keep their order, so the order of dict keys lives in the layout, never in a record's key
order. Entries are named by their path (``params/head.weight``) so that records stay readable in Flower's tools;
a name that two paths would share gets a ``#n`` suffix. A tensor converts from its CPU copy; its device is not
recorded (it comes back on the CPU), and neither is a tensor subclass (an ``nn.Parameter`` comes back as a plain
tensor with ``requires_grad`` set). Two references to one tensor come back as two equal tensors.

This module is the only kind that imports ``flwr``; its caller imports it lazily, so fedpal runs without Flower.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedpal.engine.messages import NUMBER_BYTES

Record: TypeAlias = ArrayRecord | ConfigRecord | MetricRecord
Scalar: TypeAlias = int | float | bool | str

LAYOUT_VERSION = 1  # bumped when the layout's JSON changes shape, so an old reader refuses a new layout loudly
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # Flower's records carry ints as 64-bit integers

# dtypes whose tensors convert to numpy as they are; others travel as the bits of an integer of the same width
NUMPY_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)
BITS_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # by element size in bytes


def arrays_key(prefix: str) -> str:
    return f"{prefix}arrays"


def numbers_key(prefix: str) -> str:
    return f"{prefix}numbers"


def layout_key(prefix: str) -> str:
    return f"{prefix}layout"


def where(path: tuple[str | int, ...]) -> str:
    """A path as Python would index it (``value['params'][0]``), so str and int keys read differently."""
    return "value" + "".join(f"[{key!r}]" for key in path)


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"the layout names an unknown tensor dtype {name!r}")
    return dtype


class _Encoder:
    """Walks a value once, filling the arrays and numbers and returning the layout tree (JSON-ready)."""

    def __init__(self, metric: bool) -> None:
        self.metric = metric
        self.arrays: dict[str, Array] = {}
        self.numbers: dict[str, Scalar] = {}
        self.names: set[str] = set()  # one namespace over both records: each name is one leaf's path
        self.open: set[int] = set()  # containers on the current path, to refuse a value that contains itself

    def name(self, path: tuple[str | int, ...]) -> str:
        base = "/".join(str(key) for key in path) or "."
        name, n = base, 0
        while name in self.names:
            n += 1
            name = f"{base}#{n}"
        self.names.add(name)
        return name

    def node(self, value: Any, path: tuple[str | int, ...]) -> Any:
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path)
        kind = type(value)
        if kind in (bool, int, float, str):
            return self.scalar(value, path)
        if kind is dict or kind is list or kind is tuple:
            if id(value) in self.open:
                raise ValueError(f"{where(path)}: the value contains itself")
            self.open.add(id(value))
            node = self.container(value, path)
            self.open.discard(id(value))
            return node
        raise TypeError(
            f"{where(path)}: Flower records hold tensors, int, float, bool, str, None and dicts, lists and tuples "
            f"of them, not {kind.__module__}.{kind.__qualname__}"
        )

    def container(self, value: dict[Any, Any] | list[Any] | tuple[Any, ...], path: tuple[str | int, ...]) -> Any:
        if isinstance(value, dict):
            entries = []
            for key, item in value.items():
                if type(key) is not str and type(key) is not int:  # bool is an int, but would come back as one
                    raise TypeError(f"{where(path)}: dict keys must be str or int, not {type(key).__name__} {key!r}")
                entries.append([key, self.node(item, (*path, key))])
            return {"kind": "dict", "items": entries}
        items = [self.node(item, (*path, index)) for index, item in enumerate(value)]
        return {"kind": type(value).__name__, "items": items}

    def scalar(self, value: Scalar, path: tuple[str | int, ...]) -> Any:
        kind = type(value).__name__
        stored: Scalar = value
        if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"{where(path)}: the int {value} does not fit the 64 bits Flower's records carry")
        if self.metric and kind == "bool":
            stored = int(value)
        if self.metric and kind == "str":
            raise TypeError(f"{where(path)}: a MetricRecord holds numbers only, not str (use numbers='config')")
        name = self.name(path)
        self.numbers[name] = stored
        return {"kind": kind, "name": name}

    def tensor(self, value: torch.Tensor, path: tuple[str | int, ...]) -> Any:
        if value.layout != torch.strided or value.is_quantized or value.is_meta:
            raise TypeError(f"{where(path)}: only dense tensors with data convert, not {value.layout} {value.dtype}")
        # the CPU copy of a tensor on an accelerator; conjugate/negative views materialised; C order for .npy
        data = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
        if data.dtype not in NUMPY_DTYPES:
            bits = BITS_DTYPES.get(data.element_size())
            if bits is None:
                raise TypeError(f"{where(path)}: no integer dtype carries the bits of {data.dtype}")
            data = data.view(bits)
        name = self.name(path)
        self.arrays[name] = Array(data.numpy())
        dtype = str(value.dtype).removeprefix("torch.")
        return {"kind": "tensor", "name": name, "dtype": dtype, "requires_grad": value.requires_grad}


def to_records(value: Any, prefix: str = "", numbers: Literal["config", "metric"] = "config") -> dict[str, Record]:
    """A fedpal value as Flower records under ``prefix``: ``{prefix}arrays``, ``{prefix}numbers`` (a ConfigRecord,
    or a MetricRecord with ``numbers="metric"``) and ``{prefix}layout``.

    Raises TypeError naming the path of a value of another type, ValueError for an int beyond 64 bits or a value
    that contains itself.
    """
    if numbers not in ("config", "metric"):
        raise ValueError(f"numbers must be 'config' or 'metric', got {numbers!r}")
    encoder = _Encoder(metric=numbers == "metric")
    tree = encoder.node(value, ())
    arrays = ArrayRecord()
    for name, array in encoder.arrays.items():
        arrays[name] = array
    number_record: ConfigRecord | MetricRecord = ConfigRecord() if numbers == "config" else MetricRecord()
    for name, number in encoder.numbers.items():
        number_record[name] = number  # type: ignore[assignment]
    layout = ConfigRecord({"version": LAYOUT_VERSION, "tree": json.dumps(tree, separators=(",", ":"))})
    return {arrays_key(prefix): arrays, numbers_key(prefix): number_record, layout_key(prefix): layout}


class _Decoder:
    """Rebuilds a value from its layout tree, taking each leaf from the arrays or numbers record once."""

    def __init__(self, arrays: ArrayRecord, numbers: ConfigRecord | MetricRecord) -> None:
        self.arrays = arrays
        self.numbers = numbers
        self.used_arrays: set[str] = set()
        self.used_numbers: set[str] = set()

    def node(self, node: Any) -> Any:
        if node is None:
            return None
        kind = node["kind"]
        if kind == "dict":
            return {key: self.node(item) for key, item in node["items"]}
        if kind == "list":
            return [self.node(item) for item in node["items"]]
        if kind == "tuple":
            return tuple(self.node(item) for item in node["items"])
        if kind == "tensor":
            return self.tensor(node)
        if kind in ("int", "float", "bool", "str"):
            return self.scalar(kind, node["name"])
        raise ValueError(f"the layout holds an unknown node kind {kind!r}")

    def scalar(self, kind: str, name: str) -> Scalar:
        if name not in self.numbers:
            raise ValueError(f"the numbers record lacks the entry {name!r} that the layout names")
        self.used_numbers.add(name)
        stored = self.numbers[name]
        if kind == "bool" and type(stored) is int and stored in (0, 1):  # a bool in a MetricRecord
            return bool(stored)
        if type(stored).__name__ != kind:
            raise ValueError(f"numbers entry {name!r} is a {type(stored).__name__}, the layout says {kind}")
        return stored  # type: ignore[return-value]

    def tensor(self, node: Mapping[str, Any]) -> torch.Tensor:
        name = node["name"]
        if name not in self.arrays:
            raise ValueError(f"the arrays record lacks the entry {name!r} that the layout names")
        self.used_arrays.add(name)
        array = self.arrays[name]
        # a fresh C-ordered copy that the tensor owns: writable, and no view onto a buffer of Flower's
        tensor = torch.from_numpy(array.numpy()).clone(memory_format=torch.contiguous_format)
        dtype = torch_dtype(node["dtype"])
        if tensor.dtype != dtype:  # the bits of a dtype numpy lacks
            tensor = tensor.view(dtype)
        if tuple(tensor.shape) != tuple(array.shape):
            raise ValueError(f"arrays entry {name!r} has shape {tuple(tensor.shape)}, its Array says {array.shape}")
        return tensor.requires_grad_() if node["requires_grad"] else tensor


def from_records(records: Mapping[str, Record], prefix: str = "") -> Any:
    """The value ``to_records`` made the records under ``prefix`` from: same structure, key types and order,
    tensors (dtype, shape, values, requires_grad; on the CPU) and scalars (type and value)."""
    arrays, numbers, layout = (records[key(prefix)] for key in (arrays_key, numbers_key, layout_key))
    if not isinstance(arrays, ArrayRecord) or not isinstance(numbers, ConfigRecord | MetricRecord):
        raise TypeError(f"records under {prefix!r} are not those of to_records")
    if not isinstance(layout, ConfigRecord) or layout.get("version") != LAYOUT_VERSION:
        raise ValueError(f"the layout under {prefix!r} is not version {LAYOUT_VERSION} of fedpal's layout")
    decoder = _Decoder(arrays, numbers)
    value = decoder.node(json.loads(str(layout["tree"])))
    unused = (set(arrays) - decoder.used_arrays) | (set(numbers) - decoder.used_numbers)
    if unused:
        raise ValueError(f"records under {prefix!r} hold entries the layout does not name: {sorted(unused)[:3]}")
    return value


def record_bytes(records: Mapping[str, Record], prefix: str = "") -> int:
    """Bytes of the value under ``prefix`` as fedpal counts them (``engine.messages.message_bytes``): each tensor's
    data plus ``NUMBER_BYTES`` per number; strings, the layout and Flower's framing are not counted."""
    arrays, numbers = records[arrays_key(prefix)], records[numbers_key(prefix)]
    if not isinstance(arrays, ArrayRecord) or not isinstance(numbers, ConfigRecord | MetricRecord):
        raise TypeError(f"records under {prefix!r} are not those of to_records")
    tensor_bytes = sum(math.prod(array.shape) * np.dtype(array.dtype).itemsize for array in arrays.values())
    number_count = sum(isinstance(number, int | float) for number in numbers.values())  # bool is an int
    return tensor_bytes + NUMBER_BYTES * number_count
