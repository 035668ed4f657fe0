"""APFL and FedAMP against their equations (specs/pfl_baselines.md §3, §4): the mixture's limits and its exact
gradients (finite differences), alpha's projection, PFLlib's APFL step by hand, the logit mixture, the server means;
FedAMP's attention weights and cloud models by hand, and the gradient of its proximal local objective."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
from tests.conftest import distance, one_round, personalized, simulator, tiny_config
from torch.func import functional_call
from torch.nn import functional as F

from fedpal.algorithms.core.contract import AlgorithmSetup, ClientView
from fedpal.algorithms.core.training import LocalTrainer, TrainSettings
from fedpal.algorithms.weight_sharing.apfl import APFL, APFLHyperparameters, apfl_pass, mix
from fedpal.algorithms.weight_sharing.fedamp import FedAMP, FedAMPHyperparameters, attention_weights
from fedpal.engine.reduction import MeanReducer
from fedpal.errors import UserError

# --------------------------------------------------------------------------------------------- helpers


def linear_view(n: int = 12, lr: float = 0.1, seed: int = 0) -> tuple[ClientView, dict[str, torch.Tensor]]:
    """A float64 linear model (4 -> 3) and one client of n random samples, trained in one full batch per epoch,
    and a second random parameter set of the same shapes."""
    gen = torch.Generator().manual_seed(seed)
    module = torch.nn.Linear(4, 3).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    trainer = LocalTrainer(module, TrainSettings(epochs=1, batch_size=n, lr=lr))
    view = ClientView(id=0, round=1, seed=seed, train_x=x, train_y=y, val_x=x[:0], val_y=y[:0], trainer=trainer)
    other = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in trainer.snapshot().items()}
    return view, other


def full_loss(view: ClientView, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of a parameter set on the client's whole training split."""
    return F.cross_entropy(functional_call(view.trainer.module, params, (view.train_x,)), view.train_y)


