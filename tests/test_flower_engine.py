"""The Flower engine (``engine = "flower"``: fedpal's round driver on Flower's simulation runtime, client work in
Flower ClientApps on virtual nodes) against the in-process simulator, for the same config and seed.

Personalized, validation, global and per-task figures, bytes, steps and diagnostics must be bit-identical: the
nodes build the same modules from the same seeds, run the same client code, and report counts and sums from which
the evaluator computes what it computes from scores. Only what needs other clients' data differs by design (the
generalization sample is marked ``simulator_only``), and the wall time."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from tests.conftest import interrupted_at, tiny_config

import fedpal
from fedpal.cli import main
from fedpal.config import from_dict, to_toml

FLOWER = {"nodes": 2, "round_timeout": 120.0, "wait_for_nodes": 120.0}
CASES: dict[str, dict[str, Any]] = {
    "fedavg": {"train": {"rounds": 3, "clients_per_round": 3, "local_epochs": 5}},
    "protonorm": {  # a model family: clients run different architectures
        "model": {"name": "mlp", "hidden_dim": 16, "feature_dim": 8, "family": "image5"},
        "train": {"rounds": 2, "lr": 0.005, "local_epochs": 5},
    },
    "fedali": {
        "data": {"dataset": "hapt", "num_clients": 4, "max_samples": 800, "alpha": 0.5, "min_samples": 20},
        "model": {"name": "hart_alp", "feature_dim": 8, "width": 16, "blocks": 1, "bank_sizes": [4]},
        "train": {"rounds": 2, "optimizer": "adam", "lr": 0.001, "batch_size": 16},
        "eval": {"generalization_samples": 100},
    },
}
TRAINED = {"fedavg": 0.3, "protonorm": 0.15, "fedali": 0.25}
ONLY_IN_SIMULATOR = ("generalization", "generalization_accuracy", "unseen", "wall_seconds")
ONLY_ON_FLOWER = ("evaluated_clients",)  # clients that reported (all of them here)


def config(name: str, **sections: Any) -> dict[str, Any]:
    raw = tiny_config(name, **copy.deepcopy(CASES.get(name, {"train": {"rounds": 3}})))
    raw["flower"] = dict(FLOWER)
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


def comparable(value: Any) -> Any:
    """A summary or metrics entry without what only the simulator measures (and NaN made comparable)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in ONLY_IN_SIMULATOR + ONLY_ON_FLOWER}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def history(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(CASES))
def test_flower_simulation_equals_the_simulator(name: str, tmp_path: Path) -> None:
    raw = config(name)
    simulated = fedpal.run(raw, out=tmp_path / "simulator")
    flowered = fedpal.run(raw, out=tmp_path / "flower", engine="flower")
    assert comparable(flowered.summary) == comparable(simulated.summary)
    assert comparable(history(tmp_path / "flower")) == comparable(history(tmp_path / "simulator"))
    assert flowered.summary["generalization"]["simulator_only"] is True
    assert flowered.summary["client_failures"] == 0
    assert all(entry["evaluated_clients"] == 4 for entry in history(tmp_path / "flower"))
    # trained models, well above chance (digits: 10 classes, HAPT: 6), so the figures compared are real ones
    assert flowered.summary["personalized"]["accuracy"] > TRAINED[name]
    # the nodes kept the client states on disk, per client and round, never on the server
    states = list((tmp_path / "flower" / "flower_states").glob("*/client*/round*.pt"))
    assert {p.parent.name for p in states} == {f"client{c}" for c in range(4)}


def test_flower_resume_after_a_server_interruption(tmp_path: Path) -> None:
    """The server stops when round 3 starts; resumed on fresh virtual nodes, the run finds its clients' states on
    their disks and ends with the numbers of an uninterrupted run (Ditto: each client's personal model is state)."""
    raw = config("ditto", train={"rounds": 4, "local_epochs": 3})
    simulated = fedpal.run(raw, out=tmp_path / "simulator")
    with interrupted_at(3):
        fedpal.run(raw, out=tmp_path / "flower", engine="flower")
    resumed = fedpal.resume(tmp_path / "flower", engine="flower")
    assert comparable(resumed.summary) == comparable(simulated.summary)
    assert comparable(history(tmp_path / "flower")) == comparable(history(tmp_path / "simulator"))


def test_flower_engine_without_the_extra_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    path = tmp_path / "config.toml"
    path.write_text(to_toml(from_dict(config("fedavg")).to_dict()))
    code = main(["run", str(path), "--engine", "flower", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and 'pip install -e ".[flower]"' in err[0]
    assert not (tmp_path / "run").exists()


def test_a_backdoor_is_measured_on_the_nodes_as_in_the_simulator(tmp_path: Path) -> None:
    """Each benign client counts its triggered hits where its state is (its node) and the server sums them: the
    attack success rate on Flower equals the simulator's, for a method with personal models (FedPer)."""
    raw = config(
        "fedper",
        data={"dataset": "mnist", "num_clients": 5, "max_samples": 1000},
        train={"rounds": 2},
        attack={"type": "backdoor", "fraction": 0.4, "poison_fraction": 0.5},
    )
    fedpal.run(raw, out=tmp_path / "simulator")
    fedpal.run(raw, out=tmp_path / "flower", engine="flower")
    simulated = [entry["backdoor"] for entry in history(tmp_path / "simulator")]
    flowered = [entry["backdoor"] for entry in history(tmp_path / "flower")]
    assert flowered == simulated
    assert all(entry["triggered_samples"] > 0 and 0.0 <= entry["attack_success_rate"] <= 1.0 for entry in flowered)


def test_the_simulation_builds_the_federation_once_in_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one virtual node per client (``flower.nodes = 0``) the node count needs the federation; the ServerApp,
    in this process, takes that one instead of building it again (the nodes build theirs in their own processes)."""
    import fedpal.flower.simulation
    import fedpal.runner

    built: list[int] = []
    real = fedpal.runner.build_federated_data

    def counted(cfg: Any, seed: int) -> Any:
        built.append(seed)
        return real(cfg, seed)

    monkeypatch.setattr(fedpal.flower.simulation, "build_federated_data", counted)
    monkeypatch.setattr(fedpal.runner, "build_federated_data", counted)
    raw = config("fedavg", train={"rounds": 1}, flower={"nodes": 0})
    result = fedpal.run(raw, out=tmp_path / "flower", engine="flower")
    assert built == [raw["seed"]]
    assert result.summary["client_failures"] == 0
    assert all(entry["evaluated_clients"] == 4 for entry in history(tmp_path / "flower"))
