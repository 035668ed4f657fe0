"""Shared fixtures for the core tests: a tiny digits config, hand-made federations and run helpers.

Everything here is small on purpose (a few hundred digits, 4 clients, an MLP with 32/16 units, 2-4 rounds),
so the whole core suite runs in well under two minutes on two CPU cores.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from fedpal.config import from_dict
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.data.federated import build_federated_data
from fedpal.engine.simulator import Simulator

# Tiny batches on a shared 2-core machine: more than one intra-op thread makes every step wait on the other
# thread (measured: 0.04 ms vs 20 ms per cross-entropy step), so the core tests run single-threaded.
torch.set_num_threads(1)

TINY_CONFIG: dict[str, Any] = {
    "seed": 0,
    "data": {
        "dataset": "digits",
        "partition": "dirichlet",
        "alpha": 0.5,
        "num_clients": 4,
        "min_samples": 20,
        "max_samples": 600,
    },
    "model": {"name": "mlp", "hidden_dim": 32, "feature_dim": 16},
    # every key a method may recommend is set, so each method runs these exact settings
    "train": {
        "rounds": 3,
        "batch_size": 32,
        "lr": 0.1,
        "threads": 1,
        "optimizer": "sgd",
        "weight_decay": 0.0,
        "local_epochs": 1,
    },
    "eval": {"generalization_samples": 200},
    "run": {"progress": False, "executor": "sequential"},  # the executor tests choose theirs
    "algorithm": {"name": "fedavg"},
}


def tiny_config(name: str = "fedavg", **sections: Any) -> dict[str, Any]:
    """A raw config dict for a tiny run of algorithm ``name``; ``sections`` are merged into it
    (``seed=1``, ``train={"rounds": 2}``, ``algorithm={"mu": 0.5}``)."""
    raw = copy.deepcopy(TINY_CONFIG)
    raw["algorithm"] = {"name": name}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return raw


@pytest.fixture
def tiny() -> Callable[..., dict[str, Any]]:
    """The tiny-config builder: ``tiny("fedprox", train={"rounds": 2}, algorithm={"mu": 1.0})``."""
    return tiny_config


def without_wall(value: Any) -> Any:
    """A summary / metrics entry with every ``wall_seconds`` removed (the only field allowed to differ)."""
    if isinstance(value, dict):
        return {k: without_wall(v) for k, v in value.items() if k != "wall_seconds"}
    if isinstance(value, list):
        return [without_wall(v) for v in value]
    return value


@pytest.fixture
def strip_wall() -> Callable[[Any], Any]:
    return without_wall


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def metrics_of() -> Callable[[Path], list[dict[str, Any]]]:
    return read_metrics


def _one_hot(codes: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(codes), num_classes).float()


def hand_federation() -> FederatedData:
    """Three clients, three classes; every sample's input is the one-hot of a *code*.

    The code equals the label everywhere except the first test sample of client 2 (label 2, code 0), so a model
    that reads the code (a linear layer with identity weights) is right on 12 of the 13 test samples.

    test labels: client 0 [0, 0, 1, 2], client 1 [1, 1, 1, 0], client 2 [2, 2, 0, 1, 1]
    val labels:  client 0 [0, 1],       client 1 [1],          client 2 [2, 2, 0]
    """
    c = 3
    tests = [([0, 0, 1, 2], [0, 0, 1, 2]), ([1, 1, 1, 0], [1, 1, 1, 0]), ([2, 2, 0, 1, 1], [0, 2, 0, 1, 1])]
    vals = [[0, 1], [1], [2, 2, 0]]
    trains = [[0, 1, 2, 0], [1, 0, 1], [2, 1, 0, 2]]
    clients = []
    for (test_y, test_code), val_y, train_y in zip(tests, vals, trains, strict=True):
        clients.append(
            ClientData(
                train_x=_one_hot(train_y, c),
                train_y=torch.tensor(train_y),
                val_x=_one_hot(val_y, c),
                val_y=torch.tensor(val_y),
                test_x=_one_hot(test_code, c),
                test_y=torch.tensor(test_y),
            )
        )
    return FederatedData("hand", c, ("a", "b", "c"), (c,), clients)


@pytest.fixture
def hand_data() -> FederatedData:
    return hand_federation()


# ---- step-by-step simulation, for tests that inspect payloads and replies of single rounds
def simulator(raw: dict[str, Any], data: FederatedData | None = None) -> Simulator:
    cfg = from_dict(raw)
    sim = Simulator(cfg, data or build_federated_data(cfg.data, cfg.seed), progress=False)
    sim.initialize()
    return sim


def one_round(sim: Simulator, round: int = 1) -> tuple[dict[int, dict], dict[int, dict]]:
    """Configure, update every client and aggregate, as the simulator does, returning payloads and replies."""
    ids = list(range(sim.data.num_clients))
    payloads = sim.algorithm.configure(sim.server, round, ids)
    replies = {}
    for cid in ids:
        sim.clients[cid], replies[cid] = sim.algorithm.local_update(
            sim.view(cid, round), sim.clients[cid], payloads[cid]
        )
    sim.server = sim.algorithm.aggregate(sim.server, round, replies, sim.reduce)
    return payloads, replies


def personalized(sim: Simulator, cid: int, round: int) -> dict[str, torch.Tensor]:
    """Client ``cid``'s personalized model after ``round``, from its state and its evaluation payload."""
    payload = sim.algorithm.configure_evaluation(sim.server, round, [cid])[cid]
    return sim.algorithm.personalized_params(sim.view(cid, round), sim.clients[cid], payload)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() - b[k].double()).pow(2).sum() for k in a) ** 0.5)


def run_rounds(sim: Simulator, rounds: int) -> Simulator:
    for r in range(1, rounds + 1):
        sim.run_round(r)
    return sim


@contextmanager
def interrupted_at(stop_round: int) -> Iterator[None]:
    """Inside the block, a run is interrupted (Ctrl-C) when round ``stop_round`` starts."""
    original = Simulator.run_round

    def run_round(self: Simulator, round: int) -> None:
        if round == stop_round:
            raise KeyboardInterrupt
        original(self, round)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Simulator, "run_round", run_round)
        with pytest.raises(KeyboardInterrupt):
            yield
