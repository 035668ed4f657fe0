"""FedPer against its definition: the backbone is averaged by samples, the head is personal and never travels."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import distance, one_round, personalized, simulator

import fedpal
from fedpal.algorithms.weight_sharing.fedper import backbone_of
from fedpal.algorithms.weight_sharing.lg_fedavg import head_of
from fedpal.engine.messages import message_bytes
from fedpal.errors import ConfigError


def test_only_the_backbone_travels_and_is_averaged_by_samples(tiny) -> None:
    sim = simulator(tiny("fedper"))
    payloads, replies = one_round(sim)
    for message in [*payloads.values(), *replies.values()]:
        assert set(message) <= {"backbone", "num_samples"}
        assert message["backbone"] and not any(k.startswith("head.") for k in message["backbone"])
    sizes = [sim.data.clients[c].train_y.numel() for c in replies]
    assert len(set(sizes)) > 1
    for name, value in sim.server["backbone"].items():
        weighted = sum(n * replies[c]["backbone"][name].double() for c, n in zip(replies, sizes, strict=True))
        assert torch.allclose(value.double(), weighted / sum(sizes), atol=1e-6, rtol=0)
    assert sim.algorithm.global_params(sim.server) is None  # no global head, so no global model


def test_clients_train_from_the_global_backbone_and_keep_distinct_heads(tiny) -> None:
    sim = simulator(tiny("fedper"))
    initial_head = head_of(sim.algorithm.setup.initial_params)
    assert all(distance(sim.clients[c]["head"], initial_head) == 0 for c in range(sim.data.num_clients))
    one_round(sim)
    view, state = sim.view(1, 2), sim.clients[1]
    payload = sim.algorithm.configure(sim.server, 2, [1])[1]
    new_state, reply = sim.algorithm.local_update(view, state, payload)
    expected = view.fit({**payload["backbone"], **state["head"]}).params
    assert distance(new_state["head"], head_of(expected)) == 0
    assert distance(reply["backbone"], backbone_of(expected)) == 0
    heads = [sim.clients[c]["head"]["head.weight"] for c in range(sim.data.num_clients)]
    assert all(not torch.equal(heads[i], heads[j]) for i in range(len(heads)) for j in range(i))
    # the evaluated model (default): the latest global backbone under the client's own head
    for cid in range(sim.data.num_clients):
        personal = personalized(sim, cid, 1)
        assert distance(personal, {**sim.server["backbone"], **sim.clients[cid]["head"]}) == 0


def test_bytes_are_the_backbone_both_ways(tiny) -> None:
    rounds = 2
    per = simulator(tiny("fedper", train={"rounds": rounds}))
    payloads, replies = one_round(per)
    clients = per.data.num_clients
    down = sum(message_bytes(p)["backbone"] for p in payloads.values())
    up = sum(message_bytes(r)["backbone"] for r in replies.values())
    summary = fedpal.run(tiny("fedper", train={"rounds": rounds})).summary
    assert summary["bytes"]["down_by_key"] == {"backbone": rounds * down}
    assert summary["bytes"]["up_by_key"]["backbone"] == rounds * up
    # FedAvg sends the same backbone plus the head each way
    head = message_bytes({"h": head_of(per.algorithm.setup.initial_params)})["h"]
    avg = fedpal.run(tiny("fedavg", train={"rounds": rounds})).summary
    assert avg["bytes"]["down"] - summary["bytes"]["down"] == rounds * clients * head
    assert avg["bytes"]["up"] - summary["bytes"]["up"] == rounds * clients * head


def test_post_local_evaluates_the_whole_model_right_after_training(tiny, strip_wall) -> None:
    post = simulator(tiny("fedper", algorithm={"evaluate": "post_local"}))
    default = simulator(tiny("fedper"))
    _, replies = one_round(post)
    one_round(default)
    assert distance(post.server["backbone"], default.server["backbone"]) == 0  # training is unchanged
    for cid in range(post.data.num_clients):
        personal = personalized(post, cid, 1)
        assert distance(personal, {**replies[cid]["backbone"], **post.clients[cid]["head"]}) == 0
        assert distance(personal, {**post.server["backbone"], **post.clients[cid]["head"]}) > 0
    a = fedpal.run(tiny("fedper", algorithm={"evaluate": "post_local"})).summary
    b = fedpal.run(tiny("fedper", algorithm={"evaluate": "post_local"})).summary
    assert strip_wall(a) == strip_wall(b)
    assert a["bytes"] == fedpal.run(tiny("fedper")).summary["bytes"]


def test_invalid_evaluate_is_rejected(tiny) -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.evaluate"):
        simulator(tiny("fedper", algorithm={"evaluate": "local"}))
