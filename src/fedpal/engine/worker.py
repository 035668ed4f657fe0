"""A worker process of the process executor (``python -c "from fedpal.engine.worker import main; main()"``).

It speaks length-prefixed pickles over its standard input and output: first the run (config and data, the data's
tensors shared through shared memory), then lists of client tasks, answered with their results; ``None`` or the
end of its input ends it. It prints nothing on standard output (that is the channel); logs go to standard error.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import traceback
from typing import IO, Any

HEADER = struct.Struct("<Q")


def write_message(stream: IO[bytes], payload: bytes) -> None:
    stream.write(HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def read_message(stream: IO[bytes]) -> bytes | None:
    """The next message, or None at the end of the stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return payload


def describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()


def serve(inbox: IO[bytes], outbox: IO[bytes]) -> None:
    import torch

    from fedpal.engine.assembly import assemble
    from fedpal.engine.executor import run_client_task

    torch.set_num_threads(1)

    def answer(status: str, value: Any) -> None:
        write_message(outbox, pickle.dumps((status, value), protocol=pickle.HIGHEST_PROTOCOL))

    first = read_message(inbox)
    if first is None:
        return
    try:
        config, data = pickle.loads(first)
        assembly = assemble(config, data)
        torch.set_num_threads(1)  # whatever train.threads says: one thread per worker process
        answer("ready", None)
    except BaseException as exc:
        answer("error", describe(exc))
        return
    while (message := read_message(inbox)) is not None:
        tasks = pickle.loads(message)
        if tasks is None:
            return
        try:
            answer("ok", {task.client: run_client_task(assembly, task) for task in tasks})
        except BaseException as exc:
            answer("error", describe(exc))


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    channel_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # anything printed by accident must not corrupt the channel
    serve(sys.stdin.buffer, channel_out)
