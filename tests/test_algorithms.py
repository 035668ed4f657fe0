"""The built-in algorithms against their equations: FedAvg, FedProx, Local, FedAvg-FT, and the shared helpers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.conftest import distance, personalized, run_rounds, simulator
from torch.nn import functional as F

import fedpal
from fedpal.algorithms.core.registry import all_algorithms, get_algorithm_class
from fedpal.algorithms.core.training import LocalTrainer, TrainSettings, squared_distance
from fedpal.common.seeding import derive_seed
from fedpal.config import from_dict
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.data.federated import build_federated_data
from fedpal.engine.mean_fold import weighted_mean
from fedpal.errors import UserError

# --------------------------------------------------------------------------------------------- helpers


def test_weighted_mean_hand_case() -> None:
    items = [
        ({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0)}, 1.0),
        ({"w": torch.tensor([3.0, 6.0]), "b": torch.tensor(4.0)}, 3.0),
    ]
    out = weighted_mean(items)
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))  # (1*1 + 3*3)/4, (1*2 + 3*6)/4
    assert torch.allclose(out["b"], torch.tensor(3.0))
    assert out["w"].dtype == torch.float32
    counts = weighted_mean([({"n": torch.tensor(2)}, 1.0), ({"n": torch.tensor(4)}, 1.0)])
    assert counts["n"].dtype == torch.int64 and int(counts["n"]) == 3  # integer buffers keep their dtype
    with pytest.raises(ValueError):
        weighted_mean([({"w": torch.ones(1)}, 0.0)])


def test_squared_distance_hand_case() -> None:
    module = torch.nn.Linear(2, 1)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 2.0]]))
        module.bias.copy_(torch.tensor([3.0]))
    reference = {"weight": torch.tensor([[0.0, 0.0]]), "bias": torch.tensor([1.0])}
    assert float(squared_distance(module, reference).detach()) == pytest.approx(1 + 4 + 4)


def test_derive_seed_is_stable_distinct_and_63_bit() -> None:
    a = derive_seed(0, 1, 2, "train")
    assert a == derive_seed(0, 1, 2, "train")
    assert len({a, derive_seed(0, 1, 3, "train"), derive_seed(0, 2, 2, "train"), derive_seed(0, 1, 2, "x")}) == 4
    assert 0 <= a < 2**63


def test_client_generators_depend_on_seed_round_client_and_purpose(tiny) -> None:
    sim = simulator(tiny())

    def draw(cid: int, round: int, purpose: str = "train", seed: int | None = None) -> list[int]:
        view = sim.view(cid, round)
        if seed is not None:
            view.seed = seed
        return torch.randperm(50, generator=view.generator(purpose)).tolist()

    reference = draw(0, 1)
    assert draw(0, 1) == reference  # a fresh generator each time, not a shared stream
    assert draw(0, 2) != reference
    assert draw(1, 1) != reference
    assert draw(0, 1, "finetune") != reference
    assert draw(0, 1, seed=7) != reference


def test_local_trainer_steps_and_snapshot_independence() -> None:
    trainer = LocalTrainer(torch.nn.Linear(3, 2), TrainSettings(epochs=2, batch_size=4, lr=0.1))
    params = trainer.snapshot()
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    result = trainer.fit(params, x, y, torch.Generator().manual_seed(0))
    assert result.steps == 2 * 3  # 2 epochs x ceil(10 / 4) batches
    assert trainer.steps == 6
    assert distance(result.params, params) > 0  # the input dict is untouched, the result is a new one
    result.params["weight"].add_(1.0)
    assert not torch.equal(trainer.snapshot()["weight"], result.params["weight"])
    again = trainer.fit(params, x, y, torch.Generator().manual_seed(0))
    assert distance(again.params, result.params) > 0 and distance(again.params, trainer.snapshot()) == 0


def test_registry_lists_builtins_and_rejects_unknown_names() -> None:
    assert {"fedavg", "fedprox", "fedavg_ft", "local"} <= set(all_algorithms())
    with pytest.raises(UserError, match="did you mean 'fedavg'"):
        get_algorithm_class("fedavgg")
    prox = get_algorithm_class("fedprox")
    assert [(f.name, f.default) for f in dataclasses.fields(prox.Hyperparameters)] == [
        ("evaluate", "global"),
        ("mu", 0.01),
    ]


# --------------------------------------------------------------------------------------------- FedAvg


def test_fedavg_round_is_the_sample_weighted_mean_of_client_fits(tiny) -> None:
    sim = simulator(tiny("fedavg"))
    w0 = {k: v.clone() for k, v in sim.server["params"].items()}
    sim.run_round(1)
    n = sim.data.num_clients
    fits = [sim.view(cid, 1).fit(w0).params for cid in range(n)]
    sizes = [sim.data.clients[cid].train_y.numel() for cid in range(n)]
    assert len(set(sizes)) > 1  # the weighting matters
    for name, value in sim.server["params"].items():
        manual = sum(s * f[name].double() for s, f in zip(sizes, fits, strict=True)) / sum(sizes)
        unweighted = sum(f[name].double() for f in fits) / n
        assert torch.allclose(value.double(), manual, atol=1e-6, rtol=0)
        if name.endswith("weight"):
            assert not torch.allclose(value.double(), unweighted, atol=1e-6, rtol=0)
    # every client's personalized model is the global model
    for cid in range(n):
        assert personalized(sim, cid, 1) is sim.server["params"]


# --------------------------------------------------------------------------------------------- FedProx


def test_fedprox_with_mu_zero_is_exactly_fedavg(tiny, strip_wall) -> None:
    avg = run_rounds(simulator(tiny("fedavg")), 3)
    prox = run_rounds(simulator(tiny("fedprox", algorithm={"mu": 0.0})), 3)
    for name, value in avg.server["params"].items():
        assert torch.equal(value, prox.server["params"][name])
    a = fedpal.run(tiny("fedavg", train={"rounds": 2})).summary
    p = fedpal.run(tiny("fedprox", train={"rounds": 2}, algorithm={"mu": 0.0})).summary
    for key in ("personalized", "generalization", "global", "validation", "bytes", "local_steps"):
        assert a[key] == p[key]


def test_fedprox_large_mu_stays_closer_to_the_global_model(tiny) -> None:
    avg = simulator(tiny("fedavg"))
    prox = simulator(tiny("fedprox", algorithm={"mu": 5.0}))
    w0 = avg.server["params"]
    assert distance(w0, prox.server["params"]) == 0
    for cid in range(avg.data.num_clients):
        free = avg.algorithm.train_locally(avg.view(cid, 1), {"params": w0}).params
        held = prox.algorithm.train_locally(prox.view(cid, 1), {"params": w0}).params
        assert distance(held, w0) < distance(free, w0)
    run_rounds(avg, 1)
    run_rounds(prox, 1)
    assert distance(prox.server["params"], w0) < distance(avg.server["params"], w0)


def test_fedprox_local_step_follows_the_proximal_gradient(tiny) -> None:
    """Two plain SGD steps by hand: w <- w - lr * (grad CE(w) + mu * (w - w_global))."""
    mu, lr = 3.0, 0.1
    bs = 16
    raw = tiny("fedprox", algorithm={"mu": mu}, train={"batch_size": bs, "lr": lr})
    sim = simulator(raw)
    view = sim.view(0, 1)
    w0 = {k: v.clone() for k, v in sim.server["params"].items()}
    got = sim.algorithm.train_locally(view, {"params": w0}).params

    module = sim.trainer.module
    order = torch.randperm(view.num_train, generator=view.generator("train"))
    w = {k: v.clone() for k, v in w0.items()}
    for start in range(0, view.num_train, bs):
        idx = order[start : start + bs]
        sim.trainer.load(w)
        module.zero_grad(set_to_none=True)
        F.cross_entropy(module(view.train_x[idx]), view.train_y[idx]).backward()
        grads = {name: p.grad.clone() for name, p in module.named_parameters()}
        w = {k: w[k] - lr * (grads[k] + mu * (w[k] - w0[k])) for k in w}
    assert view.num_train > 2 * bs  # at least three steps, so the proximal term acted
    for name in w:
        assert torch.allclose(got[name], w[name], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- Local


def _with_scrambled_training(data: FederatedData, clients: list[int]) -> FederatedData:
    scrambled = []
    for cid, c in enumerate(data.clients):
        if cid in clients:
            train_x, train_y = (-c.train_x).flip(0), (c.train_y + 3) % data.num_classes
            c = ClientData(train_x, train_y, c.val_x, c.val_y, c.test_x, c.test_y)
        scrambled.append(c)
    return dataclasses.replace(data, clients=scrambled)


def test_local_personal_models_ignore_other_clients_data(tiny) -> None:
    raw = tiny("local")
    cfg = from_dict(raw)
    data = build_federated_data(cfg.data, cfg.seed)
    base = run_rounds(simulator(raw, data), 2)
    changed = run_rounds(simulator(raw, _with_scrambled_training(data, [1, 2, 3])), 2)
    assert distance(base.clients[0]["params"], changed.clients[0]["params"]) == 0
    assert distance(base.clients[1]["params"], changed.clients[1]["params"]) > 0
    a, b = base.evaluate(2)["personalized"], changed.evaluate(2)["personalized"]
    assert a["per_client_accuracy"][0] == b["per_client_accuracy"][0]


def test_local_equals_training_each_client_alone(tiny) -> None:
    rounds = 3
    sim = run_rounds(simulator(tiny("local")), rounds)
    w0 = sim.algorithm.setup.initial_params
    for cid in range(sim.data.num_clients):
        w = w0
        for r in range(1, rounds + 1):
            w = sim.view(cid, r).fit(w).params
        assert distance(w, sim.clients[cid]["params"]) == 0
    assert "params" not in sim.server and sim.algorithm.global_params(sim.server) is None


# --------------------------------------------------------------------------------------------- FedAvg-FT


def test_fedavg_ft_trains_like_fedavg_and_fine_tunes_away_from_it(tiny) -> None:
    avg = run_rounds(simulator(tiny("fedavg")), 2)
    ft = run_rounds(simulator(tiny("fedavg_ft", algorithm={"finetune_epochs": 1})), 2)
    ft3 = run_rounds(simulator(tiny("fedavg_ft", algorithm={"finetune_epochs": 3})), 2)
    assert distance(avg.server["params"], ft.server["params"]) == 0  # the global model is FedAvg's
    for cid in range(avg.data.num_clients):
        one = personalized(ft, cid, 2)
        three = personalized(ft3, cid, 2)
        assert distance(one, ft.server["params"]) > 0
        assert distance(three, ft.server["params"]) > distance(one, ft.server["params"])
    # evaluation fine-tunes a copy: the server's model is untouched by it
    before = {k: v.clone() for k, v in ft.server["params"].items()}
    ft.evaluate(2)
    assert distance(before, ft.server["params"]) == 0


def test_fedavg_ft_with_zero_epochs_is_fedavg_and_fine_tuning_helps_skewed_clients(tiny) -> None:
    skew = {"alpha": 0.1}
    avg = fedpal.run(tiny("fedavg", data=skew)).summary
    zero = fedpal.run(tiny("fedavg_ft", data=skew, algorithm={"finetune_epochs": 0})).summary
    ft = fedpal.run(tiny("fedavg_ft", data=skew, algorithm={"finetune_epochs": 2})).summary
    # the same model evaluated per client instead of once on pooled data: equal up to the loss's summation order
    assert zero["personalized"]["loss"] == pytest.approx(avg["personalized"]["loss"], rel=1e-6)
    assert {**zero["personalized"], "loss": 0} == {**avg["personalized"], "loss": 0}
    assert zero["generalization"] == avg["generalization"]
    assert zero["global"] == avg["global"] == ft["global"]
    assert zero["bytes"] == ft["bytes"] == avg["bytes"]
    assert ft["local_steps"] == avg["local_steps"]  # evaluation's fine-tuning is not a training step
    assert ft["personalized"]["accuracy"] > avg["personalized"]["accuracy"]


def test_fedavg_ft_finetune_lr_is_used(tiny) -> None:
    def personal(lr: float) -> dict[str, torch.Tensor]:
        sim = run_rounds(simulator(tiny("fedavg_ft", algorithm={"finetune_lr": lr})), 1)
        return personalized(sim, 0, 1)

    default, same, other = personal(0.0), personal(0.1), personal(0.5)  # train.lr is 0.1
    assert distance(default, same) == 0
    assert distance(default, other) > 0
