"""A real loopback deployment of fedpal's Flower apps (a SuperLink and two SuperNodes, each process stopped by PID)
losing a node mid-run: the round waits until Flower answers for the lost node (its heartbeat missed, or its
half-uploaded reply's session expired) or ``flower.round_timeout`` passes, counts the lost node's clients as failed
and goes on with the others; the node, restarted with the same state directory, takes its clients back with the
states it had written, and the run finishes with every client evaluated."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
from tests.conftest import tiny_config
from tests.flower_processes import (
    Processes,
    fedpal_argv,
    flower_processes,
    free_port,
    process_tree,
    superlink_healthy,
    wait_until,
)

from fedpal.cli import main
from fedpal.config import from_dict, to_toml

pytest.importorskip("flwr")


def start_node(processes: Processes, name: str, port: int, clients: str, state: Path, home: Path) -> int:
    argv = fedpal_argv(
        "flower", "supernode", "--superlink", f"127.0.0.1:{port}", "--insecure", "--clients", clients,
        "--state-dir", state, "--port", free_port(), "--home", home,
    )  # fmt: skip
    return processes.start(name, argv).process.pid


def test_a_node_killed_mid_run_is_counted_and_rejoins_with_its_states(tmp_path: Path) -> None:
    home, port, out = tmp_path / "home", free_port(), tmp_path / "run"
    raw = tiny_config("fedper", train={"rounds": 4}, eval={"every": 2})  # FedPer: each client's head is state
    # 180 s: a margin for a busy machine. The kill costs up to 180 s whatever the timeout: killed while it uploads its
    # reply, node b is answered for only when the upload's session expires (docs/flower.md § 8)
    raw["flower"] = {"round_timeout": 180.0, "wait_for_nodes": 120.0, "poll_interval": 0.2}
    config = tmp_path / "experiment.toml"
    config.write_text(to_toml(from_dict(raw).to_dict()))
    states = {name: tmp_path / f"state-{name}" for name in ("a", "b")}
    with flower_processes(tmp_path) as processes:
        processes.start("superlink", fedpal_argv("flower", "superlink", "--insecure", "--port", port, "--home", home))
        wait_until(lambda: superlink_healthy(port, None), 40, "the SuperLink", processes)
        start_node(processes, "node-a", port, "0-1", states["a"], home)
        lost = start_node(processes, "node-b", port, "2-3", states["b"], home)
        link = ["--superlink", f"127.0.0.1:{port}", "--insecure", "--home", str(home)]
        assert main(["flower", "submit", str(config), "--out", str(out), *link]) == 0
        written = lambda r: list(states["b"].glob(f"*/client2/round{r}.pt"))  # noqa: E731
        wait_until(lambda: bool(written(1)), 240, "node b to finish round 1", processes)
        for pid in process_tree(lost):  # the node and the ClientApp process it may be running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        start_node(processes, "node-b-restarted", port, "2-3", states["b"], home)
        wait_until((out / "summary.json").exists, 720, "the run to finish", processes)
    summary = json.loads((out / "summary.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log = (out / "log.txt").read_text()
    assert summary["rounds"] == 4
    assert summary["client_failures"] >= 2  # both of node b's clients in at least one round
    assert "client 2 failed" in log and "client 3 failed" in log
    assert "client 0 failed" not in log and "client 1 failed" not in log
    assert history[-1]["evaluated_clients"] == 4  # node b's clients are back for the last evaluation
    assert written(4), "the restarted node trained its clients again, from the states it kept"