def full_gradient(view: ClientView, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(full_loss(view, leaves), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def along(params: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], h: float) -> dict[str, torch.Tensor]:
    return {k: params[k] + h * direction[k] for k in params}


def inner(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def mixture_loss(view: ClientView, v: dict[str, torch.Tensor], w: dict[str, torch.Tensor], alpha: float) -> float:
    return float(full_loss(view, {k: alpha * v[k] + (1 - alpha) * w[k] for k in v}))


# --------------------------------------------------------------------------------------------- APFL


def test_apfl_mixture_limits() -> None:
    v = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([3.0])}
    w = {"a": torch.tensor([0.5, 4.0]), "b": torch.tensor([-1.0]), "buffer": torch.tensor([7.0])}
    assert all(torch.equal(mix(v, w, torch.tensor(1.0))[k], {**w, **v}[k]) for k in w)  # alpha = 1: v_bar = v
    assert all(torch.equal(mix(v, w, torch.tensor(0.0))[k], w[k]) for k in w)  # alpha = 0: v_bar = w
    half = mix(v, w, torch.tensor(0.25))
    assert torch.allclose(half["a"], torch.tensor([0.625, 2.5])) and torch.equal(half["buffer"], w["buffer"])


def test_apfl_alpha_zero_leaves_v_untouched_and_trains_w_like_fedavg(tiny) -> None:
    sim = simulator(tiny("apfl", algorithm={"alpha": 0.0, "alpha_lr_scale": 0.0}))
    view = sim.view(0, 1)
    state = sim.clients[0]
    payload = sim.algorithm.configure(sim.server, 1, [0])[0]
    new_state, reply = sim.algorithm.local_update(view, state, payload)
    assert all(torch.equal(new_state["v"][k], state["v"][k]) for k in state["v"])  # alpha * grad = 0
    plain = view.fit(payload["params"]).params  # w's steps are FedAvg's local steps
    assert all(torch.equal(reply["params"][k], plain[k]) for k in plain)
    assert float(new_state["alpha"]) == 0.0
    sim.clients[0] = new_state
    mine = personalized(sim, 0, 1)
    assert all(torch.equal(mine[k], sim.server["params"][k]) for k in mine)  # v_bar = w, the global model


def test_apfl_alpha_one_trains_v_as_a_local_model(tiny) -> None:
    sim = simulator(tiny("apfl", algorithm={"alpha": 1.0, "alpha_lr_scale": 0.0}))
    view = sim.view(1, 1)
    state = sim.clients[1]
    payload = sim.algorithm.configure(sim.server, 1, [1])[1]
    v_start = {k: v.clone() + 0.01 for k, v in state["v"].items()}  # v differs from w
    new_state, _ = sim.algorithm.local_update(view, {**state, "v": v_start}, payload)
    local = view.fit({**payload["params"], **v_start}).params  # v_bar = v: plain SGD on f(v), same batches
    assert all(torch.allclose(new_state["v"][k], local[k], atol=1e-6, rtol=0) for k in v_start)
    sim.clients[1] = new_state
    mine = personalized(sim, 1, 1)
    assert all(torch.equal(mine[k], new_state["v"][k]) for k in new_state["v"])


def test_apfl_step_follows_the_mixture_gradients_by_finite_differences() -> None:
    """One full-batch step from (w, v, alpha): w' - w = -lr grad f(w); <v' - v, d> = -lr alpha d/dh f(v_bar + h d)
    for a random direction d; alpha' = alpha - lr_alpha d/dalpha f(alpha v + (1 - alpha) w), all derivatives by
    central differences in float64."""
    lr, alpha_lr, alpha, h = 0.1, 0.05, 0.3, 1e-6
    view, v = linear_view(lr=lr)
    w = view.trainer.snapshot()
    result = apfl_pass(view, w, v, torch.tensor(alpha, dtype=torch.float64), alpha_lr=alpha_lr)
    assert result.steps == 1
    d_alpha = (mixture_loss(view, v, w, alpha + h) - mixture_loss(view, v, w, alpha - h)) / (2 * h)
    assert float(result.alpha) == pytest.approx(alpha - alpha_lr * d_alpha, abs=1e-8)
    assert d_alpha == pytest.approx(
        inner({k: v[k] - w[k] for k in v}, full_gradient(view, mix(v, w, torch.tensor(alpha)))), abs=1e-7
    )
    gen = torch.Generator().manual_seed(1)
    v_bar = {k: alpha * v[k] + (1 - alpha) * w[k] for k in v}
    for _ in range(3):
        d = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in v.items()}
        slope_mix = (float(full_loss(view, along(v_bar, d, h))) - float(full_loss(view, along(v_bar, d, -h)))) / (2 * h)
        moved_v = {k: result.v[k] - v[k] for k in v}
        assert inner(moved_v, d) == pytest.approx(-lr * alpha * slope_mix, abs=1e-8)
        slope_w = (float(full_loss(view, along(w, d, h))) - float(full_loss(view, along(w, d, -h)))) / (2 * h)
        assert inner({k: result.w[k] - w[k] for k in w}, d) == pytest.approx(-lr * slope_w, abs=1e-8)


def test_apfl_alpha_stays_in_the_unit_interval(tiny) -> None:
    sim = simulator(tiny("apfl", algorithm={"alpha_lr_scale": 200.0}, train={"rounds": 3}))
    seen: list[float] = []
    for r in range(1, 4):
        one_round(sim, r)
        seen += [float(sim.clients[cid]["alpha"]) for cid in sim.clients]
    assert all(0.0 <= a <= 1.0 for a in seen)
    assert any(a in (0.0, 1.0) for a in seen)  # the projection acted
    assert len(set(seen)) > 1  # alpha is learned per client


def test_apfl_server_means_are_uniform_by_default_and_sample_weighted_on_request(tiny) -> None:
    for weighting in ("uniform", "samples"):
        sim = simulator(tiny("apfl", algorithm={"weighting": weighting}))
        _, replies = one_round(sim)
        sizes = {cid: float(r["num_samples"]) for cid, r in replies.items()}
        assert len(set(sizes.values())) > 1
        weights = sizes if weighting == "samples" else {cid: 1.0 for cid in replies}
        total = sum(weights.values())
        for name, value in sim.server["params"].items():
            manual = sum(weights[c] * replies[c]["params"][name].double() for c in replies) / total
            assert torch.allclose(value.double(), manual, atol=1e-6, rtol=0)


