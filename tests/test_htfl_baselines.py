"""The five HtFL baselines that share no backbone weights (LG-FedAvg, FedDistill, FML, FedKD, FedGH) against the
equations of their HtFLlib implementations, and each one end to end on homogeneous and heterogeneous models."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import pytest
import torch
from tests.conftest import distance, one_round, personalized, simulator
from torch import nn
from torch.nn import functional as F

import fedpal
from fedpal.algorithms.core.contract import ClientView
from fedpal.algorithms.distillation.feddistill import distill_term
from fedpal.algorithms.distillation.fedkd import compress, energy_rank, recover
from fedpal.algorithms.distillation.mutual import kl_mean
from fedpal.config import from_dict
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.data.federated import build_federated_data
from fedpal.engine.messages import message_bytes

HTFL = ("lg_fedavg", "feddistill", "fml", "fedkd", "fedgh")
IMAGE5 = {"name": "mlp", "hidden_dim": 32, "feature_dim": 32, "family": "image5"}
MLP = {"name": "mlp", "hidden_dim": 32, "feature_dim": 16}


def htfl_fit(view: ClientView, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain CE fit with HtFLlib's loader (unshuffled, drop_last)."""
    return view.fit(params, shuffle=False, drop_last=True).params


# --------------------------------------------------------------------------------------------- LG-FedAvg


def test_lg_fedavg_averages_heads_by_samples_and_sends_only_heads(tiny) -> None:
    sim = simulator(tiny("lg_fedavg", model=IMAGE5))
    assert len(set(sim.architectures[: sim.data.num_clients])) > 1
    payloads, replies = one_round(sim)
    for message in [*payloads.values(), *replies.values()]:
        params = message["head"]
        assert set(params) == {"head.weight", "head.bias"}
        assert set(message) <= {"head", "num_samples"}
    sizes = [sim.data.clients[c].train_y.numel() for c in replies]
    assert len(set(sizes)) > 1
    for name, value in sim.server["head"].items():
        weighted = sum(n * replies[c]["head"][name].double() for c, n in zip(replies, sizes, strict=True)) / sum(sizes)
        uniform = sum(r["head"][name].double() for r in replies.values()) / len(replies)
        assert torch.allclose(value.double(), weighted, atol=1e-6, rtol=0)
        assert not torch.allclose(value.double(), uniform, atol=1e-6, rtol=0)
    # the evaluated model: own (trained) backbone with the latest global head
    for cid in range(sim.data.num_clients):
        personal = personalized(sim, cid, 1)
        assert all(torch.equal(personal[k], sim.server["head"][k]) for k in sim.server["head"])
        backbone = [k for k in personal if not k.startswith("head.")]
        assert backbone and all(torch.equal(personal[k], sim.clients[cid]["params"][k]) for k in backbone)


def test_lg_fedavg_client_trains_from_the_global_head(tiny) -> None:
    sim = simulator(tiny("lg_fedavg", model=MLP))
    one_round(sim)
    view, state = sim.view(1, 2), sim.clients[1]
    payload = sim.algorithm.configure(sim.server, 2, [1])[1]
    new_state, _ = sim.algorithm.local_update(view, state, payload)
    expected = htfl_fit(view, {**state["params"], **payload["head"]})
    assert distance(new_state["params"], expected) == 0
    assert distance(new_state["params"], htfl_fit(view, state["params"])) > 0  # the head it starts from matters


# --------------------------------------------------------------------------------------------- FedDistill


def test_feddistill_uploads_the_per_class_mean_of_the_training_logits(tiny) -> None:
    sim = simulator(tiny("feddistill", model=MLP, train={"batch_size": 16}))
    view, state = sim.view(2, 1), sim.clients[2]
    payload = sim.algorithm.configure(sim.server, 1, [2])[2]
    _, reply = sim.algorithm.local_update(view, state, payload)

    # by hand: the unshuffled, drop_last batches; each batch's logits taken before its SGD step
    trainer = sim.trainers[view.architecture]
    trainer.load(state["params"])
    trainer.module.train()
    optimizer = trainer.make_optimizer()
    seen: dict[int, list[torch.Tensor]] = {}
    bs, n = 16, view.num_train
    assert n % bs != 0  # the dropped partial batch is part of what is checked
    for start in range(0, n - bs + 1, bs):
        x, y = view.train_x[start : start + bs], view.train_y[start : start + bs]
        logits = trainer.module(x)
        for row, label in zip(logits.detach(), y.tolist(), strict=True):
            seen.setdefault(label, []).append(row)
        optimizer.zero_grad()
        F.cross_entropy(logits, y).backward()
        optimizer.step()
    classes = sorted(seen)
    assert reply["mask"].nonzero().squeeze(1).tolist() == classes
    expected = torch.stack([torch.stack(seen[c]).mean(0) for c in classes])
    assert torch.allclose(reply["logits"], expected, atol=1e-5)


