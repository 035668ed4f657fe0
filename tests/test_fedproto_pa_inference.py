"""FedProto with ProtoNorm's Prototype Alignment at inference only (``inference_prototypes = "pa"``): the PA
prototypes shipped for evaluation are ProtoNorm's server computation on the same averages, they are unit vectors
spread apart as PA's equations say, and training is bit for bit that of plain FedProto."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.conftest import simulator, tiny_config
from torch.nn import functional as F

from fedpal.algorithms.core import prototypes as protos
from fedpal.algorithms.prototype.alignment import AlignmentSettings, align_class_prototypes
from fedpal.algorithms.prototype.fedproto import FedProtoHyperparameters
from fedpal.algorithms.prototype.protonorm import ProtoNormHyperparameters
from fedpal.errors import ConfigError

C, D = 10, 16


def config(name: str = "fedproto", rounds: int = 2, **algorithm: object) -> dict:
    return tiny_config(
        name,
        data={"partition": "iid", "max_samples": 800},  # every client holds every class
        model={"name": "mlp", "hidden_dim": 32, "feature_dim": D},
        train={"rounds": rounds, "batch_size": 16},
        algorithm=dict(algorithm),
    )


def run(raw: dict, rounds: int):
    sim = simulator(raw)
    for r in range(1, rounds + 1):
        sim.run_round(r)
    return sim


def stacked(proto_dict: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return protos.from_dict(proto_dict, C, D, device="cpu")


def off_diagonal(unit: torch.Tensor) -> torch.Tensor:
    cos = unit @ unit.T
    return cos[~torch.eye(unit.shape[0], dtype=torch.bool)]


def test_pa_settings_default_to_protonorms() -> None:
    assert AlignmentSettings.of(FedProtoHyperparameters()) == AlignmentSettings.of(ProtoNormHyperparameters())
    assert AlignmentSettings.of(FedProtoHyperparameters()) == AlignmentSettings()


def test_shipped_pa_prototypes_are_protonorms_server_step_on_the_same_averages() -> None:
    sim = run(config(inference_prototypes="pa"), 1)
    mean, present = stacked(sim.server["aggregated"])
    assert bool(present.all())
    shipped = sim.algorithm.configure_evaluation(sim.server, 1, [0])[0]["pa_prototypes"]
    pa, pa_present = stacked(shipped)
    assert torch.equal(pa_present, present)
    # the shared function, and ProtoNorm's own make_global, on the same inputs
    expected, _ = align_class_prototypes(mean, present, AlignmentSettings())
    assert torch.equal(pa, expected)
    protonorm = simulator(config("protonorm")).algorithm
    global_protos, _, _, _ = protonorm.make_global(protonorm.init_server(), 1, mean, present, {})
    assert torch.equal(pa, global_protos)


def test_pa_prototypes_are_unit_centred_and_more_separated_than_the_averages() -> None:
    sim = run(config(inference_prototypes="pa"), 1)
    mean, _ = stacked(sim.server["aggregated"])
    pa, _ = stacked(sim.server["inference_pa"])
    assert torch.allclose(pa.norm(dim=1), torch.ones(C), atol=1e-6)  # PA projects every row onto the sphere
    cos = off_diagonal(pa)
    # PA's centroid goes to 0, so the mean pairwise cosine is -1/(C-1) (sum_ij x_i.x_j = |sum x|^2 = 0)
    assert float(cos.mean()) == pytest.approx(-1 / (C - 1), abs=1e-3)
    raw = off_diagonal(F.normalize(mean, dim=1))
    assert float(cos.max()) < float(raw.max())  # the closest pair of averages got further apart
    assert float(torch.pdist(pa).min()) > float(torch.pdist(F.normalize(mean, dim=1)).min())


def test_training_with_pa_at_inference_is_bit_identical_to_without() -> None:
    plain = run(config(rounds=3), 3)
    with_pa = run(config(rounds=3, inference_prototypes="pa"), 3)
    for cid in range(plain.data.num_clients):
        for key, value in plain.clients[cid]["params"].items():
            assert torch.equal(with_pa.clients[cid]["params"][key], value), (cid, key)
    for section in ("global", "aggregated"):
        assert plain.server[section].keys() == with_pa.server[section].keys()
        assert all(torch.equal(plain.server[section][k], with_pa.server[section][k]) for k in plain.server[section])
    # the training payload is the plain average; only evaluation carries the PA prototypes
    assert set(with_pa.algorithm.configure(with_pa.server, 4, [0])[0]) == {"prototypes"}
    assert set(with_pa.algorithm.configure_evaluation(with_pa.server, 4, [0])[0]) == {"prototypes", "pa_prototypes"}
    assert plain.counters.as_bytes()["up"] == with_pa.counters.as_bytes()["up"]
    assert plain.counters.as_bytes()["down"] == with_pa.counters.as_bytes()["down"]


def test_both_inference_modes_are_reported_from_the_same_models() -> None:
    plain, with_pa = simulator(config()), simulator(config(inference_prototypes="pa"))
    summary, summary_pa = plain.run(), with_pa.run()
    assert with_pa.algorithm.inference_modes() == ("prototype", "head", "prototype_pa")
    inference = summary_pa["inference"]
    assert set(inference) == {"primary", "prototype", "head", "prototype_pa"} and inference["primary"] == "prototype"
    assert inference["prototype"] == summary["inference"]["prototype"]  # the averaged-prototype score is unchanged
    assert inference["head"] == summary["inference"]["head"]
    assert summary_pa["personalized"] == summary["personalized"]
    assert 0.0 <= inference["prototype_pa"]["personalized_accuracy"] <= 1.0
    assert "inference_pa_iterations" in with_pa.history[-1]["diagnostics"]


def test_pa_prediction_is_the_largest_dot_product_with_a_unit_prototype() -> None:
    sim = run(config(inference_prototypes="pa"), 2)
    payload = sim.algorithm.configure_evaluation(sim.server, 2, [0])[0]
    view = sim.view(0, 2)
    params = sim.algorithm.personalized_params(view, sim.clients[0], payload)
    x = sim.data.clients[0].test_x
    scores = sim.algorithm.predict_scores(view, sim.clients[0], payload, params, x)
    features, _ = view.trainer.features_and_logits(params, x)
    pa, _ = stacked(payload["pa_prototypes"])
    # |r - p|^2 = |r|^2 - 2 r.p + 1 for unit p: the nearest prototype has the largest dot product
    assert torch.equal(scores["prototype_pa"].argmax(1), (features @ pa.T).argmax(1))
    averaged, present = stacked(payload["prototypes"])
    assert torch.equal(scores["prototype"], protos.nearest_prototype_scores(features, averaged, present))


def test_bad_pa_settings_are_config_errors() -> None:
    for bad in ({"pa_steps": -1}, {"pa_decay_every": 0}, {"pa_early_stop": -2}, {"inference_prototypes": "aligned"}):
        with pytest.raises(ConfigError):
            simulator(config(**bad))


def test_option_is_off_by_default() -> None:
    hp = FedProtoHyperparameters()
    assert hp.inference_prototypes == "average"
    assert dataclasses.replace(hp, inference_prototypes="pa").pa_steps == ProtoNormHyperparameters().pa_steps
    assert simulator(config()).algorithm.inference_modes() == ("prototype", "head")
