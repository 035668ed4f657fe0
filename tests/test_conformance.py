"""The conformance suite: every registered algorithm, on the smallest model (or family) it supports, keeps the
contract every engine relies on. A new method is checked by registering it; nothing here names a method.

- the same seed gives the same evaluations and states; clients run in another order, or on worker processes,
  give the same;
- client work run on a separate assembly (other modules, another algorithm instance) from deep copies of only the
  client's state and payload gives the same results: client-side code reads nothing of the server;
- interrupted after any round and resumed, a run ends bit-identical to an uninterrupted one;
- the bytes counted equal the serialized sizes of every payload and reply (training and evaluation);
- every payload, reply, client state and server state converts to a plain record and back without loss;
- a reply with NaN is rejected, the client keeps its state, and the run finishes.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import interrupted_at, tiny_config, without_wall

from fedpal.algorithms.core.registry import ALGORITHMS, all_algorithms
from fedpal.algorithms.weight_sharing.fedavg import FedAvg
from fedpal.config import ExperimentConfig, from_dict
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.data.federated import build_federated_data
from fedpal.engine.assembly import Assembly, assemble
from fedpal.engine.batched import BatchedExecutor
from fedpal.engine.executor import ClientResult, ClientTask, run_client_task
from fedpal.engine.processes import ProcessExecutor
from fedpal.engine.run_directory import RunDirectory
from fedpal.engine.sequential import SequentialExecutor
from fedpal.engine.simulator import Simulator

ROUNDS = 3
DIGITS = {
    "data": {"num_clients": 5, "unseen_clients": 1, "max_samples": 300, "alpha": 0.5, "min_samples": 20},
    "train": {"rounds": ROUNDS, "clients_per_round": 3, "lr": 0.05},
    "eval": {"generalization_samples": 100, "batch_size": 64},  # pooled evaluations run in several chunks
}
MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"name": "mlp", "hidden_dim": 16, "feature_dim": 8},
    "family": {"name": "mlp", "hidden_dim": 16, "feature_dim": 8, "family": "image5"},
    "hart_alp": {"name": "hart_alp", "feature_dim": 8, "width": 16, "blocks": 1, "bank_sizes": [4]},
    # adapter methods: both trunks with dual adapters (the digits have no public block to align on)
    "mosaic": {
        "name": "mosaic_small",
        "family": "mosaic",
        "feature_dim": 8,
        "adapters": True,
        "adapter_init": "random",
    },
}


def model_kind(cls: type) -> str:
    """The smallest model a method supports: its required model, the mosaic trunks with adapters for an adapter
    method, a family if it mixes architectures, or the MLP."""
    if cls.required_model:
        return cls.required_model
    if cls.requires_adapters:
        return "mosaic"
    return "family" if cls.supports_heterogeneous_models else "mlp"


CASES = [pytest.param(name, id=f"{name}-{model_kind(cls)}") for name, cls in all_algorithms().items()]


def synthetic_windows(clients: int, seed: int) -> list[ClientData]:
    """[6, 32] sensor windows of three classes (a class is a frequency), for models that need IMU input."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 6.28, 32)
    parts = []
    for _ in range(clients):
        split = []
        for n in (6, 2, 3):
            y = torch.arange(3).repeat_interleave(n)
            x = torch.sin(t[None, None, :] * (1 + y[:, None, None])).repeat(1, 6, 1)
            split += [x + 0.3 * torch.randn(y.shape[0], 6, 32, generator=gen), y]
        parts.append(ClientData(*split))
    return parts


