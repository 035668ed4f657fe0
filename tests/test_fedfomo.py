"""FedFomo's mechanism (specs/fedfomo.md §8): first-order weights, affinity increments, the convex combination and
its fallback, epsilon-greedy downloads, the lr schedule, bytes down and the spectral sub-federations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tests.conftest import simulator, tiny_config

from fedpal.algorithms.core.contract import ClientView
from fedpal.algorithms.weight_sharing.fedfomo import (
    FedFomoHyperparameters,
    affinity_increments,
    choose_peers,
    cluster_labels,
    convex_combination,
    exploration_rate,
    first_order_weights,
    parameter_distance,
)


def fomo(**algorithm: Any) -> dict[str, Any]:
    """Four tiny clients, M = 3 (two peers), no sub-federations unless asked."""
    return tiny_config("fedfomo", algorithm={"num_models": 3, "n_subfederations": 0, **algorithm})


def test_weights_on_a_hand_computed_two_candidate_case() -> None:
    # L(theta_prev) = 1.0; candidate a: loss 0.5 at distance 2; candidate b: loss 1.5 at distance 1
    weights = first_order_weights(1.0, [0.5, 1.5], [2.0, 1.0])
    assert weights == [0.25, -0.5]
    # normalised increments: w / |0.25 - 0.5| -> [1, -2], summing to -1; raw increments are the weights
    assert affinity_increments(weights, "normalized") == [1.0, -2.0]
    assert affinity_increments(weights, "raw") == weights
    assert first_order_weights(1.0, [0.5], [0.0]) == [0.0]  # distance 0: weight 0, not a division by zero


def test_increments_sum_to_plus_or_minus_one() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        weights = list(rng.normal(size=5))
        assert abs(abs(sum(affinity_increments(weights, "normalized"))) - 1.0) < 1e-12


def test_l1_distance_and_doubling_the_distance_halves_the_weight() -> None:
    a = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    b = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0])}
    assert parameter_distance(a, b, ["w", "b"], "l1") == 1.0 + 3.0 + 0.5
    assert parameter_distance(a, b, ["w"], "l1") == 4.0  # only the named (trainable) tensors count
    assert parameter_distance(a, b, ["w", "b"], "l2_squared") == 1.0 + 9.0 + 0.25
    far = {k: 2 * v for k, v in a.items()}
    near_d = parameter_distance(a, b | {"w": torch.zeros(2), "b": torch.zeros(1)}, ["w", "b"], "l1")
    far_d = parameter_distance(far, {"w": torch.zeros(2), "b": torch.zeros(1)}, ["w", "b"], "l1")
    assert far_d == 2 * near_d
    [w_near], [w_far] = first_order_weights(1.0, [0.4], [near_d]), first_order_weights(1.0, [0.4], [far_d])
    assert w_far == pytest.approx(w_near / 2, rel=1e-15)


def test_the_combination_is_convex_and_exact() -> None:
    phis = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -1.0])}, {"w": torch.tensor([9.0, 9.0])}]
    theta = convex_combination(phis, [0.25, 0.75, 0.0], ["w"])
    assert torch.equal(theta["w"], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 - 0.75]))


class _Losses:
    """validation_loss stand-in: the loss of a model is looked up by the identity of its first tensor."""

    def __init__(self, table: dict[int, float]) -> None:
        self.table = table

    def __call__(self, client: ClientView, params: dict[str, torch.Tensor]) -> float:
        return self.table[id(next(iter(params.values())))]


def _update_case(monkeypatch, losses: list[float]) -> tuple[Any, ...]:
    """theta_prev, own model and two peers (each a perturbed copy of the initial model), with given losses."""
    sim = simulator(fomo())
    algorithm = sim.algorithm
    view = sim.view(0, 2)
    first = view.own_initial_params()
    models = [{k: v + 0.01 * (i + 1) for k, v in first.items()} for i in range(3)]
    table = {id(next(iter(m.values()))): loss for m, loss in zip([first, *models], losses, strict=True)}
    monkeypatch.setattr(algorithm, "validation_loss", _Losses(table))
    state = {"first": first, "local": models[0]}
    payload = {"peers": {"2": models[1], "3": models[2]}, "extras": {}}
    theta, ids, increments = algorithm.federated_update(view, state, payload)
    return theta, ids, increments, first, models


def test_one_improving_candidate_is_taken_exactly(monkeypatch) -> None:
    theta, ids, increments, _, models = _update_case(monkeypatch, [1.0, 1.2, 0.8, 1.5])
    assert ids == [0, 2, 3]  # itself first, then its peers
    assert all(torch.equal(theta[k], models[1][k]) for k in theta)
    assert increments[1] > 0 > increments[0] and increments[2] < 0


def test_all_candidates_worse_keeps_the_previous_model_and_still_moves_affinities(monkeypatch) -> None:
    theta, _, increments, first, _ = _update_case(monkeypatch, [1.0, 1.2, 1.1, 1.5])
    assert all(theta[k] is first[k] for k in first)  # theta_prev itself, bit for bit
    assert all(i < 0 for i in increments) and sum(increments) == pytest.approx(-1.0)


def test_exploration_schedule_and_choice_rules() -> None:
    hp = FedFomoHyperparameters()
    assert [exploration_rate(hp, t) for t in (0, 1, 5, 6, 9)] == pytest.approx([0.3, 0.25, 0.05, 0.0, 0.0])
    row = np.array([0.1, 0.9, 0.3, 0.7, 0.2, 0.0])
    pool = [1, 2, 3, 4, 5]  # client 0's pool: never itself
    assert choose_peers(row, pool, 3, 0.0, np.random.default_rng(1)) == [1, 3, 2]  # top by affinity
    counts = np.zeros(6)
    for seed in range(3000):
        chosen = choose_peers(row, pool, 2, 1.0, np.random.default_rng(seed))
        assert len(set(chosen)) == 2 and 0 not in chosen
        counts[chosen[0]] += 1
    assert counts[0] == 0 and np.all(np.abs(counts[1:] / 3000 - 0.2) < 0.03)  # uniform over the pool
    assert choose_peers(row, [2], 4, 0.0, np.random.default_rng(0)) == [2]  # never more than the pool


def test_round_one_trains_from_the_initial_model_and_lr_decays(monkeypatch) -> None:
    seen: list[tuple[int, float | None]] = []
    fit = ClientView.fit

    def spy(self: ClientView, params: Any, **kwargs: Any) -> Any:
        seen.append((self.round, kwargs.get("lr")))
        return fit(self, params, **kwargs)

    monkeypatch.setattr(ClientView, "fit", spy)
    sim = simulator(fomo(lr_decay=0.5, min_lr=0.02))
    initial = sim.view(0, 1).own_initial_params()
    sim.run_round(1)
    assert all(torch.equal(sim.clients[0]["first"][k], initial[k]) for k in initial)  # no combination in round 1
    sim.run_round(2)
    sim.run_round(3)
    sim.run_round(4)
    lrs = {r: lr for r, lr in seen}
    assert lrs == {1: 0.1, 2: 0.05, 3: 0.025, 4: 0.02}  # max(min_lr, lr * decay^(round - 1))


def test_bytes_down_count_exactly_the_downloaded_peers() -> None:
    sim = simulator(fomo())
    n_theta = sum(v.numel() for v in sim.view(0, 1).own_initial_params().values())
    sim.run_round(1)
    assert sum(sim.counters.down_by_key.values()) == 0  # nobody has uploaded: nothing to download
    sim.run_round(2)
    assert sum(sim.counters.down_by_key.values()) == 4 * (3 - 1) * n_theta * 4  # 4 clients x (M - 1) models x 4 bytes


def test_affinities_are_updated_only_for_individual_clients(monkeypatch) -> None:
    """An extra (sub-federation or global) model can win the combination but never enters the affinity row."""
    sim = simulator(fomo())
    view = sim.view(1, 3)
    first = view.own_initial_params()
    own, peer, extra = ({k: v + d for k, v in first.items()} for d in (0.01, 0.02, 0.03))
    losses = zip([first, own, peer, extra], [1.0, 1.1, 1.2, 0.5], strict=True)
    table = {id(next(iter(m.values()))): loss for m, loss in losses}
    monkeypatch.setattr(sim.algorithm, "validation_loss", _Losses(table))
    payload = {"peers": {"0": peer}, "extras": {"global": extra}}
    theta, ids, increments = sim.algorithm.federated_update(view, {"first": first, "local": own}, payload)
    assert ids == [1, 0] and len(increments) == 2
    assert all(torch.equal(theta[k], extra[k]) for k in theta)


def test_affinity_rows_change_by_the_replies_increments() -> None:
    sim = simulator(fomo())
    sim.run_round(1)
    before = sim.server["affinity"].clone()
    assert torch.equal(before, torch.eye(4, dtype=torch.float64) * 0.1)
    sim.run_round(2)
    change = sim.server["affinity"] - before
    for cid in range(4):
        touched = change[cid].nonzero().flatten().tolist()
        assert cid in touched and 1 <= len(touched) <= 3  # itself and at most its two peers
        assert abs(abs(float(change[cid].sum())) - 1.0) < 1e-9


def test_spectral_clustering_recovers_block_affinities() -> None:
    blocks = np.kron(np.eye(3), np.ones((4, 4)))  # three groups of four clients
    labels = cluster_labels(blocks * 2.0 + 0.01, 3, softmax=True, seed=0)
    groups = np.repeat(np.arange(3), 4)
    # the same partition up to a renaming of the clusters
    assert all(len(set(labels[groups == g])) == 1 for g in range(3)) and len(set(labels)) == 3


def test_subfederations_give_every_client_the_cluster_models_and_a_global_one() -> None:
    sim = simulator(fomo(n_subfederations=2))
    sim.run_round(1)
    extras = sim.server["extras"]
    assert set(extras) <= {"subfederation_0", "subfederation_1", "global"} and "global" in extras
    assert set(sim.server["clusters"].tolist()) <= {0, 1}
    payload = sim.algorithm.configure(sim.server, 2, [0])[0]
    assert set(payload["extras"]) == set(extras)
    assert sim.algorithm.global_params(sim.server) is extras["global"]


def test_round_start_evaluation_uses_the_latest_trained_model() -> None:
    sim = simulator(fomo(eval_point="round_start"))
    sim.run_round(1)
    state = sim.clients[0]
    assert sim.algorithm.personalized_params(sim.view(0, 1), state, {}) is state["local"]
    post = simulator(fomo())
    post.run_round(1)
    assert post.algorithm.personalized_params(post.view(0, 1), post.clients[0], {}) is post.clients[0]["first"]


def test_affinities_are_recorded_at_each_evaluation_and_drawn_with_the_true_groups(tmp_path) -> None:
    import json

    import fedpal
    from fedpal.report import make_report

    raw = fomo()
    raw["data"] |= {"partition": "latent", "distributions": 2, "embed_fraction": 0.2, "max_samples": 0}
    result = fedpal.run(raw | {"train": raw["train"] | {"rounds": 2}}, out=str(tmp_path / "run"))
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(e["matrices"]["affinity"]) == 4 and e["client_groups"] == [0, 0, 1, 1] for e in entries)
    last = torch.tensor(entries[-1]["matrices"]["affinity"])
    assert result is not None and not torch.equal(last, torch.eye(4, dtype=torch.float64) * 0.1)
    written = make_report([tmp_path / "run"], tmp_path / "report")
    assert (tmp_path / "report" / "client_matrices.png") in written