def test_feddistill_server_averages_each_class_uniformly_over_its_holders(tiny) -> None:
    sim = simulator(tiny("feddistill", model=MLP))
    c = sim.data.num_classes
    a = {"logits": torch.tensor([[1.0] * c, [3.0] * c]), "mask": torch.zeros(c, dtype=torch.bool)}
    a["mask"][[0, 1]] = True
    b = {"logits": torch.tensor([[5.0] * c]), "mask": torch.zeros(c, dtype=torch.bool)}
    b["mask"][1] = True
    state = sim.algorithm.aggregate(sim.server, 1, {0: a, 1: b}, sim.reduce)
    assert state["mask"].nonzero().squeeze(1).tolist() == [0, 1]  # no client held the other classes
    assert torch.allclose(state["logits"][0], torch.full((c,), 1.0))  # held by one client: unchanged
    assert torch.allclose(state["logits"][1], torch.full((c,), 4.0))  # (3 + 5) / 2, whatever the sample counts


def test_feddistill_term_vanishes_at_the_targets_and_round_one_is_plain_ce(tiny) -> None:
    z = torch.randn(6, 10, requires_grad=True)
    assert float(distill_term(z, z.detach().clone(), "mse").detach()) == 0.0
    (grad,) = torch.autograd.grad(distill_term(z, z.detach().clone(), "ce_softmax"), z)
    assert float(grad.abs().max()) < 1e-7  # CE against its own softmax: a minimum
    targets = torch.randn(6, 10)
    manual = -(targets * F.log_softmax(z, dim=1)).sum(1).mean()  # HtFLlib's current CE on raw logits
    assert torch.allclose(distill_term(z, targets, "ce_logits"), manual)

    # round 1 (no global logits) trains by CE alone, whatever lam; later rounds feel lam
    sim = simulator(tiny("feddistill", model=MLP, algorithm={"lam": 5.0}))
    view, state = sim.view(0, 1), sim.clients[0]
    new_state, _ = sim.algorithm.local_update(view, state, sim.algorithm.configure(sim.server, 1, [0])[0])
    assert distance(new_state["params"], htfl_fit(view, state["params"])) == 0
    one_round(sim)
    payload = sim.algorithm.configure(sim.server, 2, [0])[0]
    assert bool(payload["mask"].any())
    view2 = sim.view(0, 2)
    with_term, _ = sim.algorithm.local_update(view2, sim.clients[0], payload)
    assert distance(with_term["params"], htfl_fit(view2, sim.clients[0]["params"])) > 0


def test_feddistill_up_size_is_at_most_a_class_by_class_table(tiny) -> None:
    sim = simulator(tiny("feddistill", model=IMAGE5))
    c = sim.data.num_classes
    _, replies = one_round(sim)
    for reply in replies.values():
        sizes = message_bytes(reply)
        assert sizes["logits"] <= c * c * 4 and sizes["mask"] == c
        assert sum(sizes.values()) <= c * c * 4 + c


# --------------------------------------------------------------------------------------------- FML


def test_fml_kl_is_htfllibs_kldivloss() -> None:
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = nn.KLDivLoss()(F.log_softmax(a, dim=1), F.softmax(b, dim=1))
    assert torch.allclose(kl_mean(a, b), reference, atol=1e-7)  # KL(softmax(b) || softmax(a)), mean over B*C


def test_fml_with_alpha_beta_one_trains_both_models_independently(tiny) -> None:
    hp = {"alpha": 1.0, "beta": 1.0, "clip_norm": 0.0, "shuffle_train": True}
    sim = simulator(tiny("fml", model=IMAGE5, algorithm=hp))
    cid = 1
    view, state = sim.view(cid, 1), sim.clients[cid]
    payload = sim.algorithm.configure(sim.server, 1, [cid])[cid]
    new_state, reply = sim.algorithm.local_update(view, state, payload)
    personal = view.fit(state["params"], shuffle=True, drop_last=True).params
    shared = sim.algorithm.shared.fit(
        payload["shared"], view.train_x, view.train_y, view.generator("train"), shuffle=True, drop_last=True
    ).params
    assert distance(new_state["params"], personal) < 1e-6
    assert distance(reply["shared"], shared) < 1e-6
    # with the mutual terms on, each model moves differently
    coupled = simulator(tiny("fml", model=IMAGE5, algorithm={**hp, "alpha": 0.5, "beta": 0.5}))
    other, _ = coupled.algorithm.local_update(coupled.view(cid, 1), coupled.clients[cid], payload)
    assert distance(other["params"], personal) > 1e-4