@functools.cache
def case(name: str) -> tuple[ExperimentConfig, FederatedData]:
    cls = all_algorithms()[name]
    kind = model_kind(cls)
    raw = tiny_config(name, **copy.deepcopy(DIGITS))
    raw["model"] = MODELS[kind]
    if kind == "hart_alp":
        raw["train"].update({"optimizer": "adam", "lr": 0.001, "batch_size": 8})
        raw["eval"]["generalization_samples"] = 0
        raw["data"] = {"num_clients": 4}
        cfg = from_dict(raw)
        parts = synthetic_windows(5, cfg.seed)
        data = FederatedData("synthetic_har", 3, ("a", "b", "c"), (6, 32), parts[:4], unseen=parts[4:])
        return cfg, data
    if kind == "mosaic":  # a few adapter steps a round keep the suite's many runs of each method short
        raw["algorithm"]["local_steps"] = 4
    if name == "protonorm":  # its upscaled targets (s = 80) diverge at lr 0.05 on this tiny MLP; a diverging run
        raw["train"]["lr"] = 0.005  # can be compared bit for bit, but not up to rounding (the batched executor)
    cfg = from_dict(raw)
    return cfg, build_federated_data(cfg.data, cfg.seed)


def simulate(name: str, executor: Any = None, run_dir: Path | None = None) -> Simulator:
    cfg, data = case(name)
    sim = Simulator(cfg, data, RunDirectory(run_dir) if run_dir else None, progress=False)
    if executor is not None:
        sim.executor = executor(sim.assembly)
    if run_dir is not None:
        sim.run_dir.create()  # type: ignore[union-attr]
    sim.run()
    return sim


@functools.cache
def baseline(name: str) -> Simulator:
    return simulate(name)


def same(a: Any, b: Any) -> bool:
    """Deep, exact equality of states, messages and metrics (tensors: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b


def assert_same_run(sim: Simulator, reference: Simulator) -> None:
    assert same(without_wall(sim.history), without_wall(reference.history))
    assert same(sim.server, reference.server)
    assert same(sim.clients, reference.clients)


# ---- executors that change how client work runs, never what it computes
class ReversedExecutor(SequentialExecutor):
    """Runs a round's clients last to first."""

    def stream(self, tasks: list[ClientTask]) -> Iterator[tuple[int, ClientResult]]:
        for task in reversed(tasks):
            yield task.client, run_client_task(self.assembly, task)


class IsolatedExecutor(SequentialExecutor):
    """Client work as on another machine: a separately built assembly (its own modules and algorithm instance),
    handed deep copies of only the client's task (its state and payload), its results copied back."""

    def __init__(self, assembly: Assembly) -> None:
        super().__init__(assemble(assembly.config, assembly.data))

    def stream(self, tasks: list[ClientTask]) -> Iterator[tuple[int, ClientResult]]:
        for task in tasks:
            isolated = copy.deepcopy(task)  # only the client's own state, payload (and probe set) travel
            yield task.client, copy.deepcopy(run_client_task(self.assembly, isolated))


class RecordingExecutor(SequentialExecutor):
    """Keeps every task and result it ran."""

    def __init__(self, assembly: Assembly) -> None:
        super().__init__(assembly)
        self.log: list[tuple[ClientTask, ClientResult]] = []

    def stream(self, tasks: list[ClientTask]) -> Iterator[tuple[int, ClientResult]]:
        by_client = {t.client: t for t in tasks}
        for cid, result in super().stream(tasks):
            self.log.append((by_client[cid], result))
            yield cid, result


class PoisoningExecutor(SequentialExecutor):
    """Puts a NaN into the first floating tensor of the lowest-id client's reply in round 2."""

    def __init__(self, assembly: Assembly) -> None:
        super().__init__(assembly)
        self.poisoned: tuple[int, dict[str, Any]] | None = None  # (client, its state before the round)
        self.replies_with_tensors = 0

    def stream(self, tasks: list[ClientTask]) -> Iterator[tuple[int, ClientResult]]:
        fits = [t for t in tasks if t.op == "fit" and t.round == 2]
        target = min(t.client for t in fits) if fits else None
        for cid, result in super().stream(tasks):
            self.replies_with_tensors += bool(floating_tensors(result.reply or {}))
            tensor = next(iter(floating_tensors(result.reply or {})), None) if cid == target else None
            if tensor is not None:
                tensor.view(-1)[0] = float("nan")
                self.poisoned = (cid, copy.deepcopy(next(t.state for t in fits if t.client == cid)))
            yield cid, result


