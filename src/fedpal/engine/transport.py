"""Messages between the engine and its worker processes: pickles whose tensors travel out of band.

A message is a header (the pickle's length and each buffer's length), the pickle, then the raw bytes of every
tensor it holds. Tensors are pickled as numpy arrays whose data are not copied into the pickle (protocol 5
``PickleBuffer``s): writing a message costs the pipe transfer and nothing else, and the receiver reads each tensor
straight into its own writable buffer. (torch's default pickling of a tensor goes through ``torch.save`` per
tensor, which costs ~5 ms per megabyte each way.)
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import IO, Any

import numpy as np
import torch

COUNT = struct.Struct("<Q")


def _tensor(array: np.ndarray, dtype: str, requires_grad: bool) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor and obj.device.type == "cpu":
            data = obj.detach()
            dtype = "bfloat16" if data.dtype == torch.bfloat16 else ""
            array = (data.view(torch.int16) if dtype else data).contiguous().numpy()
            return _tensor, (array, dtype, obj.requires_grad)
        return NotImplemented


def write_message(stream: IO[bytes], value: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    head = io.BytesIO()
    _Pickler(head, protocol=5, buffer_callback=buffers.append).dump(value)
    views = [b.raw() for b in buffers]
    sizes = [head.getbuffer().nbytes, *(v.nbytes for v in views)]
    stream.write(COUNT.pack(len(sizes)) + b"".join(COUNT.pack(s) for s in sizes))
    stream.write(head.getbuffer())
    for view in views:
        stream.write(view)
    stream.flush()


def _read_exactly(stream: IO[bytes], size: int) -> bytearray | None:
    out = bytearray(size)
    view, done = memoryview(out), 0
    while done < size:
        got = stream.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            return None
        done += got
    return out


def read_message(stream: IO[bytes]) -> tuple[bool, Any]:
    """(True, value), or (False, None) at the end of the stream."""
    count = _read_exactly(stream, COUNT.size)
    if count is None:
        return False, None
    (n,) = COUNT.unpack(count)
    sizes_raw = _read_exactly(stream, COUNT.size * n)
    if sizes_raw is None:
        return False, None
    sizes = [COUNT.unpack_from(sizes_raw, i * COUNT.size)[0] for i in range(n)]
    parts = []
    for size in sizes:
        part = _read_exactly(stream, size)
        if part is None:
            return False, None
        parts.append(part)
    return True, pickle.loads(parts[0], buffers=parts[1:])