def test_fml_shared_model_is_the_uniform_mean_and_only_it_travels(tiny) -> None:
    sim = simulator(tiny("fml", model=IMAGE5))
    names = {k for k, _ in sim.algorithm.shared.module.named_parameters()}
    payloads, replies = one_round(sim)
    for message in [*payloads.values(), *replies.values()]:
        assert set(message) == {"shared"} and set(message["shared"]) == names
    for name, value in sim.server["shared"].items():
        mean = sum(r["shared"][name].double() for r in replies.values()) / len(replies)
        assert torch.allclose(value.double(), mean, atol=1e-6, rtol=0)
    assert sim.algorithm.shared_name == "img_mlp"  # "" = the family's first architecture, client 0's


# --------------------------------------------------------------------------------------------- FedKD


def test_fedkd_energy_rank_and_full_energy_reconstruction() -> None:
    assert [energy_rank(torch.tensor([3.0, 2.0, 1.0]), e) for e in (0.5, 0.9, 0.99, 1.0)] == [1, 2, 3, 3]
    gen = torch.Generator().manual_seed(0)
    params = {
        "fc.weight": torch.randn(12, 9, generator=gen),
        "fc.bias": torch.randn(12, generator=gen),
        "conv1d.weight": torch.randn(6, 4, 5, generator=gen),
        "conv.weight": torch.randn(8, 3, 5, 5, generator=gen),
        "row.weight": torch.randn(1, 9, generator=gen),  # one row: sent dense (HtFLlib's rule)
        "zero.weight": torch.zeros(4, 4),
    }
    for layout in ("htfllib", "flatten"):
        packed = compress(params, 1.0, layout)
        assert set(packed["dense"]) == {"fc.bias", "row.weight"}
        restored = recover(packed["dense"], packed["us"], packed["v"], params)
        for name, value in params.items():
            assert torch.allclose(restored[name], value, atol=1e-5), (layout, name)


def test_fedkd_lower_energy_keeps_lower_rank_and_fewer_counted_bytes(tiny) -> None:
    gen = torch.Generator().manual_seed(1)
    spectrum = torch.tensor([2.0**-i for i in range(16)])
    q1, _ = torch.linalg.qr(torch.randn(32, 16, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(24, 16, generator=gen))
    params = {"w": q1 @ torch.diag(spectrum) @ q2.T, "b": torch.randn(32, generator=gen)}
    ranks, sizes = [], []
    for energy in (1.0, 0.99, 0.9, 0.5):
        packed = compress(params, energy)
        r = packed["us"]["w"].shape[-1]
        ranks.append(r)
        sizes.append(sum(message_bytes(packed).values()))
        assert sizes[-1] == 4 * (32 * r + r * 24 + 32)  # U*S [32, r], V [r, 24] and the dense bias
    assert ranks == sorted(ranks, reverse=True) and ranks[0] >= 16 and ranks[-1] == 1  # a rank-16 matrix
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]

    # through the engine: the counted up-bytes follow the energy
    def up_bytes(energy: float) -> int:
        hp = {"t_start": energy, "t_end": energy, "schedule_rounds": 3}
        sim = simulator(tiny("fedkd", model=MLP, algorithm=hp))
        sim.run_round(1)
        return sum(sim.counters.up_by_key.values())

    full, low = up_bytes(1.0), up_bytes(0.5)
    assert low < full


def test_fedkd_energy_schedule_end_points(tiny) -> None:
    sim = simulator(tiny("fedkd", model=MLP, algorithm={"t_start": 0.9, "t_end": 0.98, "schedule_rounds": 10}))
    energy = sim.algorithm.energy
    assert energy(1) == pytest.approx(0.9)
    assert energy(10) == pytest.approx(0.98)
    assert energy(5) == pytest.approx(0.9 + 4 / 9 * 0.08)
    defaults = dataclasses.asdict(simulator(tiny("fedkd", model=MLP)).algorithm.hp)
    assert (defaults["t_start"], defaults["t_end"], defaults["mentee_lr"]) == (0.95, 0.98, 0.01)


def test_fedkd_down_and_up_are_compressed_and_the_teacher_is_evaluated(tiny) -> None:
    sim = simulator(tiny("fedkd", model=IMAGE5, algorithm={"schedule_rounds": 3}))
    payloads, replies = one_round(sim)
    assert all(not p["us"] for p in payloads.values())  # round 1: the initial student, dense
    assert all(r["us"] and set(r["us"]) == set(r["v"]) for r in replies.values())
    assert sim.server["us"]  # the aggregate goes down compressed
    for cid in range(sim.data.num_clients):
        personal = personalized(sim, cid, 1)
        assert personal is sim.clients[cid]["params"]


