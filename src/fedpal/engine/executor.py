"""The executor interface: how the round driver hands client work out (in this process, to worker processes, to
a batch of clients at once, or to Flower) without knowing where it runs.

Client work is a ``ClientTask``: initialise a client, run its local update, adapt a client that never trained, or
score its personalized model on its own data for the evaluator.
``run_client_task`` is the client side of every task, written once: it sees the client's view, its own state and
the payload, never the server's state, so an executor in another process (or machine) runs the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from fedpal.algorithms.core.contract import ClientState, ClientView, Payload, Reply
from fedpal.common.tensors import Tensors
from fedpal.engine.assembly import Assembly
from fedpal.engine.attack_simulation import malicious_of
from fedpal.evaluation.backdoor import backdoor_target, client_backdoor_hits
from fedpal.evaluation.client_report import ClientReport, report_client, report_global
from fedpal.evaluation.client_side import ClientPredictions, predict_client

ClientOp = Literal["init", "fit", "adapt", "evaluate", "score", "report"]


@dataclass
class ClientTask:
    """One client's work in one round: ``init`` (a fresh state), ``fit`` (local update with ``payload``),
    ``adapt`` (a fresh client adapted with ``payload``, its reply discarded) or ``evaluate`` (scores of its
    personalized model, from its state and the evaluation ``payload``, on its own splits and on ``probe``) or
    ``report`` (the same, summed up on the client: a ``ClientReport``; with ``params``, the global model's score as
    client 0 holds it with ``holder_payload``)."""

    client: int
    round: int
    op: ClientOp
    state: ClientState | None = None
    payload: Payload | None = None
    probe: torch.Tensor | None = None  # evaluate: the generalization sample; score: the inputs to score
    # score: the model to score; ``client`` then numbers the chunk, and ``viewer`` names whose module scores it
    params: Tensors | None = None
    viewer: int = 0
    holder_payload: Payload | None = None  # report: client 0's evaluation payload, to score the global ``params``


@dataclass
class ClientResult:
    state: ClientState
    reply: Reply | None  # only for "fit"
    steps: int  # optimizer steps the task took on the client's modules
    predictions: ClientPredictions | None = None  # only for "evaluate"
    scores: dict[str, torch.Tensor] | None = None  # only for "score"
    report: ClientReport | None = None  # only for "report"
    failure: str | None = None  # why the task has no result (a node lost, a timeout); everything else is empty


class Executor(Protocol):
    """Runs a round's client tasks and returns one result per client; results must not depend on the order in
    which the tasks run."""

    def run(self, tasks: list[ClientTask]) -> dict[int, ClientResult]: ...

    def stream(self, tasks: list[ClientTask]) -> Iterator[tuple[int, ClientResult]]:
        """(client, result) as each task completes, in any order, so the caller need not hold them all."""
        ...

    def close(self) -> None: ...


def in_id_order(results: Iterable[tuple[int, ClientResult]], ids: list[int]) -> Iterator[tuple[int, ClientResult]]:
    """Results as they arrive, handed on in ascending client id: only those that arrive early are held, so a
    consumer that keeps nothing of a result (a fold, a running metric) holds one at a time."""
    order, position = sorted(ids), 0
    waiting: dict[int, ClientResult] = {}
    for cid, result in results:
        waiting[cid] = result
        while position < len(order) and order[position] in waiting:
            yield order[position], waiting.pop(order[position])
            position += 1


def run_client_task(
    assembly: Assembly, task: ClientTask, wrap: Callable[[ClientView], ClientView] | None = None
) -> ClientResult:
    """The client side of one task, on ``assembly``'s modules (the executor's own, in another process); ``wrap``
    lets an executor adjust the view (the batched executor routes its training passes)."""
    algorithm = assembly.algorithm
    if task.op == "score":  # a chunk of a central evaluation: one model on pooled inputs, not a client's work
        assert task.params is not None and task.probe is not None and task.payload is not None
        view = assembly.view(task.viewer, task.round)
        scores = algorithm.predict_scores(view, task.state or {}, task.payload, task.params, task.probe)
        return ClientResult(task.state or {}, None, 0, scores=scores)
    view = assembly.view(task.client, task.round)
    if wrap is not None:
        view = wrap(view)
    before = assembly.local_steps()
    reply: Reply | None = None
    predictions: ClientPredictions | None = None
    if task.op == "init":
        state = algorithm.init_client(view)
    elif task.op == "fit":
        assert task.state is not None and task.payload is not None
        state, reply = algorithm.local_update(view, task.state, task.payload)
    elif task.op == "adapt":
        assert task.payload is not None
        state = algorithm.adapt_unseen(view, algorithm.init_client(view), task.payload)
    elif task.op == "report":
        assert task.state is not None and task.payload is not None
        own = assembly.data.client(task.client)
        state = task.state
        data = assembly.data
        report = report_client(
            algorithm,
            view,
            state,
            task.payload,
            own,
            data.num_classes,
            data.label_tasks,
            algorithm.personalized_is_global,
        )
        attack = assembly.config.attack
        if attack.type == "backdoor" and task.client not in malicious_of(assembly.config, data):
            target = backdoor_target(attack, data.num_classes)
            report.backdoor_hits, report.backdoor_samples = client_backdoor_hits(
                algorithm, view, state, task.payload, data, target
            )
        if task.params is not None and task.holder_payload is not None:
            holder = assembly.view(0, task.round)
            report_global(algorithm, holder, task.holder_payload, task.params, own, data.num_classes, report)
        return ClientResult(state, None, assembly.local_steps() - before, report=report)
    else:
        assert task.state is not None and task.payload is not None
        own = assembly.data.client(task.client)  # the splits the evaluator summarises
        state = task.state
        predictions = predict_client(algorithm, view, state, task.payload, own.test_x, own.val_x, task.probe)
    return ClientResult(state, reply, assembly.local_steps() - before, predictions)
