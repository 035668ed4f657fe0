"""Byte accounting and checks of Payloads and Replies, which an engine can do because they are plain dicts."""

from __future__ import annotations

import math
from typing import Any

import torch

NUMBER_BYTES = 8  # a Python int or float travels as one 64-bit value


def value_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(value_bytes(v) for v in value.values())
    if isinstance(value, int | float | bool):
        return NUMBER_BYTES
    raise TypeError(f"message values must be tensors, numbers or dicts of tensors, got {type(value).__name__}")


def message_bytes(message: dict[str, Any]) -> dict[str, int]:
    """Bytes by top-level key."""
    return {key: value_bytes(value) for key, value in message.items()}


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether no tensor holds NaN or Inf, in one cheap reduction per tensor.

    A float64 sum of float32/16 values cannot overflow (3.4e38 x 1e9 elements << 1.8e308), and NaN or Inf in
    the input always makes it non-finite, so the test is exact; it is ~5x faster than ``isfinite(t).all()``
    on CPU. float64 tensors, which could overflow the sum, take the elementwise test.
    """
    sums = []
    for t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if t.dtype == torch.float64:
            if not bool(torch.isfinite(t).all()):
                return False
        else:
            sums.append(t.sum(dtype=torch.float64))
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return _all_finite([value])
    if isinstance(value, dict):
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
        others = [v for v in value.values() if not isinstance(v, torch.Tensor)]
        return _all_finite(tensors) and all(_finite(v) for v in others)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def _shape_problem(key: str, value: Any, expected: Any) -> str | None:
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            return f"'{key}' should be a parameter set"
        missing = set(expected) - set(value)
        extra = set(value) - set(expected)
        if missing or extra:
            return f"'{key}' has keys missing {sorted(missing)[:3]} / unexpected {sorted(extra)[:3]}"
        for name, shape in expected.items():
            problem = _shape_problem(f"{key}.{name}", value[name], shape)
            if problem:
                return problem
        return None
    if expected is int or expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"'{key}' should be a number"
        return None
    if not isinstance(value, torch.Tensor):
        return f"'{key}' should be a tensor"
    if tuple(value.shape) != tuple(expected):
        return f"'{key}' has shape {tuple(value.shape)}, expected {tuple(expected)}"
    return None


def reply_problem(reply: dict[str, Any], expected_shapes: dict[str, Any]) -> str | None:
    """Why a reply must be rejected (wrong shape, missing key, NaN/Inf), or None if it is acceptable.

    ``expected_shapes`` maps a key to a shape (tensor), a dict of shapes (parameter set) or ``int``/``float``
    (a number).
    """
    for key, expected in expected_shapes.items():
        if key not in reply:
            return f"missing '{key}'"
        problem = _shape_problem(key, reply[key], expected)
        if problem:
            return problem
    for key, value in reply.items():
        try:
            value_bytes(value)
        except TypeError as exc:
            return f"'{key}': {exc}"
        if not _finite(value):
            return f"'{key}' contains NaN or Inf"
    return None