# --------------------------------------------------------------------------------------------- FedGH


def test_fedgh_server_head_training_reduces_ce_on_the_pairs(tiny) -> None:
    sim = simulator(tiny("fedgh", model=MLP, algorithm={"server_epochs": 20}))
    gen = torch.Generator().manual_seed(0)
    c, d = sim.data.num_classes, 16
    centers = 3 * torch.randn(c, d, generator=gen)
    labels = torch.arange(c).repeat(4)
    protos = centers[labels] + 0.1 * torch.randn(labels.numel(), d, generator=gen)
    head = sim.server["head"]

    def ce(h: dict[str, torch.Tensor]) -> float:
        return float(F.cross_entropy(protos @ h["head.weight"].T + h["head.bias"], labels))

    trained = sim.algorithm.train_head(head, protos, labels, round=1)
    assert ce(trained) < 0.5 * ce(head)
    assert torch.equal(sim.server["head"]["head.weight"], head["head.weight"])  # the input is untouched


def test_fedgh_clients_adopt_the_global_head_and_upload_eval_pass_prototypes(tiny) -> None:
    sim = simulator(tiny("fedgh", model=IMAGE5))
    _, replies = one_round(sim)
    for cid, reply in replies.items():
        view = sim.view(cid, 1)
        features, _ = view.trainer.features_and_logits(sim.clients[cid]["params"], view.train_x)
        classes = reply["mask"].nonzero().squeeze(1).tolist()
        assert classes == sorted(set(view.train_y.tolist()))
        expected = torch.stack([features[view.train_y == k].mean(0) for k in classes])
        assert torch.allclose(reply["protos"], expected, atol=1e-5)
        assert set(reply) == {"protos", "mask"}
    # after receiving the head, every client's model holds it, and training starts from it
    payload = sim.algorithm.configure(sim.server, 2, [0])[0]
    for cid in range(sim.data.num_clients):
        personal = personalized(sim, cid, 1)
        assert all(torch.equal(personal[k], sim.server["head"][k]) for k in sim.server["head"])
    view, state = sim.view(0, 2), sim.clients[0]
    new_state, _ = sim.algorithm.local_update(view, state, payload)
    assert distance(new_state["params"], htfl_fit(view, {**state["params"], **payload["head"]})) == 0


# --------------------------------------------------------------------------------------------- all five


@pytest.mark.parametrize("model", [IMAGE5, MLP], ids=["image5", "mlp"])
@pytest.mark.parametrize("name", HTFL)
def test_three_rounds_finish_finite_and_deterministic(tiny, strip_wall, name: str, model: dict) -> None:
    raw = tiny(name, model=model, algorithm={"schedule_rounds": 3} if name == "fedkd" else {})
    first = fedpal.run(raw).summary
    second = fedpal.run(raw).summary
    assert strip_wall(first) == strip_wall(second)
    assert math.isfinite(first["personalized"]["loss"]) and math.isfinite(first["generalization"]["accuracy"])
    assert not [path for path, value in numbers(first) if not math.isfinite(value)]
    assert first["rejected_replies"] == 0
    assert first["bytes"]["up"] > 0 and first["bytes"]["down"] > 0


def numbers(value: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in a summary, with its path."""
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in numbers(v, f"{path}[{i}]")]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [(path, float(value))]
    return []


def _with_empty_and_partial_clients(data: FederatedData) -> FederatedData:
    """Client 0 with no training data, client 1 holding a single class."""
    clients = list(data.clients)
    c0, c1 = clients[0], clients[1]
    clients[0] = ClientData(c0.train_x[:0], c0.train_y[:0], c0.val_x, c0.val_y, c0.test_x, c0.test_y)
    keep = c1.train_y == c1.train_y[0]
    clients[1] = ClientData(c1.train_x[keep], c1.train_y[keep], c1.val_x, c1.val_y, c1.test_x, c1.test_y)
    return dataclasses.replace(data, clients=clients)


@pytest.mark.parametrize("name", HTFL)
def test_empty_and_single_class_clients_do_not_break_a_round(tiny, name: str) -> None:
    raw = tiny(name, model=IMAGE5)
    cfg = from_dict(raw)
    data = _with_empty_and_partial_clients(build_federated_data(cfg.data, cfg.seed))
    sim = simulator(raw, data)
    for r in (1, 2):
        sim.run_round(r)
    assert sim.counters.rejected_replies == 0
    metrics = sim.evaluate(2)
    assert math.isfinite(metrics["personalized"]["accuracy"])
