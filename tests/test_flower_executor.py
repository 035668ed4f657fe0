"""The Flower executor's message handling against a Grid written here: nodes that answer with the real ClientApp
(in this process), one that stays silent, one that answers with an error reply, a pull that blocks past the round
timeout while another node's reply arrives, and a node that comes back under a new Flower node id. The Grid uses two
of Flower's private hooks that its own in-memory grids use (a process task identity, and setting a pushed message's
id), as FLOWER.md's LocalGrid does: tests only."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from tests.conftest import tiny_config
from tests.test_conformance import same

from fedpal.config import FlowerConfig, from_dict, to_toml
from fedpal.data.federated import build_federated_data
from fedpal.engine.assembly import assemble
from fedpal.engine.executor import ClientTask, run_client_task
from fedpal.flower.client_app import app as client_app
from fedpal.flower.executor import STATE_ROUND, FlowerExecutor


class TestGrid(Grid):
    """Nodes by Flower node id, each hosting ``clients``; ``behaviour`` per node for training messages: "answer",
    "silent", "error", "late" (the answer reaches the grid only during a stalled pull) or "stall" (an error whose
    pull blocks for ``stall`` seconds, as Flower's pull of a reply whose upload broke off does; every node answers
    the query for its clients)."""

    __test__ = False

    def __init__(self, nodes: dict[int, str], behaviour: dict[int, str], stall: float = 0.0) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.nodes = nodes
        self.behaviour = behaviour
        self.stall = stall
        self.held: dict[str, Message] = {}
        self.stalling: set[str] = set()
        self.contexts: dict[int, Context] = {}
        self.replies: dict[str, Message] = {}
        self.pushed: list[Message] = []

    def set_run(self, run_id: int) -> None:  # not used in-process
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # deprecated in Flower; unused
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            mid = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = mid
            node = message.metadata.dst_node_id
            self.pushed.append(message)
            context = self.contexts.setdefault(node, Context(1, node, {"clients": self.nodes[node]}, RecordDict(), {}))
            behaviour = self.behaviour.get(node, "answer") if message.metadata.message_type == "train" else "answer"
            if behaviour in ("answer", "late"):
                answers = self.held if behaviour == "late" else self.replies
                answers[mid] = client_app(message=message, context=context)
            elif behaviour in ("error", "stall"):
                self.replies[mid] = Message(Error(code=5, reason="node unavailable"), reply_to=message)
                if behaviour == "stall":
                    self.stalling.add(mid)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        pulled = [self.replies.pop(m) for m in list(message_ids)[::-1] if m in self.replies]  # any order
        if self.stalling & {m.metadata.reply_to_message_id for m in pulled}:
            time.sleep(self.stall)  # the late replies arrive meanwhile, after this pull's answer was made
            self.replies.update(self.held)
            self.held.clear()
        return pulled

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture(scope="module")
def assembly() -> Any:
    cfg = from_dict(tiny_config("fedper", data={"num_clients": 6}))
    return assemble(cfg, build_federated_data(cfg.data, cfg.seed))


def executor(grid: TestGrid, assembly: Any, timeout: float = 0.5) -> FlowerExecutor:
    header = {"config": to_toml(assembly.config.to_dict()), "run-key": "test", "state-dir": ""}
    settings = FlowerConfig(round_timeout=timeout, wait_for_nodes=0.0, poll_interval=0.01)
    return FlowerExecutor(grid, assembly, header, settings, note=lambda message: None)


def fit_tasks(assembly: Any, ids: list[int], round: int = 1) -> list[ClientTask]:
    server = assembly.algorithm.init_server()
    payloads = assembly.algorithm.configure(server, round, ids)
    return [ClientTask(c, round, "fit", {STATE_ROUND: 0}, payloads[c]) for c in ids]


def test_replies_come_back_to_their_clients_and_failures_name_their_node(assembly: Any) -> None:
    grid = TestGrid({11: "0-1", 12: "2-3", 13: "4-5"}, {12: "silent", 13: "error"})
    results = executor(grid, assembly).run(fit_tasks(assembly, list(range(6))))
    assert sorted(results) == list(range(6))
    assert len([m for m in grid.pushed if m.metadata.message_type == "train"]) == 3  # one message per node
    for cid in (0, 1):  # answered: the reply is what the client computes in this process from its first state
        task = fit_tasks(assembly, [cid])[0]
        fresh = assembly.algorithm.init_client(assembly.view(cid, 0))
        own = run_client_task(assembly, ClientTask(cid, 1, "fit", fresh, task.payload))
        assert results[cid].failure is None and results[cid].state == {STATE_ROUND: 1}
        assert own.reply and same(results[cid].reply, own.reply)
        assert results[cid].steps == own.steps > 0
    assert all("sent no reply within 0.5 s" in (results[c].failure or "") for c in (2, 3))
    assert all("error 5" in (results[c].failure or "") for c in (4, 5))


def test_a_restarted_node_takes_its_clients_back(assembly: Any) -> None:
    grid = TestGrid({21: "0-2", 22: "3-5"}, {})
    run = executor(grid, assembly)
    assert run.client_node == {0: 21, 1: 21, 2: 21, 3: 22, 4: 22, 5: 22}
    grid.nodes = {21: "0-2", 23: "3-5"}  # node 22 is gone; its clients' node restarted as 23
    results = run.run(fit_tasks(assembly, [1, 4]))
    assert all(r.failure is None for r in results.values())
    assert run.client_node[4] == 23 and 22 not in run.node_clients
    grid.nodes = {21: "0-2"}  # 23 gone too, and nobody hosts 3-5
    assert run.run(fit_tasks(assembly, [4]))[4].failure == "no node hosts this client"


def test_a_reply_that_arrives_during_a_pull_blocked_past_the_timeout_is_taken(assembly: Any) -> None:
    """The CI failure of a killed node: Flower's pull of its half-uploaded reply blocked past the round timeout,
    and the healthy node's reply, which arrived meanwhile, was counted as silence."""
    grid = TestGrid({31: "0-2", 32: "3-5"}, {31: "late", 32: "stall"}, stall=0.8)
    results = executor(grid, assembly, timeout=0.5).run(fit_tasks(assembly, list(range(6))))
    assert all(results[c].failure is None and results[c].state == {STATE_ROUND: 1} for c in (0, 1, 2))
    assert all("error 5" in (results[c].failure or "") for c in (3, 4, 5))
