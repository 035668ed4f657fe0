"""The executor interface: how the round driver hands client work out (in this process, to worker processes, to
a batch of clients at once, or to Flower) without knowing where it runs.

Client work is a ``ClientTask``: initialise a client, run its local update, or adapt a client that never trained.
``run_client_task`` is the client side of every task, written once: it sees the client's view, its own state and
the payload, never the server's state, so an executor in another process (or machine) runs the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from fedpal.algorithms.core.contract import ClientState, Payload, Reply
from fedpal.engine.assembly import Assembly

ClientOp = Literal["init", "fit", "adapt"]


@dataclass
class ClientTask:
    """One client's work in one round: ``init`` (a fresh state), ``fit`` (local update with ``payload``) or
    ``adapt`` (a fresh client adapted with ``payload``, its reply discarded)."""

    client: int
    round: int
    op: ClientOp
    state: ClientState | None = None
    payload: Payload | None = None


@dataclass
class ClientResult:
    state: ClientState
    reply: Reply | None  # only for "fit"
    steps: int  # optimizer steps the task took on the client's modules


class Executor(Protocol):
    """Runs a round's client tasks and returns one result per client; results must not depend on the order in
    which the tasks run."""

    def run(self, tasks: list[ClientTask]) -> dict[int, ClientResult]: ...

    def close(self) -> None: ...


def run_client_task(assembly: Assembly, task: ClientTask) -> ClientResult:
    """The client side of one task, on ``assembly``'s modules (the executor's own, in another process)."""
    algorithm = assembly.algorithm
    view = assembly.view(task.client, task.round)
    before = assembly.local_steps()
    reply: Reply | None = None
    if task.op == "init":
        state = algorithm.init_client(view)
    elif task.op == "fit":
        assert task.state is not None and task.payload is not None
        state, reply = algorithm.local_update(view, task.state, task.payload)
    else:
        assert task.payload is not None
        state = algorithm.adapt_unseen(view, algorithm.init_client(view), task.payload)
    return ClientResult(state, reply, assembly.local_steps() - before)
