"""FedAvg's ``evaluate`` option: "post_local" evaluates each client's model right after its latest local training
(FedAli's convention); "global" (the default) keeps the global model; training is the same under both."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from tests.conftest import personalized

import fedpal
from fedpal.algorithms.core.registry import get_algorithm_class
from fedpal.algorithms.weight_sharing.fedavg import FedAvg
from fedpal.config import from_dict
from fedpal.data.federated import build_federated_data
from fedpal.engine.simulator import Simulator
from fedpal.errors import ConfigError


def simulator(raw: dict[str, Any]) -> Simulator:
    cfg = from_dict(raw)
    sim = Simulator(cfg, build_federated_data(cfg.data, cfg.seed), progress=False)
    sim.initialize()
    return sim


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() - b[k].double()).pow(2).sum() for k in a) ** 0.5)


def test_post_local_personalized_params_are_the_uploaded_params_of_that_round(tiny) -> None:
    sim = simulator(tiny("fedavg", algorithm={"evaluate": "post_local"}))
    ids = list(range(sim.data.num_clients))
    payloads = sim.algorithm.configure(sim.server, 1, ids)
    replies = {}
    for cid in ids:
        sim.clients[cid], replies[cid] = sim.algorithm.local_update(sim.view(cid, 1), sim.clients[cid], payloads[cid])
    sim.server = sim.algorithm.aggregate(sim.server, 1, replies, sim.reduce)
    for cid in ids:
        personal = personalized(sim, cid, 1)
        assert distance(personal, replies[cid]["params"]) == 0
        assert distance(personal, sim.server["params"]) > 0
    # the flag the evaluator reads is per instance: the class (and default instances) keep the global model
    assert sim.algorithm.personalized_is_global is False
    assert FedAvg.personalized_is_global is True
    assert simulator(tiny("fedavg")).algorithm.personalized_is_global is True


def test_post_local_changes_evaluation_only(tiny) -> None:
    default = fedpal.run(tiny("fedavg", train={"rounds": 2})).summary
    post = fedpal.run(tiny("fedavg", train={"rounds": 2}, algorithm={"evaluate": "post_local"})).summary
    assert post["global"] == default["global"]  # the same global model
    assert post["bytes"] == default["bytes"] and post["local_steps"] == default["local_steps"]
    assert post["personalized"]["per_client_accuracy"] != default["personalized"]["per_client_accuracy"]


def test_a_client_that_has_not_trained_is_evaluated_on_the_global_model(tiny) -> None:
    sim = simulator(tiny("fedavg", algorithm={"evaluate": "post_local"}, train={"clients_per_round": 2}))
    sim.run_round(1)
    trained = [cid for cid in range(sim.data.num_clients) if "params" in sim.clients[cid]]
    untouched = [cid for cid in range(sim.data.num_clients) if cid not in trained]
    assert len(trained) == 2 and untouched
    for cid in untouched:
        assert personalized(sim, cid, 1) is sim.server["params"]


def test_fedprox_takes_the_option_and_keeps_mu(tiny) -> None:
    fields = [(f.name, f.default) for f in dataclasses.fields(get_algorithm_class("fedprox").Hyperparameters)]
    assert ("mu", 0.01) in fields and ("evaluate", "global") in fields
    sim = simulator(tiny("fedprox", algorithm={"evaluate": "post_local", "mu": 0.5}))
    sim.run_round(1)
    assert sim.algorithm.personalized_is_global is False
    assert all("params" in sim.clients[cid] for cid in range(sim.data.num_clients))


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_unknown_evaluate_values_are_rejected(tiny, name) -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.evaluate' must be one of 'global', 'post_local', got 'best'"):
        simulator(tiny(name, algorithm={"evaluate": "best"}))