def floating_tensors(message: dict[str, Any]) -> list[torch.Tensor]:
    out = []
    for value in message.values():
        if isinstance(value, dict):
            out += floating_tensors(value)
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            out.append(value)
    return out


# ---- the checks
@pytest.mark.parametrize("name", CASES)
def test_same_seed_gives_identical_results(name: str) -> None:
    assert_same_run(simulate(name), baseline(name))


@pytest.mark.parametrize("name", CASES)
def test_client_order_does_not_change_results(name: str) -> None:
    assert_same_run(simulate(name, ReversedExecutor), baseline(name))


@pytest.mark.parametrize("name", CASES)
def test_worker_processes_give_identical_results(name: str) -> None:
    assert_same_run(simulate(name, lambda assembly: ProcessExecutor(assembly, 2)), baseline(name))


def close_to(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two runs differ beyond float rounding: tensors (atol 1e-5, rtol 1e-4), numbers (1e-6 + 1e-5 relative,
    or one test sample's share of an accuracy); integers and structure exactly."""
    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        return [] if ok and torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-4, equal_nan=True) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [path + ": keys"]
        return [d for k in a for d in close_to(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in close_to(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        if a == b or (a != a and b != b):
            return []
        tolerance = 1e-6 + 1e-5 * abs(b) + 0.02 * ("accuracy" in path or "f1" in path)
        return [] if abs(a - b) <= tolerance else [path]
    return [] if a == b else [path]


@pytest.mark.parametrize("name", CASES)
def test_the_batched_executor_gives_the_sequential_results_up_to_rounding(name: str) -> None:
    """Methods without batched training fall back to sequential execution (exactly equal); the others train their
    clients together and agree to float rounding (SGD; an accuracy may move by a test sample near a boundary)."""
    batched = simulate(name, BatchedExecutor)
    reference = baseline(name)
    assert not close_to(without_wall(batched.history), without_wall(reference.history), "history")
    assert not close_to(batched.clients, reference.clients, "clients")
    assert not close_to(batched.server, reference.server, "server")


@pytest.mark.parametrize("name", CASES)
def test_client_work_needs_nothing_of_the_server(name: str) -> None:
    assert_same_run(simulate(name, IsolatedExecutor), baseline(name))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("stop", range(2, ROUNDS + 1))
def test_resume_after_any_round_is_bit_identical(name: str, stop: int, tmp_path: Path) -> None:
    cfg, data = case(name)
    with interrupted_at(stop):
        simulate(name, run_dir=tmp_path)
    run_dir = RunDirectory(tmp_path)
    resumed = Simulator(cfg, data, run_dir, progress=False)
    resumed.restore(run_dir.load_checkpoint())
    resumed.run()
    assert_same_run(resumed, baseline(name))


@pytest.mark.parametrize("name", CASES)
def test_bytes_are_the_serialized_messages_and_records_round_trip(name: str) -> None:
    cfg, data = case(name)
    sim = Simulator(cfg, data, progress=False)
    recorder = RecordingExecutor(sim.assembly)
    sim.executor = recorder
    evaluation_payloads: list[dict[str, Any]] = []
    server_states: list[dict[str, Any]] = []
    configure_evaluation, aggregate = sim.algorithm.configure_evaluation, sim.algorithm.aggregate

    def spy_evaluation(state: Any, round: int, ids: list[int]) -> Any:
        payloads = configure_evaluation(state, round, ids)
        evaluation_payloads.extend(payloads[c] for c in ids if c < data.num_clients)  # unseen ones are not counted
        return payloads

    def spy_aggregate(state: Any, round: int, replies: Any, reduce: Any) -> Any:
        server_states.append(state)
        return aggregate(state, round, replies, reduce)

    sim.algorithm.configure_evaluation = spy_evaluation  # type: ignore[method-assign]
    sim.algorithm.aggregate = spy_aggregate  # type: ignore[method-assign]
    sim.run()
    fits = [(t, r) for t, r in recorder.log if t.op == "fit"]
    assert fits
    records = pytest.importorskip("fedpal.flower.records")  # Flower's records (the [flower] extra)
    down = sum(records.record_bytes(records.to_records(t.payload or {})) for t, _ in fits)
    up = sum(records.record_bytes(records.to_records(r.reply or {})) for _, r in fits)
    evaluation = sum(records.record_bytes(records.to_records(p)) for p in evaluation_payloads)
    counted = sim.counters.as_bytes()
    assert (counted["down"], counted["up"], counted["evaluation_down"]) == (down, up, evaluation)
    messages = [m for t, r in recorder.log for m in (t.payload, t.state, r.reply, r.state) if m is not None]
    for message in [*messages, *evaluation_payloads, *server_states, sim.server]:
        assert same(records.from_records(records.to_records(message)), message)


@pytest.mark.parametrize("name", CASES)
def test_a_nan_reply_is_rejected_and_the_run_finishes(name: str) -> None:
    cfg, data = case(name)
    sim = Simulator(cfg, data, progress=False)
    poisoner = PoisoningExecutor(sim.assembly)
    sim.executor = poisoner
    summary = sim.run()
    if poisoner.poisoned is None:  # only a method that sends no tensors at all (Local) has nothing to poison
        assert poisoner.replies_with_tensors == 0
        return
    client, state_before = poisoner.poisoned
    assert summary["rejected_replies"] == baseline(name).counters.rejected_replies + 1
    assert summary["rounds"] == ROUNDS
    if client not in sample_of(sim, 3):  # it did not train again: the rejected round left its state alone
        assert same(sim.clients[client], state_before)


def sample_of(sim: Simulator, round: int) -> list[int]:
    from fedpal.engine.driver import sample_clients

    return sample_clients(sim.config, sim.data.num_clients, round)


# ---- the suite can fail: methods that break the contract are caught
class ReadsTheServerFedAvg(FedAvg):
    """Client code that reads what the server side left on the shared algorithm instance."""

    name = "reads_the_server_fedavg"

    def aggregate(self, state: Any, round: int, replies: Any, reduce: Any) -> Any:
        self.last_aggregated = round
        return super().aggregate(state, round, replies, reduce)

    def local_update(self, client: Any, state: Any, payload: Any) -> Any:
        state, reply = super().local_update(client, state, payload)
        scale = 1.0 + 0.1 * getattr(self, "last_aggregated", 0)
        return state, {**reply, "params": {k: v * scale for k, v in reply["params"].items()}}


class OrderDependentFedAvg(FedAvg):
    """Client results that depend on how many clients ran before them."""

    name = "order_dependent_fedavg"

    def local_update(self, client: Any, state: Any, payload: Any) -> Any:
        self.calls = getattr(self, "calls", 0) + 1
        state, reply = super().local_update(client, state, payload)
        return state, {**reply, "params": {k: v * (1.0 + 0.01 * self.calls) for k, v in reply["params"].items()}}


@pytest.mark.parametrize(
    ("cls", "executor"), [(ReadsTheServerFedAvg, IsolatedExecutor), (OrderDependentFedAvg, ReversedExecutor)]
)
def test_the_suite_catches_contract_breaches(cls: type, executor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ALGORITHMS, cls.name, cls)
    assert simulate(cls.name).counters.rejected_replies == 0
    reference, other = simulate(cls.name), simulate(cls.name, executor)
    assert same(reference.history[0]["personalized"], simulate(cls.name).history[0]["personalized"])
    assert not same(other.server, reference.server)
