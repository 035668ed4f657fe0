"""A worker process of the process executor (``python -c "from fedpal.engine.worker import main; main()"``).

It speaks ``fedpal.engine.transport`` messages over its standard input and output: first the run (config and data,
the data's tensors shared through shared memory, in a pickle of its own), then lists of client tasks, answered task by
task with (client, result); ``None`` or the end of its input ends it. It prints nothing on standard output (that is the
channel); logs go to standard error.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from typing import IO, Any

from fedpal.engine.transport import read_message, write_message


def describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()


def serve(inbox: IO[bytes], outbox: IO[bytes]) -> None:
    import torch

    from fedpal.engine.assembly import assemble
    from fedpal.engine.executor import run_client_task

    torch.set_num_threads(1)

    def answer(status: str, value: Any) -> None:
        write_message(outbox, (status, value))

    received, first = read_message(inbox)
    if not received:
        return
    try:
        config, data = pickle.loads(first)
        assembly = assemble(config, data)
        torch.set_num_threads(1)  # whatever train.threads says: one thread per worker process
        answer("ready", None)
    except BaseException as exc:
        answer("error", describe(exc))
        return
    while True:
        received, tasks = read_message(inbox)
        if not received or tasks is None:
            return
        try:
            for task in tasks:  # one answer per task, as it completes: the engine folds replies as they arrive
                answer("ok", (task.client, run_client_task(assembly, task)))
        except BaseException as exc:
            answer("error", describe(exc))  # the rest of this list is dropped; the engine stops at an error


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    channel_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # anything printed by accident must not corrupt the channel
    serve(sys.stdin.buffer, channel_out)
