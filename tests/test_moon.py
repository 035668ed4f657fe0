"""MOON against its equations: the model-contrastive term, the local objective step by step (frozen models in eval
mode), the previous model kept by the client, and FedAvg as the mu = 0 and first-round special cases."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import distance, personalized, run_rounds, simulator
from torch import nn
from torch.nn import functional as F

import fedpal
from fedpal.algorithms.core.contract import AlgorithmSetup, ClientView
from fedpal.algorithms.core.training import LocalTrainer, TrainSettings, batch_indices
from fedpal.algorithms.weight_sharing.moon import Moon, MoonHyperparameters, moon_contrastive
from fedpal.common.seeding import derive_seed
from fedpal.errors import ConfigError
from fedpal.models.base import SplitModel

# --------------------------------------------------------------------------------------------- the term


def test_contrastive_term_matches_the_hand_computed_value() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_glob = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # cos: 1/sqrt(2), 1
    z_prev = torch.tensor([[-1.0, 0.0], [3.0, 4.0]])  # cos: -1, 4/5
    tau = 0.5
    a = torch.tensor([1 / math.sqrt(2), 1.0]) / tau
    b = torch.tensor([-1.0, 0.8]) / tau
    expected = (-torch.log(torch.exp(a) / (torch.exp(a) + torch.exp(b)))).mean()
    assert float(moon_contrastive(z, z_glob, z_prev, tau)) == pytest.approx(float(expected), rel=1e-6)
    # a closer global representation (or a farther previous one) lowers the loss
    assert moon_contrastive(z, z, z_prev, tau) < moon_contrastive(z, z_glob, z_prev, tau)
    assert moon_contrastive(z, z_glob, -z, tau) < moon_contrastive(z, z_glob, z_prev, tau)


def test_contrastive_term_is_log_two_with_zero_gradient_when_all_features_agree() -> None:
    base = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    z = base.clone().requires_grad_(True)
    loss = moon_contrastive(z, base, base, 0.5)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    # global == previous: the two logits are equal whatever z is, so the term cannot move the model
    other = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    z2 = other.clone().requires_grad_(True)
    loss2 = moon_contrastive(z2, base, base, 0.5)
    loss2.backward()
    assert float(loss2.detach()) == pytest.approx(math.log(2), abs=1e-6)
    assert z2.grad is not None and float(z2.grad.abs().max()) < 1e-7  # zero up to the rounding of log-softmax


# --------------------------------------------------------------------------------------------- the local objective


def test_local_update_follows_ce_plus_mu_lcon_with_frozen_models_in_eval_mode() -> None:
    """SGD by hand on a backbone with dropout: z in train mode, z_glob and z_prev from eval-mode frozen models."""
    mu, tau, lr, bs = 2.0, 0.5, 0.1, 8
    torch.manual_seed(0)
    module = SplitModel(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.5)), 5, 3)
    settings = TrainSettings(epochs=2, batch_size=bs, lr=lr)
    trainer = LocalTrainer(module, settings)
    w_glob = trainer.snapshot()
    w_prev = {k: v + 0.3 * torch.randn_like(v) for k, v in w_glob.items()}
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    view = ClientView(3, 2, 7, x, y, x[:0], y[:0], trainer)
    algorithm = Moon(MoonHyperparameters(mu=mu, tau=tau), AlgorithmSetup(3, settings, w_glob, 7))
    state, reply = algorithm.local_update(view, {"params": w_prev}, {"params": w_glob})

    module.eval()
    with torch.no_grad():
        trainer.load(w_glob)
        z_glob = module.backbone(x)
        trainer.load(w_prev)
        z_prev = module.backbone(x)
    trainer.load(w_glob)
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(7, 2, 3, "train", "stochastic-layers"))
        for _, idx in batch_indices(20, bs, view.generator("train"), epochs=2):
            optimizer.zero_grad()
            z = module.backbone(x[idx])
            sim_g, sim_p = F.cosine_similarity(z, z_glob[idx]), F.cosine_similarity(z, z_prev[idx])
            l_con = -torch.log(torch.exp(sim_g / tau) / (torch.exp(sim_g / tau) + torch.exp(sim_p / tau)))
            (F.cross_entropy(module.head(z), y[idx]) + mu * l_con.mean()).backward()
            optimizer.step()
    expected = trainer.snapshot()
    assert distance(reply["params"], expected) < 1e-5
    assert distance(reply["params"], w_glob) > 1e-2  # it trained
    assert distance(state["params"], reply["params"]) == 0  # the next round's previous model
    assert reply["num_samples"] == 20


def test_mu_zero_is_fedavg_bit_for_bit(tiny) -> None:
    avg = run_rounds(simulator(tiny("fedavg")), 3)
    moon = run_rounds(simulator(tiny("moon", algorithm={"mu": 0.0})), 3)
    assert all(torch.equal(v, moon.server["params"][k]) for k, v in avg.server["params"].items())
    a = fedpal.run(tiny("fedavg", train={"rounds": 2})).summary
    m = fedpal.run(tiny("moon", train={"rounds": 2}, algorithm={"mu": 0.0})).summary
    for key in ("personalized", "generalization", "global", "bytes", "local_steps"):
        assert a[key] == m[key]


def test_first_round_is_fedavg_then_the_previous_model_pushes_away(tiny) -> None:
    """Round 1 has no previous model of its own (global stands in: zero gradient, like the official empty pool)."""
    avg = simulator(tiny("fedavg"))
    moon = simulator(tiny("moon", algorithm={"mu": 5.0}))
    run_rounds(avg, 1)
    run_rounds(moon, 1)
    assert all(torch.equal(v, moon.server["params"][k]) for k, v in avg.server["params"].items())
    for cid in range(moon.data.num_clients):  # every client keeps the model it just trained
        assert "params" in moon.clients[cid] and "params" not in avg.clients[cid]
    avg.run_round(2)
    moon.run_round(2)
    assert distance(avg.server["params"], moon.server["params"]) > 0


def test_moon_sends_what_fedavg_sends_and_is_deterministic(tiny, strip_wall) -> None:
    a = fedpal.run(tiny("fedavg", train={"rounds": 2})).summary
    m1 = fedpal.run(tiny("moon", train={"rounds": 2})).summary
    m2 = fedpal.run(tiny("moon", train={"rounds": 2})).summary
    assert m1["bytes"] == a["bytes"]  # only the parameters travel; the previous model stays on the client
    assert strip_wall(m1) == strip_wall(m2)
    assert m1["personalized"] != a["personalized"]


def test_post_local_evaluates_the_trained_local_model(tiny) -> None:
    sim = run_rounds(simulator(tiny("moon", algorithm={"evaluate": "post_local"})), 2)
    assert sim.algorithm.personalized_is_global is False
    for cid in range(sim.data.num_clients):
        personal = personalized(sim, cid, 2)
        assert personal is sim.clients[cid]["params"]
    default = run_rounds(simulator(tiny("moon")), 2)
    assert default.algorithm.personalized_is_global is True
    assert distance(default.server["params"], sim.server["params"]) == 0  # evaluation does not change training


@pytest.mark.parametrize("values", [{"tau": 0.0}, {"mu": -1.0}, {"evaluate": "best"}])
def test_invalid_hyperparameters_are_rejected(tiny, values) -> None:
    with pytest.raises(ConfigError):
        simulator(tiny("moon", algorithm=values))
