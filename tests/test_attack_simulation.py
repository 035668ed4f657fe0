"""Simulated attacks in a run (``[attack]``): the malicious clients' replies are replaced after they arrive and
before the reduction, their training data poisoned once; benign clients and every evaluation split stay clean."""

from __future__ import annotations

from typing import Any

import torch
from tests.conftest import simulator, tiny_config

from fedpal.attacks.data_poisoning import trigger_for, triggered_test_set
from fedpal.attacks.malicious import malicious_clients
from fedpal.attacks.unreliable import client_outcome
from fedpal.data.federated import build_federated_data
from fedpal.engine.assembly import assemble
from fedpal.engine.driver import sample_clients, unreliability


def record_round(sim: Any) -> tuple[dict, dict, dict]:
    """Run round 1 through the driver; the payloads, the honest replies and the replies aggregate received."""
    honest: dict[int, Any] = {}
    received: dict[int, Any] = {}
    payloads: dict[int, Any] = {}
    update, aggregate, configure = sim.algorithm.local_update, sim.algorithm.aggregate, sim.algorithm.configure

    def spy_configure(state: Any, round: int, ids: list[int]) -> Any:
        payloads.update(configure(state, round, ids))
        return payloads

    def spy_update(view: Any, state: Any, payload: Any) -> Any:
        state, reply = update(view, state, payload)
        honest[view.id] = reply
        return state, reply

    def spy_aggregate(state: Any, round: int, replies: Any, reduce: Any) -> Any:
        received.update(replies)
        return aggregate(state, round, replies, reduce)

    sim.algorithm.configure, sim.algorithm.local_update = spy_configure, spy_update
    sim.algorithm.aggregate = spy_aggregate
    sim.run_round(1)
    return payloads, honest, received


def test_a_sign_flipping_client_sends_minus_its_update_and_the_mean_takes_it() -> None:
    raw = tiny_config("fedavg", data={"num_clients": 5}, attack={"type": "sign_flip", "fraction": 0.2})
    sim = simulator(raw)
    (bad,) = sorted(malicious_clients(5, 0.2, sim.config.seed))
    assert sim.malicious == {bad}
    payloads, honest, received = record_round(sim)
    for cid in received:
        for k, sent in received[cid]["params"].items():
            reference, own = payloads[cid]["params"][k], honest[cid]["params"][k]
            expected = reference - (own - reference) if cid == bad else own
            assert torch.allclose(sent, expected, atol=1e-6), (cid, k)
    weights = {c: float(received[c]["num_samples"]) for c in received}
    for k, value in sim.server["params"].items():
        mean = sum(weights[c] * received[c]["params"][k].double() for c in received) / sum(weights.values())
        assert torch.allclose(value.double(), mean, atol=1e-6)


def test_ipm_uses_the_benign_mean_and_leaves_benign_replies_alone() -> None:
    raw = tiny_config("fedavg", data={"num_clients": 5}, attack={"type": "ipm", "fraction": 0.4, "epsilon": 0.5})
    sim = simulator(raw)
    payloads, honest, received = record_round(sim)
    benign = [c for c in received if c not in sim.malicious]
    for cid in received:
        for k, sent in received[cid]["params"].items():
            reference = payloads[cid]["params"][k]
            if cid in sim.malicious:
                mean_update = sum(honest[b]["params"][k].double() - reference.double() for b in benign) / len(benign)
                assert torch.allclose(sent.double(), reference.double() - 0.5 * mean_update, atol=1e-6)
            else:
                assert torch.equal(sent, honest[cid]["params"][k])


def test_label_flipping_poisons_only_the_malicious_training_splits_once() -> None:
    raw = tiny_config("fedavg", data={"num_clients": 5}, attack={"type": "label_flip", "fraction": 0.4})
    sim = simulator(raw)
    clean = build_federated_data(sim.config.data, sim.config.seed)
    data, classes = sim.assembly.data, clean.num_classes
    for cid in range(5):
        before, after = clean.clients[cid], data.clients[cid]
        flipped = classes - 1 - before.train_y
        assert torch.equal(after.train_y, flipped if cid in sim.malicious else before.train_y)
        assert torch.equal(after.val_y, before.val_y) and torch.equal(after.test_y, before.test_y)
    again = assemble(sim.config, data)  # a worker process assembles from the poisoned federation: no second flip
    assert all(torch.equal(a.train_y, b.train_y) for a, b in zip(again.data.clients, data.clients, strict=True))


