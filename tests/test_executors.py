"""Executors: the choice `run.executor` makes, how the process executor spreads work, and what it does on failure.
(That every executor gives the sequential results for every method is the conformance suite's job.)"""

from __future__ import annotations

import logging

import pytest
from tests.conftest import tiny_config, without_wall

import fedpal
from fedpal.algorithms.core.registry import ALGORITHMS
from fedpal.algorithms.weight_sharing.fedavg import FedAvg
from fedpal.config import from_dict
from fedpal.data.federated import build_federated_data
from fedpal.engine import auto_executor, executor_choice
from fedpal.engine.assembly import assemble
from fedpal.engine.driver import RoundDriver
from fedpal.engine.executor import ClientTask
from fedpal.engine.processes import ProcessExecutor, WorkerError, spread
from fedpal.engine.sequential import SequentialExecutor


def test_processes_from_the_config_give_the_sequential_numbers() -> None:
    sequential = fedpal.run(tiny_config("fedprox", train={"rounds": 2}))
    processes = fedpal.run(tiny_config("fedprox", train={"rounds": 2}, run={"executor": "processes", "workers": 2}))
    assert without_wall(processes.summary) == without_wall(sequential.summary)


class CountingExecutor(SequentialExecutor):
    """Stands in for the worker processes: counts the training rounds it runs."""

    def __init__(self, assembly) -> None:
        super().__init__(assembly)
        self.calls = 0

    def stream(self, tasks):
        self.calls += any(task.op == "fit" for task in tasks)
        return super().stream(tasks)


@pytest.mark.parametrize(("round_seconds", "moves"), [(0.0, True), (1e9, False)])
def test_auto_measures_its_first_round_before_starting_workers(monkeypatch, caplog, round_seconds, moves) -> None:
    monkeypatch.setattr(auto_executor, "MIN_ROUND_SECONDS", round_seconds)
    monkeypatch.setattr(auto_executor, "MIN_SAVING_SECONDS", 0.0)
    cfg = from_dict(tiny_config("fedavg", train={"rounds": 3}))
    data = build_federated_data(cfg.data, cfg.seed)
    started: list[CountingExecutor] = []

    def start_workers() -> CountingExecutor:
        started.append(CountingExecutor(assembly))
        return started[-1]

    assembly = assemble(cfg, data)
    auto = auto_executor.AutoExecutor(assembly, 2, start_workers)
    driver = RoundDriver(assembly, auto, progress=False)
    with caplog.at_level(logging.INFO, logger="fedpal"):
        summary = driver.run()
    assert len(started) == (1 if moves else 0)
    if moves:  # rounds 2 and 3 ran on the "workers"
        assert started[0].calls == 2 and "moving to 2 worker processes" in caplog.text
    else:
        assert "staying sequential" in caplog.text
    assert without_wall(summary) == without_wall(fedpal.run(tiny_config("fedavg", train={"rounds": 3})).summary)


def test_auto_stays_sequential_on_one_core_or_one_client(monkeypatch) -> None:
    cfg = from_dict(tiny_config("fedavg", run={"executor": "auto"}))
    assembly = assemble(cfg, build_federated_data(cfg.data, cfg.seed))
    monkeypatch.setattr(executor_choice, "cores", lambda: 1)
    assert type(executor_choice.choose_executor(assembly)) is SequentialExecutor
    monkeypatch.setattr(executor_choice, "cores", lambda: 2)
    assert isinstance(executor_choice.choose_executor(assembly), auto_executor.AutoExecutor)
    one = from_dict(tiny_config("fedavg", run={"executor": "auto"}, train={"clients_per_round": 1}))
    assert type(executor_choice.choose_executor(assemble(one, assembly.data))) is SequentialExecutor


def test_spread_gives_the_largest_tasks_first_to_the_least_loaded_worker() -> None:
    tasks = [ClientTask(cid, 1, "fit") for cid in range(6)]
    costs = [10, 70, 30, 40, 20, 50]
    buckets = spread(tasks, costs, 2)
    loads = [sum(costs[t.client] for t in bucket) for bucket in buckets]
    assert [[t.client for t in b] for b in buckets] == [[1, 2, 0], [5, 3, 4]]  # 70+30+10 | 50+40+20
    assert loads == [110, 110]
    assert spread(tasks, costs, 2) == buckets  # deterministic


def test_a_method_the_workers_cannot_import_fails_with_its_reason(monkeypatch) -> None:
    class NotImportable(FedAvg):
        name = "defined_in_a_notebook"

    monkeypatch.setitem(ALGORITHMS, NotImportable.name, NotImportable)
    cfg = from_dict(tiny_config(NotImportable.name))
    assembly = assemble(cfg, build_federated_data(cfg.data, cfg.seed))
    with pytest.raises(WorkerError, match="unknown algorithm 'defined_in_a_notebook'"):
        ProcessExecutor(assembly, 1)


