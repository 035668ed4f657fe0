"""The Flower executor: the round driver's client tasks sent through Flower's Grid to the nodes that host the
clients, and the replies mapped back.

Each call sends one message per node with all of that node's tasks (a deployed node starts a process per message,
so one per round is the cheapest), pulls the replies as they arrive, and maps each reply back by the id of the
message it answers. A reply that is an error (the ClientApp raised, the node was declared lost, its upload broke
off) or that has not reached the SuperLink within ``flower.round_timeout`` fails every task of its node: the driver
counts those clients as failed and goes on with the others. The node list is read again before every call, and
nodes not seen before are asked which clients they host, so a restarted node (with a new Flower node id) takes its
clients back.

Client states stay on the nodes; what the driver keeps for a client is a reference, the round of the state the
client's next task starts from, so a rejected reply leaves the previous state referenced, and a checkpoint holds
the references.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedpal.config import FlowerConfig
from fedpal.engine.assembly import Assembly
from fedpal.engine.executor import ClientResult, ClientTask
from fedpal.evaluation.client_report import ClientReport
from fedpal.flower.records import from_records, to_records

log = logging.getLogger("fedpal")

STATE_ROUND = "flower_state_round"  # the one key of the state the driver keeps for a client on a Flower node
MESSAGE_TYPES = {"fit": "train", "report": "evaluate"}


class FlowerExecutor:
    """Client work on Flower nodes; see the module docstring. ``header`` goes with every message (the run's
    config text, a key naming the run, and where simulated nodes keep states)."""

    evaluates_on_nodes = True  # clients score themselves where their data live (``Evaluator.evaluate_reports``)

    def __init__(
        self,
        grid: Grid,
        assembly: Assembly,
        header: dict[str, str],
        settings: FlowerConfig,
        note: Callable[[str], None] = log.warning,
    ) -> None:
        self.grid = grid
        self.header = header
        self.settings = settings
        self.note = note
        self.num_clients = assembly.data.num_clients
        self.node_clients: dict[int, list[int]] = {}
        self.client_node: dict[int, int] = {}
        self.wait_for_clients()

    # ---- nodes
    def _ttl(self) -> float:
        return self.settings.message_ttl or self.settings.round_timeout + 60.0

    def _message(self, content: RecordDict, node: int, message_type: str, group: str) -> Message:
        return Message(content, node, message_type, ttl=self._ttl(), group_id=group)

    def discover(self) -> None:
        """Read the node list; ask nodes not seen before which clients they host; forget nodes that left."""
        listed = set(self.grid.get_node_ids())
        for gone in set(self.node_clients) - listed:
            for cid in self.node_clients.pop(gone):
                if self.client_node.get(cid) == gone:
                    del self.client_node[cid]
        new = sorted(listed - set(self.node_clients))
        if not new:
            return
        header = ConfigRecord({**self.header, "op": "clients"})
        messages = [self._message(RecordDict({"fedpal": header}), node, "query", "clients") for node in new]
        for node, reply in self._exchange(messages):
            if reply is None or reply.has_error():
                continue
            clients = [int(c) for c in reply.content["fedpal"]["clients"]]  # type: ignore[union-attr]
            self.node_clients[node] = clients
            for cid in clients:  # a node seen later (a restarted one) takes the client over
                self.client_node[cid] = node

    def wait_for_clients(self) -> None:
        """Until every client has a node, or ``flower.wait_for_nodes`` seconds have passed."""
        deadline = time.monotonic() + self.settings.wait_for_nodes
        while True:
            self.discover()
            if len(self.client_node) >= self.num_clients or time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, self.settings.poll_interval * 5))
        missing = self.num_clients - len(self.client_node)
        if missing:
            self.note(f"flower: {missing} of {self.num_clients} clients have no node; their tasks will fail")

    # ---- messages
    def _exchange(self, messages: list[Message]) -> Iterator[tuple[int, Message | None]]:
        """(node, reply) as replies arrive; (node, None) for each node silent until the round timeout."""
        ids = self.grid.push_messages(messages)
        pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True) if mid}
        for mid, m in zip(ids, messages, strict=True):
            if not mid:
                yield m.metadata.dst_node_id, None
        deadline = time.monotonic() + self.settings.round_timeout
        while pending:
            # a pull can block for minutes (Flower retries a reply whose upload broke off until the upload's
            # session expires), so the deadline is read before it: one pull always follows the deadline, and a
            # reply that reached the SuperLink meanwhile is taken, not counted as silence
            expired = time.monotonic() >= deadline
            replies = list(self.grid.pull_messages(list(pending)))
            for reply in replies:
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    yield node, reply
            if expired:
                break
            if pending and not replies:
                time.sleep(self.settings.poll_interval)
        for node in pending.values():
            yield node, None

    def _content(self, tasks: list[ClientTask]) -> RecordDict:
        content = RecordDict({"fedpal": ConfigRecord({**self.header, "op": tasks[0].op, "tasks": len(tasks)})})
        for i, task in enumerate(tasks):
            state = task.state or {}
            plain: dict[str, Any] = {
                "client": task.client,
                "round": task.round,
                "op": task.op,
                "state_round": int(state.get(STATE_ROUND, 0)),
                "payload": task.payload,
                "params": task.params,
                "holder_payload": task.holder_payload,
            }
            content.update(to_records(plain, f"t{i}."))
        return content

    def _results(self, tasks: list[ClientTask], reply: Message) -> Iterator[tuple[int, ClientResult]]:
        content = reply.content
        for i, task in enumerate(tasks):
            plain = from_records(content, f"r{i}.")
            if plain["failure"] is not None:
                yield task.client, ClientResult({}, None, 0, failure=str(plain["failure"]))
                continue
            state = {STATE_ROUND: task.round} if task.op == "fit" else dict(task.state or {})
            answer = from_records(content, f"r{i}.reply.") if plain["has_reply"] else None
            report = None if plain["report"] is None else ClientReport(**plain["report"])
            yield task.client, ClientResult(state, answer, int(plain["steps"]), report=report)

    # ---- the executor interface
    def run(self, tasks: list[ClientTask]) -> dict[int, ClientResult]:
        return dict(self.stream(tasks))

    def stream(self, tasks: list[ClientTask]) -> Iterator[tuple[int, ClientResult]]:
        runnable = []
        for task in tasks:
            if task.op == "init":  # a node builds a client's first state where it first needs it
                yield task.client, ClientResult({STATE_ROUND: 0}, None, 0)
            elif task.op in MESSAGE_TYPES:
                runnable.append(task)
            else:
                raise ValueError(f"the Flower engine does not run '{task.op}' tasks (they need other clients' data)")
        if not runnable:
            return
        self.discover()
        by_node: dict[int, list[ClientTask]] = {}
        for task in runnable:
            node = self.client_node.get(task.client)
            if node is None:
                yield task.client, ClientResult({}, None, 0, failure="no node hosts this client")
            else:
                by_node.setdefault(node, []).append(task)
        if not by_node:
            return
        message_type = MESSAGE_TYPES[runnable[0].op]
        group = str(runnable[0].round)
        nodes = sorted(by_node)
        messages = [self._message(self._content(by_node[node]), node, message_type, group) for node in nodes]
        for node, reply in self._exchange(messages):
            node_tasks = by_node[node]
            if reply is None or reply.has_error():
                why = (
                    f"node {node} sent no reply within {self.settings.round_timeout:g} s"
                    if reply is None
                    else f"node {node} answered with error {reply.error.code}: {str(reply.error.reason)[:200]}"
                )
                for task in node_tasks:
                    yield task.client, ClientResult({}, None, 0, failure=why)
                continue
            yield from self._results(node_tasks, reply)

    def close(self) -> None:
        """Nothing to release: the nodes belong to the Flower runtime."""