def test_prototype_poisoning_negates_the_benign_class_means() -> None:
    model = {"name": "mlp", "hidden_dim": 16, "feature_dim": 8, "family": "image5"}
    raw = tiny_config(
        "fedproto", data={"num_clients": 5, "alpha": 5.0}, model=model, attack={"type": "proto_poison", "fraction": 0.2}
    )
    sim = simulator(raw)
    _, honest, received = record_round(sim)
    (bad,) = sim.malicious
    for k, sent in received[bad]["prototypes"].items():
        benign = [honest[c]["prototypes"][k] for c in received if c != bad and k in honest[c]["prototypes"]]
        assert benign and torch.allclose(sent.double(), -torch.stack(benign).double().mean(0), atol=1e-6)


def test_unreliable_clients_are_sampled_among_the_available_and_lost_replies_counted() -> None:
    """Rounds sample only available clients; a reply lost after training or past the deadline is neither reduced
    nor counted as sent, the client keeps its trained state, and the virtual clock adds each round's wait."""
    availability = {"p_available": 0.6, "p_drop": 0.2, "latency_mu": 0.0, "latency_sigma": 1.0, "deadline": 2.0}
    raw = tiny_config("fedper", data={"num_clients": 8}, train={"rounds": 4, "clients_per_round": 4})
    raw["availability"] = availability
    sim = simulator(raw)
    settings = unreliability(sim.config.availability)
    aggregated: list[set[int]] = []
    aggregate = sim.algorithm.aggregate
    sim.algorithm.aggregate = lambda state, r, replies, reduce: (  # type: ignore[method-assign]
        aggregated.append(set(replies)) or aggregate(state, r, replies, reduce)
    )
    expected = {"lost": 0, "late": 0, "time": 0.0}
    for r in range(1, 5):
        outcomes = {c: client_outcome(settings, sim.config.seed, r, c) for c in range(8)}
        before = len(aggregated)
        sim.run_round(r)
        available = [c for c in range(8) if outcomes[c].available]
        sampled = sample_clients(sim.config, 8, r, available)
        assert set(sampled) <= set(available)
        arrived = {c for c in sampled if outcomes[c].replies}
        assert aggregated[before] == arrived
        expected["lost"] += sum(outcomes[c].dropped for c in sampled)
        expected["late"] += sum(outcomes[c].late and not outcomes[c].dropped for c in sampled)
        waited = any(not outcomes[c].replies for c in sampled)
        expected["time"] += 2.0 if waited else max(outcomes[c].latency for c in arrived)
    counters = sim.counters
    assert (counters.lost_replies, counters.late_replies) == (expected["lost"], expected["late"])
    assert counters.lost_replies + counters.late_replies > 0
    assert abs(counters.virtual_seconds - expected["time"]) < 1e-9


def test_without_the_section_a_summary_has_no_availability_block() -> None:
    sim = simulator(tiny_config("fedavg", train={"rounds": 1}))
    assert "availability" not in sim.run()


def test_a_backdoor_run_reports_its_success_on_benign_clients_and_their_accuracy() -> None:
    raw = tiny_config(
        "fedavg",
        data={"dataset": "mnist", "num_clients": 5, "max_samples": 1000},
        train={"rounds": 2},
        attack={"type": "backdoor", "fraction": 0.4, "poison_fraction": 0.5},
    )
    sim = simulator(raw)
    summary = sim.run()
    entry = sim.history[-1]
    triggered = triggered_test_set(sim.data, sim.malicious, trigger_for(sim.data), 9)
    assert entry["backdoor"]["target"] == 9 and set(triggered.owner.tolist()) == set(range(5)) - sim.malicious
    benign_non_target = sum(
        int((c.test_y != 9).sum()) for i, c in enumerate(sim.data.clients) if i not in sim.malicious
    )
    assert entry["backdoor"]["triggered_samples"] == benign_non_target
    predicted = sim.trainer.predict(sim.server["params"], triggered.x).argmax(dim=1)  # FedAvg: the global model
    assert abs(entry["backdoor"]["attack_success_rate"] - float((predicted == 9).double().mean())) < 1e-12
    per_client = entry["personalized"]["per_client_accuracy"]
    sizes = entry["personalized"]["per_client_samples"]
    benign = [c for c in range(5) if c not in sim.malicious]
    expected = sum(per_client[c] * sizes[c] for c in benign) / sum(sizes[c] for c in benign)
    assert abs(summary["personalized"]["accuracy"] - entry["personalized"]["accuracy"]) < 1e-12
    assert abs(entry["benign"]["accuracy"] - expected) < 1e-5  # per-client accuracies are rounded to 6 places