def test_apfl_output_mixture_scores_mix_the_two_models_logits(tiny) -> None:
    sim = simulator(tiny("apfl", algorithm={"mixture": "outputs"}))
    one_round(sim)
    algorithm, view = sim.algorithm, sim.view(2, 1)
    state = sim.clients[2]
    payload = algorithm.configure_evaluation(sim.server, 1, [2])[2]
    params = algorithm.personalized_params(view, state, payload)
    x = view.val_x
    alpha = float(state["alpha"])
    scores = algorithm.predict_scores(view, state, payload, params, x)["model"]
    v_logits = view.trainer.predict({**payload["params"], **state["v"]}, x)
    w_logits = view.trainer.predict(payload["params"], x)
    assert torch.allclose(scores, alpha * v_logits + (1 - alpha) * w_logits, atol=1e-6)
    plain = algorithm.predict_scores(view, state, payload, payload["params"], x)["model"]  # the global row
    assert torch.allclose(plain, w_logits)


def test_apfl_pfllib_variant_step_by_hand() -> None:
    """PFLlib: w and v each take an SGD step on their own loss; then alpha <- clip(alpha - lr * (<v' - w', alpha
    grad f(v) + (1 - alpha) grad f(w)> + 0.02 alpha)); after the pass v <- alpha' v' + (1 - alpha') w'."""
    lr, alpha = 0.1, 0.6
    view, v = linear_view(lr=lr, seed=3)
    w = view.trainer.snapshot()
    result = apfl_pass(view, w, v, torch.tensor(alpha, dtype=torch.float64), alpha_lr=lr, variant="pfllib")
    gw, gv = full_gradient(view, w), full_gradient(view, v)
    w1 = {k: w[k] - lr * gw[k] for k in w}
    v1 = {k: v[k] - lr * gv[k] for k in v}
    g = inner({k: v1[k] - w1[k] for k in v}, {k: alpha * gv[k] + (1 - alpha) * gw[k] for k in v}) + 0.02 * alpha
    alpha1 = min(1.0, max(0.0, alpha - lr * g))
    assert float(result.alpha) == pytest.approx(alpha1, abs=1e-10)
    for k in w:
        assert torch.allclose(result.w[k], w1[k], atol=1e-10)
        assert torch.allclose(result.v[k], alpha1 * v1[k] + (1 - alpha1) * w1[k], atol=1e-10)


def test_apfl_rejects_inconsistent_options() -> None:
    setup = AlgorithmSetup(num_classes=3, train=TrainSettings(), initial_params={}, seed=0)
    with pytest.raises(UserError):
        APFL(APFLHyperparameters(alpha=1.5), setup)
    with pytest.raises(UserError):
        APFL(APFLHyperparameters(variant="pfllib", mixture="outputs"), setup)


# --------------------------------------------------------------------------------------------- FedAMP


def test_fedamp_attention_weights_sum_to_one_and_equal_models_get_alpha_k_over_sigma() -> None:
    peers, own = attention_weights({1: 0.4, 2: 2.0, 5: 0.0}, alpha_k=0.2, sigma=0.5)
    assert peers[1] == pytest.approx(0.2 * math.exp(-0.8) / 0.5)
    assert math.fsum([*peers.values(), own]) == pytest.approx(1.0, abs=1e-15)
    same, self_weight = attention_weights({1: 0.0, 2: 0.0, 3: 0.0}, alpha_k=0.3, sigma=2.0)
    assert all(xi == pytest.approx(0.15) for xi in same.values())
    assert self_weight == pytest.approx(1 - 3 * 0.15)


def fedamp_algorithm(**hp: Any) -> tuple[FedAMP, dict[str, torch.Tensor]]:
    initial = {"w": torch.tensor([0.0, 0.0, 1.0])}
    setup = AlgorithmSetup(num_classes=3, train=TrainSettings(), initial_params=initial, seed=0, num_clients=3)
    return FedAMP(FedAMPHyperparameters(**hp), setup), initial