def test_transport_round_trips_tensors_of_every_kind_as_writable_copies() -> None:
    import io

    import torch

    from fedpal.engine.transport import read_message, write_message

    value = {
        "f32": torch.randn(3, 4),
        "i64": torch.arange(5),
        "mask": torch.tensor([True, False]),
        "bf16": torch.randn(4).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "strided": torch.randn(4, 6)[:, ::2],
        "nested": {"w": torch.ones(2, 2), "n": 3},
        "empty": torch.zeros(0, 8),
    }
    stream = io.BytesIO()
    write_message(stream, value)
    write_message(stream, None)
    stream.seek(0)
    received, back = read_message(stream)
    assert received
    for key in ("f32", "i64", "mask", "bf16", "scalar", "strided", "empty"):
        assert back[key].dtype == value[key].dtype and torch.equal(back[key], value[key])
    assert torch.equal(back["nested"]["w"], value["nested"]["w"]) and back["nested"]["n"] == 3
    back["f32"].add_(1)  # a writable copy: the sender's tensor is untouched
    assert not torch.equal(back["f32"], value["f32"])
    assert read_message(stream) == (True, None)
    assert read_message(stream) == (False, None)  # the end of the stream


def test_too_little_shared_memory_is_one_clear_line(monkeypatch) -> None:
    import os

    from fedpal.engine import processes
    from fedpal.errors import UserError

    cfg = from_dict(tiny_config("fedavg"))
    assembly = assemble(cfg, build_federated_data(cfg.data, cfg.seed))

    class Tiny:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(os, "statvfs", lambda _: Tiny())
    with pytest.raises(UserError, match=r"needs \d+ MiB and 0 MiB are free"):
        processes.ProcessExecutor(assembly, 1)


@pytest.mark.parametrize("name", ["fedavg", "fedali"])
def test_central_evaluation_in_chunks_equals_one_pass(name: str) -> None:
    """The driver scores a shared or global model chunk by chunk through the executor; the evaluator alone scores
    it in one call. Chunks are the evaluation batches, so the numbers are the same (FedAli's plan is per batch)."""
    from tests.test_fedali import fedali_config, synthetic_har

    from fedpal.engine.simulator import Simulator

    if name == "fedali":
        cfg = fedali_config()
        cfg.eval.batch_size = 8  # type: ignore[attr-defined]
        data = synthetic_har()
    else:
        cfg = from_dict(tiny_config("fedavg", eval={"batch_size": 16}))
        data = build_federated_data(cfg.data, cfg.seed)
    sim = Simulator(cfg, data, progress=False)  # type: ignore[arg-type]
    sim.initialize()
    sim.run_round(1)
    ids = list(range(data.num_clients))
    payloads = sim.algorithm.configure_evaluation(sim.server, 1, ids)
    chunked = sim.evaluate(1)
    alone = sim.evaluator.evaluate(sim.algorithm, sim.server, sim.clients, payloads, lambda c: sim.view(c, 1))
    for key in ("personalized", "validation", "global"):
        assert chunked.get(key) == alone.get(key)


def test_thread_count_is_chosen_from_the_model_size_and_logged(caplog) -> None:
    from fedpal.engine.threads import choose_threads

    assert choose_threads(3, 10, 8) == 3  # an explicit train.threads always wins
    assert choose_threads(0, 999_999, 8) == 1  # PFL's small models: one thread
    assert choose_threads(0, 5_000_000, 2) == 2 and choose_threads(0, 5_000_000, 16) == 4
    import torch

    cfg = from_dict(tiny_config("fedavg", train={"threads": 0}))
    torch.set_num_threads(2)
    try:
        with caplog.at_level(logging.INFO, logger="fedpal"):
            assemble(cfg, build_federated_data(cfg.data, cfg.seed))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
    assert "train.threads = 0: using 1 intra-op thread(s)" in caplog.text


def test_auto_is_the_default_and_keeps_intra_op_threads_sequential(monkeypatch) -> None:
    """Worker processes run one thread each: a run the assembly gave two threads stays sequential, so the default
    executor never changes a run's numbers."""
    import torch

    raw = tiny_config("fedavg")
    del raw["run"]["executor"]
    cfg = from_dict(raw)
    assert cfg.run.executor == "auto"
    assembly = assemble(cfg, build_federated_data(cfg.data, cfg.seed))
    monkeypatch.setattr(executor_choice, "cores", lambda: 2)
    assert isinstance(executor_choice.choose_executor(assembly), auto_executor.AutoExecutor)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert type(executor_choice.choose_executor(assembly)) is SequentialExecutor
    finally:
        torch.set_num_threads(threads)


def test_auto_stays_sequential_when_the_workers_cannot_start(monkeypatch, caplog) -> None:
    monkeypatch.setattr(auto_executor, "MIN_ROUND_SECONDS", 0.0)
    monkeypatch.setattr(auto_executor, "MIN_SAVING_SECONDS", 0.0)
    cfg = from_dict(tiny_config("fedavg", train={"rounds": 3}))
    assembly = assemble(cfg, build_federated_data(cfg.data, cfg.seed))

    def start_workers() -> CountingExecutor:
        raise WorkerError("unknown algorithm 'defined_in_a_notebook'\nTraceback ...")

    driver = RoundDriver(assembly, auto_executor.AutoExecutor(assembly, 2, start_workers), progress=False)
    with caplog.at_level(logging.INFO, logger="fedpal"):
        summary = driver.run()
    assert "the workers did not start: unknown algorithm 'defined_in_a_notebook'" in caplog.text
    assert without_wall(summary) == without_wall(fedpal.run(tiny_config("fedavg", train={"rounds": 3})).summary)
