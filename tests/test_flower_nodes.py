"""The node side of the Flower engine without any runtime: the ClientApp's task runner and the node's state store.

A node keeps each client's states by (client id, round), in Flower's per-node state and on its disk; a task names
the state it starts from. These tests check what that promises: the state a task starts from is the one named, a
node restarted with only its disk continues exactly as one that never stopped, a rejected reply can be retried from
the previous state, older states are dropped, and a failing client fails alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from flwr.app import RecordDict
from tests.conftest import tiny_config
from tests.test_conformance import same

from fedpal.config import from_dict
from fedpal.data.federated import build_federated_data
from fedpal.engine.assembly import Assembly, assemble
from fedpal.flower.client_app import run_task
from fedpal.flower.node_states import NodeStates


@pytest.fixture(scope="module")
def assembly() -> Assembly:
    cfg = from_dict(tiny_config("fedper"))  # FedPer: each client's head is its state
    return assemble(cfg, build_federated_data(cfg.data, cfg.seed))


def fit(assembly: Assembly, client: int, round: int, start: int) -> dict[str, Any]:
    server = assembly.algorithm.init_server()
    payload = assembly.algorithm.configure(server, round, [client])[client]
    return {"client": client, "round": round, "op": "fit", "state_round": start, "payload": payload}


def test_a_restarted_node_continues_from_its_disk_exactly(assembly: Assembly, tmp_path: Path) -> None:
    running = NodeStates(RecordDict(), tmp_path)
    first = run_task(assembly, running, fit(assembly, 1, 1, 0), [0, 1])
    assert first["failure"] is None and first["steps"] > 0
    assert running.rounds(1) == {1}
    restarted = NodeStates(RecordDict(), tmp_path)  # a new process: Flower's node state is empty, the disk is not
    again = run_task(assembly, restarted, fit(assembly, 1, 2, 1), [0, 1])
    kept = run_task(assembly, running, fit(assembly, 1, 2, 1), [0, 1])
    assert same(again["reply"], kept["reply"])
    assert same(restarted.load(1, 2), running.load(1, 2))
    assert running.rounds(1) == {1, 2}  # round 1 stays: the server may reject round 2's reply


def test_a_retried_round_starts_from_the_state_named_and_old_states_go(assembly: Assembly, tmp_path: Path) -> None:
    states = NodeStates(RecordDict(), tmp_path)
    run_task(assembly, states, fit(assembly, 0, 1, 0), [0])
    rejected = run_task(assembly, states, fit(assembly, 0, 2, 1), [0])
    retried = run_task(assembly, states, fit(assembly, 0, 2, 1), [0])  # the server kept round 1's state
    assert same(rejected["reply"], retried["reply"])
    run_task(assembly, states, fit(assembly, 0, 3, 2), [0])
    assert states.rounds(0) == {2, 3}
    assert sorted(p.name for p in (tmp_path / "client0").iterdir()) == ["round2.pt", "round3.pt"]


def test_a_failing_client_fails_alone_and_keeps_nothing(assembly: Assembly, tmp_path: Path) -> None:
    states = NodeStates(RecordDict(), tmp_path)
    broken = {**fit(assembly, 0, 1, 0), "payload": {}}  # no model in the payload
    result = run_task(assembly, states, broken, [0, 1])
    assert result["failure"].startswith("client 0 raised KeyError") and result["reply"] is None
    assert states.rounds(0) == set()
    assert run_task(assembly, states, fit(assembly, 1, 1, 0), [0, 1])["failure"] is None
    assert "not hosted" in run_task(assembly, states, fit(assembly, 3, 1, 0), [0, 1])["failure"]
    assert "round 5" in run_task(assembly, states, fit(assembly, 1, 6, 5), [0, 1])["failure"]
