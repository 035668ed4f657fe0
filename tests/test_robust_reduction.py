"""Robust rules at the engine's one reduction point (``[aggregation]``): every method's averages go through them,
computed here independently of ``fedpal.robustness`` from the replies a round produced."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import one_round, simulator, tiny_config

import fedpal
from fedpal.config import AggregationConfig
from fedpal.engine.reduction import MeanReducer, RobustReducer, build_reducer
from fedpal.errors import UserError

IMAGE5 = {"name": "mlp", "hidden_dim": 16, "feature_dim": 8, "family": "image5"}


def test_the_default_section_keeps_the_plain_mean() -> None:
    assert type(build_reducer(AggregationConfig())) is MeanReducer
    assert isinstance(build_reducer(AggregationConfig(rule="median")), RobustReducer)


@pytest.mark.parametrize(("name", "key"), [("fedavg", "params"), ("fedper", "backbone")])
def test_a_coordinate_median_of_the_replies_becomes_the_global_model(name: str, key: str) -> None:
    sim = simulator(tiny_config(name, data={"num_clients": 5}, aggregation={"rule": "median"}))
    _, replies = one_round(sim)
    reply_key = key
    for k, value in sim.server[key].items():
        stacked = torch.stack([replies[c][reply_key][k] for c in sorted(replies)]).double()
        assert torch.allclose(value.double(), stacked.median(dim=0).values, atol=1e-7, rtol=0)  # 5: one middle
    assert sim.reduce.calls == {"update": 1}


def test_norm_bound_caps_each_clients_update() -> None:
    """Each client's update is scaled to norm <= C before averaging, so the global step is at most C."""
    sim = simulator(tiny_config("fedavg", aggregation={"rule": "norm_bound", "norm_bound": 0.01}))
    before = {k: v.clone() for k, v in sim.server["params"].items()}
    one_round(sim)
    step = sum(float((sim.server["params"][k].double() - before[k].double()).pow(2).sum()) for k in before) ** 0.5
    assert 0 < step <= 0.01 * (1 + 1e-6)


def test_prototypes_go_per_class_through_the_median() -> None:
    sim = simulator(tiny_config("fedproto", data={"num_clients": 5, "alpha": 5.0}, model=IMAGE5,
                                aggregation={"prototype_rule": "median"}))  # fmt: skip
    _, replies = one_round(sim)
    checked = 0
    for k, value in sim.server["aggregated"].items():
        reporters = [replies[c]["prototypes"][k] for c in sorted(replies) if k in replies[c]["prototypes"]]
        if len(reporters) in (3, 5):  # an odd count: the median is one reporter's coordinate
            assert torch.allclose(value.double(), torch.stack(reporters).double().median(dim=0).values, atol=1e-6)
            checked += 1
    assert checked > 0
    assert sim.reduce.calls.get("prototypes") == 1


def test_krum_with_too_few_clients_is_one_line() -> None:
    raw = tiny_config("fedavg", aggregation={"rule": "krum", "byzantine": 2})  # 4 clients: Krum needs > 6
    with pytest.raises(UserError, match="krum with f=2 byzantine clients needs more than 2f"):
        fedpal.run(raw)
