"""The generic Flower ClientApp: it hosts the client side of any registered algorithm for the fedpal clients of its
node (``client_ids``), whatever the algorithm, through the same ``run_client_task`` every executor runs.

A message carries the run (its resolved config, so the node builds the same federation and modules from the same
seeds and keeps only its own clients' data in use; nothing else about the data travels) and one task per hosted
client of the round. Client states never leave the node: they live in Flower's per-node state and, given a
directory, on the node's disk (``node_states``), and a task names the state it starts from. A task that raises is
answered as failed, with the reason, so one client's error does not lose its neighbours' work.
"""

from __future__ import annotations

import hashlib
import tomllib
import traceback
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpal.config import from_dict
from fedpal.data.federated import build_federated_data
from fedpal.engine.assembly import Assembly, assemble
from fedpal.engine.executor import ClientTask, run_client_task
from fedpal.flower.client_ids import node_clients
from fedpal.flower.node_states import NodeStates
from fedpal.flower.records import from_records, to_records

app = ClientApp()

_ASSEMBLIES: dict[str, Assembly] = {}  # per process: a simulation's actor serves many messages with one build


def node_assembly(config_text: str, node_config: dict[str, Any]) -> Assembly:
    """The run's federation and modules, built from its config (with this node's data directory), once a process."""
    data_dir = str(node_config.get("data-dir", ""))
    key = hashlib.sha256(f"{config_text}\0{data_dir}".encode()).hexdigest()
    if key not in _ASSEMBLIES:
        raw = tomllib.loads(config_text)
        if data_dir:  # where this node's copy of the file-based datasets lies
            raw.setdefault("data", {})["fashion_mnist_dir"] = data_dir
        config = from_dict(raw)
        assembly = assemble(config, build_federated_data(config.data, config.seed))
        torch.set_num_threads(max(1, config.train.threads))  # one thread per node process unless told otherwise
        _ASSEMBLIES.clear()  # one run at a time per process
        _ASSEMBLIES[key] = assembly
    return _ASSEMBLIES[key]


def state_directory(node_config: dict[str, Any], header: ConfigRecord) -> Path | None:
    """The node's own state directory (deployment: ``--state-dir``), else the one the run names (simulation), per
    run."""
    root = str(node_config.get("state-dir", "") or header.get("state-dir", ""))
    return Path(root) / str(header["run-key"]) if root else None


def run_task(assembly: Assembly, states: NodeStates, task: dict[str, Any], hosted: list[int]) -> dict[str, Any]:
    """One task on this node; the result as plain values (``failure`` set, and nothing else, if it failed)."""
    cid, round, op = int(task["client"]), int(task["round"]), str(task["op"])
    failed = {"client": cid, "failure": None, "steps": 0, "reply": None, "report": None}
    if cid not in hosted:
        return {**failed, "failure": f"client {cid} is not hosted on this node"}
    start = int(task["state_round"])
    state = states.load(cid, start)
    if state is None:
        if start != 0:
            return {**failed, "failure": f"client {cid}'s state of round {start} is not on this node"}
        state = assembly.algorithm.init_client(assembly.view(cid, 0))
    client_task = ClientTask(
        cid,
        round,
        "fit" if op == "fit" else "report",
        state,
        task["payload"],
        params=task.get("params"),
        holder_payload=task.get("holder_payload"),
    )
    try:
        result = run_client_task(assembly, client_task)
    except Exception as exc:  # reported to the server, which counts and logs it
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return {**failed, "failure": f"client {cid} raised {last}"}
    if op == "fit":
        states.save(cid, round, result.state)
        states.keep_from(cid, start)
    report = None if result.report is None else result.report.as_message()
    return {"client": cid, "failure": None, "steps": result.steps, "reply": result.reply, "report": report}


def answer(message: Message, context: Context) -> Message:
    header = message.content["fedpal"]
    assert isinstance(header, ConfigRecord)
    assembly = node_assembly(str(header["config"]), dict(context.node_config))
    hosted = node_clients(context.node_config, assembly.data.num_clients)
    if header["op"] == "clients":
        return Message(RecordDict({"fedpal": ConfigRecord({"clients": hosted})}), reply_to=message)
    states = NodeStates(context.state, state_directory(dict(context.node_config), header))
    count = int(str(header["tasks"]))
    content = RecordDict({"fedpal": ConfigRecord({"tasks": count})})
    for i in range(count):
        task = from_records(message.content, f"t{i}.")
        result = run_task(assembly, states, task, hosted)
        reply = result.pop("reply")
        content.update(to_records({**result, "has_reply": reply is not None}, f"r{i}."))
        if reply is not None:
            content.update(to_records(reply, f"r{i}.reply.", numbers="metric"))
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    return answer(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return answer(message, context)


@app.query()
def query(message: Message, context: Context) -> Message:
    return answer(message, context)