def test_fedamp_cloud_models_by_hand_with_partial_participation() -> None:
    alpha_k, sigma = 0.5, 2.0
    algorithm, initial = fedamp_algorithm(alpha_k=alpha_k, sigma=sigma)
    c = initial["w"]
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.5])

    def xi(p: torch.Tensor, q: torch.Tensor) -> float:
        return alpha_k * math.exp(-float((p - q).square().sum()) / sigma) / sigma

    state = algorithm.aggregate(
        algorithm.init_server(), 1, {0: {"params": {"w": a}}, 1: {"params": {"w": b}}}, MeanReducer()
    )
    u = {int(k): v["w"] for k, v in state["clouds"].items()}
    assert torch.allclose(u[0], (1 - xi(a, b)) * a + xi(a, b) * b)
    assert torch.allclose(u[1], (1 - xi(b, a)) * b + xi(b, a) * a)
    # client 2 has not uploaded: its own model is the initial one, its peers are both uploaders
    expected = (1 - xi(c, a) - xi(c, b)) * c + xi(c, a) * a + xi(c, b) * b
    assert torch.allclose(u[2], expected) and torch.allclose(state["fresh_cloud"]["w"], expected)
    assert float(state["self_weights"][0]) == pytest.approx(1 - xi(a, b))
    # round 2: only client 1 uploads; client 0's cloud uses its stored model and client 1's new one
    b2 = torch.tensor([0.5, 0.5, 0.5])
    state = algorithm.aggregate(state, 2, {1: {"params": {"w": b2}}}, MeanReducer())
    assert torch.allclose(state["clouds"]["0"]["w"], (1 - xi(a, b2)) * a + xi(a, b2) * b2)
    assert torch.equal(state["clouds"]["1"]["w"], b2)  # no peer uploaded: u_1 = w_1
    payloads = algorithm.configure(state, 3, [0, 7])
    assert payloads[7]["cloud"] is state["fresh_cloud"]  # a held-out client starts from the initial model


def test_fedamp_equal_models_warn_once_when_the_self_weight_is_negative(caplog) -> None:
    algorithm, _ = fedamp_algorithm(alpha_k=1.0, sigma=1.0)
    same = {"w": torch.tensor([1.0, 2.0, 3.0])}
    replies = {cid: {"params": {"w": same["w"].clone()}} for cid in range(3)}
    with caplog.at_level(logging.WARNING, logger="fedpal.algorithms.weight_sharing.fedamp"):
        state = algorithm.aggregate(algorithm.init_server(), 1, replies, MeanReducer())
        algorithm.aggregate(state, 2, replies, MeanReducer())
    assert sum("self-weight" in r.message for r in caplog.records) == 1
    assert torch.allclose(state["self_weights"], torch.full((3,), 1 - 2 * 1.0, dtype=torch.float64))
    for cloud in state["clouds"].values():  # the weights sum to 1, so equal models are their own cloud model
        assert torch.allclose(cloud["w"], same["w"])


def test_fedamp_local_gradient_includes_the_proximal_pull(tiny) -> None:
    """One full-batch SGD step: w' = w - lr (grad f(w) + (lambda / alpha_k)(w - u)); a detached proximal term
    (PFLlib) would leave only lr grad f(w)."""
    lam, alpha_k, lr = 2.0, 0.5, 0.1
    raw = tiny_config("fedamp", algorithm={"lam": lam, "alpha_k": alpha_k}, train={"batch_size": 4096, "lr": lr})
    sim = simulator(raw)
    view = sim.view(0, 1)
    w = sim.clients[0]["params"]
    gen = torch.Generator().manual_seed(0)
    cloud = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in w.items()}
    new_state, reply = sim.algorithm.local_update(view, sim.clients[0], {"cloud": cloud})
    grads = full_gradient(view, w)
    expected = {k: w[k] - lr * (grads[k] + (lam / alpha_k) * (w[k] - cloud[k])) for k in w}
    without_pull = {k: w[k] - lr * grads[k] for k in w}
    for k in w:
        assert torch.allclose(new_state["params"][k], expected[k], atol=1e-6, rtol=0)
    assert distance(new_state["params"], without_pull) > 100 * 1e-6
    assert new_state["params"] is reply["params"]


def test_fedamp_clients_keep_their_own_model_and_are_evaluated_on_it(tiny) -> None:
    sim = simulator(tiny("fedamp", algorithm={"lam": 0.0}))
    one_round(sim, 1)
    view = sim.view(3, 2)
    start = sim.clients[3]["params"]
    payload = sim.algorithm.configure(sim.server, 2, [3])[3]
    assert distance(payload["cloud"], start) > 0
    new_state, _ = sim.algorithm.local_update(view, sim.clients[3], payload)
    own = view.fit(start).params  # from w_i, not from u_i
    assert all(torch.equal(new_state["params"][k], own[k]) for k in own)
    sim.clients[3] = new_state
    assert personalized(sim, 3, 2) is new_state["params"]
