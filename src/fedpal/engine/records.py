"""Messages and states as plain records: named arrays, named numbers and the names of (possibly empty) groups.

This is the shape Flower's ``RecordDict`` holds (an ``ArrayRecord`` of arrays, a ``ConfigRecord`` of scalars), so
any payload, reply or state of any method can cross a process or machine boundary. Conversion is lossless: the
same keys, nesting, dtypes, shapes and values come back (key order aside), and a number stays an int, float or
bool.

Keys are joined with ``/`` (``params/head.weight``); a key may not contain ``/`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedpal.engine.messages import NUMBER_BYTES

SEPARATOR = "/"


@dataclass
class Record:
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    numbers: dict[str, int | float | bool] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)  # every nested dict, in order, so empty ones survive

    def payload_bytes(self) -> int:
        """The serialized size of the values: every array's raw buffer plus one 64-bit word per number."""
        return sum(len(a.tobytes()) for a in self.arrays.values()) + NUMBER_BYTES * len(self.numbers)


def _key(prefix: str, key: Any) -> str:
    if not isinstance(key, str) or SEPARATOR in key:
        raise TypeError(f"record keys must be strings without '{SEPARATOR}', got {key!r}")
    return f"{prefix}{SEPARATOR}{key}" if prefix else key


def _fill(record: Record, prefix: str, values: dict[str, Any]) -> None:
    for key, value in values.items():
        name = _key(prefix, key)
        if isinstance(value, torch.Tensor):
            record.arrays[name] = value.detach().cpu().numpy().copy()
        elif isinstance(value, bool | int | float):
            record.numbers[name] = value
        elif isinstance(value, dict):
            record.groups.append(name)
            _fill(record, name, value)
        else:
            raise TypeError(f"'{name}': records hold tensors, numbers and dicts of them, not {type(value).__name__}")


def to_record(message: dict[str, Any]) -> Record:
    """A payload, reply or state as a record (tensors become numpy arrays of the same dtype and shape)."""
    record = Record()
    _fill(record, "", message)
    return record


def from_record(record: Record) -> dict[str, Any]:
    """The message or state a record was made from."""
    out: dict[str, Any] = {}

    def node(path: str) -> dict[str, Any]:
        current = out
        for part in path.split(SEPARATOR) if path else []:
            current = current.setdefault(part, {})
        return current

    for group in record.groups:
        node(group)
    for name, array in record.arrays.items():
        parent, _, leaf = name.rpartition(SEPARATOR)
        node(parent)[leaf] = torch.from_numpy(array.copy())
    for name, number in record.numbers.items():
        parent, _, leaf = name.rpartition(SEPARATOR)
        node(parent)[leaf] = number
    return out
