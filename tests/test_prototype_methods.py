"""FedProto, FedTGP and ProtoNorm against their equations: averaging, client loss, bytes, inference, ablations."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import tiny_config
from torch.nn import functional as F

from fedpal.algorithms.core import prototypes as protos
from fedpal.algorithms.core.contract import ClientView
from fedpal.algorithms.core.training import Batch
from fedpal.config import from_dict
from fedpal.data.federated import build_federated_data
from fedpal.engine.simulator import Simulator
from fedpal.errors import ConfigError

C, D = 10, 16


def simulator(raw: dict) -> Simulator:
    cfg = from_dict(raw)
    sim = Simulator(cfg, build_federated_data(cfg.data, cfg.seed), progress=False)
    sim.initialize()
    return sim


def proto_config(name: str, **sections) -> dict:
    base = {"model": {"name": "mlp", "hidden_dim": 32, "feature_dim": D}, "train": {"rounds": 3, "batch_size": 16}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return tiny_config(name, **base)


# --------------------------------------------------------------------------------------------- tensor helpers


def test_class_means_by_index_add_match_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(50, D, generator=g), torch.randint(0, 4, (50,), generator=g)
    means, counts = protos.class_means(features, labels, C)
    for c in range(C):
        rows = features[labels == c]
        assert counts[c] == rows.shape[0]
        expected = rows.mean(0) if rows.shape[0] else torch.zeros(D)
        assert torch.allclose(means[c], expected, atol=1e-6)


def test_uniform_average_is_the_midpoint_and_samples_weights_by_counts() -> None:
    a, b = torch.zeros(C, D), torch.zeros(C, D)
    a[0], b[0] = 1.0, 3.0
    a[1] = 5.0  # class 1 held only by the first client
    held_a = torch.tensor([True, True] + [False] * (C - 2))
    held_b = torch.tensor([True, False] + [False] * (C - 2))
    counts_a, counts_b = held_a.float() * 1, held_b.float() * 3
    uniform, present = protos.average([(a, held_a, counts_a), (b, held_b, counts_b)], "uniform")
    assert torch.allclose(uniform[0], torch.full((D,), 2.0))
    assert torch.allclose(uniform[1], torch.full((D,), 5.0))  # a class held by one client keeps its prototype
    assert present.tolist()[:3] == [True, True, False]
    weighted, _ = protos.average([(a, held_a, counts_a), (b, held_b, counts_b)], "samples")
    assert torch.allclose(weighted[0], torch.full((D,), (1 * 1 + 3 * 3) / 4))


def test_nearest_prototype_of_a_prototype_is_its_class_and_is_scale_invariant_for_unit_prototypes() -> None:
    g = torch.Generator().manual_seed(1)
    unit = F.normalize(torch.randn(C, D, generator=g), dim=1)
    present = torch.ones(C, dtype=torch.bool)
    assert protos.nearest_prototype_scores(unit, unit, present).argmax(1).tolist() == list(range(C))
    features = torch.randn(200, D, generator=g) * 7
    base = protos.nearest_prototype_scores(features, unit, present).argmax(1)
    for factor in (0.01, 3.0, 80.0):
        assert torch.equal(protos.nearest_prototype_scores(features, unit * factor, present).argmax(1), base)
    assert torch.equal(base, (features @ unit.T).argmax(1))  # equal norms: nearest = max dot product


def test_a_class_without_prototype_is_never_predicted() -> None:
    g = torch.Generator().manual_seed(2)
    prototypes = torch.randn(C, D, generator=g)
    present = torch.ones(C, dtype=torch.bool)
    present[3] = False
    scores = protos.nearest_prototype_scores(prototypes, prototypes, present)
    assert 3 not in scores.argmax(1).tolist() and torch.isfinite(scores).all()


# --------------------------------------------------------------------------------------------- client loss


def client_term(algorithm, client: ClientView, payload: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The prototype term's value and its gradient w.r.t. the features on one hand-made batch."""
    captured = {}
    original = client.trainer.fit

    def fit(params, x, y, generator, **kwargs):
        term = kwargs["extra_loss"]
        features = torch.randn(8, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
        labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
        value = term(Batch(client.trainer.module, x[:8], labels, torch.arange(8), features, features, 0))
        value.backward()
        captured["value"], captured["grad"] = value.detach(), features.grad.clone()
        return original(params, x, y, generator, **kwargs)

    client.trainer.fit = fit  # type: ignore[method-assign]
    try:
        algorithm.local_update(client, {"params": client.own_initial_params()}, payload)
    finally:
        del client.trainer.fit
    return captured["value"], captured["grad"]


def test_prototype_term_is_lam_times_mean_over_batch_and_dim_and_skips_classes_without_prototype() -> None:
    sim = simulator(proto_config("fedproto", algorithm={"lam": 2.0}))
    client = sim.view(0, 1)
    targets = {"0": torch.ones(D), "1": -torch.ones(D)}  # classes 2 and 3 have none
    value, grad = client_term(sim.algorithm, client, {"prototypes": targets})
    features = torch.randn(8, D, generator=torch.Generator().manual_seed(3))
    rows = [0, 1, 4, 5]
    stacked = torch.stack([targets[str(c)] for c in [0, 1, 0, 1]])
    expected = 2.0 * (features[rows] - stacked).pow(2).sum() / (8 * D)  # denominator counts all B x D entries
    assert math.isclose(float(value), float(expected), rel_tol=1e-5)
    assert torch.count_nonzero(grad[[2, 3, 6, 7]]) == 0  # no pull where no prototype exists
    assert torch.count_nonzero(grad[rows]) > 0


def test_features_on_their_prototypes_give_zero_term() -> None:
    sim = simulator(proto_config("fedproto"))
    client = sim.view(0, 1)
    features = torch.randn(8, D, generator=torch.Generator().manual_seed(3))
    targets = {str(c): features[c] for c in range(4)}  # rows 0..3 sit on their prototypes, rows 4..7 do not
    _, grad = client_term(sim.algorithm, client, {"prototypes": targets})
    assert torch.count_nonzero(grad[:4]) == 0 and torch.count_nonzero(grad[4:]) > 0


def test_protonorm_client_target_is_upscaled() -> None:
    sim = simulator(proto_config("protonorm", algorithm={"scale": 5.0, "lam": 1.0}))
    client = sim.view(0, 1)
    unit = F.normalize(torch.ones(D), dim=0)
    value, _ = client_term(sim.algorithm, client, {"prototypes": {str(c): unit for c in range(4)}})
    features = torch.randn(8, D, generator=torch.Generator().manual_seed(3))
    assert math.isclose(float(value), float((features - 5.0 * unit).pow(2).mean()), rel_tol=1e-5)


def test_first_round_is_plain_cross_entropy() -> None:
    sim = simulator(proto_config("protonorm"))
    client = sim.view(0, 1)
    state = sim.clients[0]
    new_state, _ = sim.algorithm.local_update(client, state, {"prototypes": {}})
    plain = client.fit(state["params"], shuffle=False, drop_last=True)
    assert all(torch.equal(new_state["params"][k], plain.params[k]) for k in plain.params)


# --------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize("name", ["fedproto", "fedtgp", "protonorm"])
def test_exactly_c_times_d_floats_go_up_and_down_and_no_weights_travel(name: str) -> None:
    options = {"server_epochs": 2} if name == "fedtgp" else {}
    sim = simulator(proto_config(name, data={"partition": "iid", "max_samples": 800}, algorithm=options))
    for cid in range(sim.data.num_clients):
        assert set(sim.data.clients[cid].train_y.tolist()) == set(range(C))  # every client holds every class
    sim.run_round(1)
    n = sim.data.num_clients
    assert sim.counters.as_bytes()["up"] == n * C * D * 4
    assert sim.counters.as_bytes()["down"] == 0  # nothing to send before the first aggregation
    sim.run_round(2)
    assert sim.counters.as_bytes()["up"] == 2 * n * C * D * 4
    assert sim.counters.as_bytes()["down"] == n * C * D * 4
    assert set(sim.counters.up_by_key) == {"prototypes"} and set(sim.counters.down_by_key) == {"prototypes"}


def test_sample_weighting_adds_the_class_counts_to_the_reply() -> None:
    sim = simulator(proto_config("fedproto", algorithm={"proto_weighting": "samples"}))
    sim.run_round(1)
    assert sim.counters.up_by_key["class_counts"] == sim.data.num_clients * C * 4


# --------------------------------------------------------------------------------------------- whole runs


def test_protonorm_with_pa_and_pu_off_equals_fedproto_with_eval_pass_collection() -> None:
    a = simulator(proto_config("protonorm", algorithm={"pa": False, "pu": False}))
    b = simulator(proto_config("fedproto", algorithm={"lam": 10.0, "proto_collection": "eval_pass"}))
    for r in (1, 2, 3):
        a.run_round(r)
        b.run_round(r)
    assert a.server["global"].keys() == b.server["global"].keys()
    assert all(torch.equal(a.server["global"][k], b.server["global"][k]) for k in a.server["global"])


def test_protonorm_sends_unit_prototypes_aligned_apart() -> None:
    sim = simulator(proto_config("protonorm", data={"partition": "iid"}))
    sim.run_round(1)
    stacked = torch.stack(list(sim.server["global"].values()))
    assert torch.allclose(stacked.norm(dim=1), torch.ones(len(stacked)), atol=1e-5)
    cosines = F.normalize(stacked, dim=1) @ F.normalize(stacked, dim=1).T
    off = cosines[~torch.eye(len(stacked), dtype=torch.bool)]
    assert abs(float(off.mean()) + 1 / (len(stacked) - 1)) < 1e-3  # centred on the sphere after PA
    aggregated = F.normalize(torch.stack(list(sim.server["aggregated"].values())), dim=1)
    raw_off = (aggregated @ aggregated.T)[~torch.eye(len(stacked), dtype=torch.bool)]
    assert float(off.max()) < float(raw_off.max())  # the closest pair got further apart


def test_pu_only_sends_normalised_averages() -> None:
    sim = simulator(proto_config("protonorm", data={"partition": "iid"}, algorithm={"pa": False}))
    sim.run_round(1)
    for key, vector in sim.server["global"].items():
        expected = F.normalize(sim.server["aggregated"][key], dim=0)
        assert torch.allclose(vector, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fedproto", {"missing_class": "keep_last"}),
        ("fedproto", {"missing_class": "drop"}),
        ("fedtgp", {"server_epochs": 3}),
        ("protonorm", {}),
    ],
)
def test_a_class_absent_in_a_round_never_crashes(name: str, options: dict) -> None:
    raw = proto_config(
        name,
        data={"partition": "shards", "classes_per_client": 2, "num_clients": 5},
        train={"rounds": 4, "clients_per_round": 1},
        algorithm=options,
        eval={"every": 1},
    )
    sim = simulator(raw)
    summary = sim.run()
    assert math.isfinite(summary["personalized"]["accuracy"])
    for entry in sim.history:
        assert math.isfinite(entry["personalized"]["loss"])
        assert set(entry["inference"]) == {"primary", "prototype", "head"}
    if name == "fedproto" and options["missing_class"] == "drop":
        assert len(sim.server["global"]) <= 2  # only the last sampled client's classes
    if name == "fedtgp":
        assert len(sim.server["global"]) == C  # the generator yields every class


def test_prototype_runs_on_a_heterogeneous_family_are_deterministic() -> None:
    raw = proto_config("protonorm", model={"family": "image5", "feature_dim": D}, train={"rounds": 2, "lr": 0.01})
    first, second = simulator(raw).run(), simulator(raw).run()
    assert first["personalized"] == second["personalized"] and first["diagnostics"] == second["diagnostics"]
    diagnostics = simulator(raw)
    diagnostics.run()
    d = diagnostics.history[-1]["diagnostics"]
    assert {"global_angle_min_deg", "global_angle_mean_deg", "global_norm_mean", "feature_target_distance"} <= set(d)


def test_bad_choices_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        simulator(proto_config("fedproto", algorithm={"proto_collection": "sometimes"}))
    with pytest.raises(ConfigError):
        simulator(proto_config("fedproto", algorithm={"preset": "nope"}))
    with pytest.raises(ConfigError):
        simulator(proto_config("fedavg", model={"family": "image5"}))
