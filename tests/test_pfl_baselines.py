"""Ditto, FedRep, FedBABU and FedALA against their equations (specs/pfl_baselines.md §7-§10): each local step
recomputed by hand with autograd on a full batch, the parts each method may and may not move, the server means, and
the limiting cases (lam = 0, fixed ALA weights of 1 or 0)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.conftest import distance, one_round, personalized, simulator, tiny_config
from torch.func import functional_call
from torch.nn import functional as F

from fedpal.algorithms.core.contract import ClientView
from fedpal.algorithms.core.training import LocalTrainer
from fedpal.algorithms.weight_sharing.fedala import FedALAHyperparameters, adaptive_local_aggregation
from fedpal.algorithms.weight_sharing.fedper import backbone_of
from fedpal.algorithms.weight_sharing.fedrep import fit_head
from fedpal.algorithms.weight_sharing.lg_fedavg import head_of
from fedpal.engine.simulator import Simulator
from fedpal.errors import ConfigError

Params = dict[str, torch.Tensor]
FULL_BATCH = 4096  # larger than any tiny client's training split: one step per epoch


# --------------------------------------------------------------------------------------------- helpers


def full_batch_sim(name: str, lr: float, epochs: int = 1, **algorithm: Any) -> Simulator:
    return simulator(
        tiny_config(name, algorithm=algorithm, train={"batch_size": FULL_BATCH, "lr": lr, "local_epochs": epochs})
    )


def loss_on(view: ClientView, params: Params, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> Any:
    """Mean cross-entropy of a parameter set on (x, y), the client's whole training split by default."""
    x = view.train_x if x is None else x
    y = view.train_y if y is None else y
    return F.cross_entropy(functional_call(view.trainer.module, params, (x,)), y)


def gradient(view: ClientView, params: Params, names: list[str] | None = None) -> Params:
    """d CE / d params[name] on the whole training split, for ``names`` (every trainable tensor by default)."""
    names = names or [n for n, _ in view.trainer.module.named_parameters()]
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in names else v) for k, v in params.items()}
    grads = torch.autograd.grad(loss_on(view, leaves), [leaves[n] for n in names])
    return dict(zip(names, grads, strict=True))


def body_parameter_names(view: ClientView) -> list[str]:
    return [n for n, _ in view.trainer.module.named_parameters() if not n.startswith("head.")]


def sgd_step(params: Params, grads: Params, lr: float) -> Params:
    return {k: (v - lr * grads[k] if k in grads else v) for k, v in params.items()}


def perturbed(params: Params, scale: float, seed: int) -> Params:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in params.items()}


def assert_close(a: Params, b: Params, atol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


def assert_equal(a: Params, b: Params) -> None:
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- Ditto


def test_ditto_personal_steps_follow_ce_plus_the_proximal_pull_to_the_round_start_global_model() -> None:
    """Two full-batch epochs: v <- v - lr (grad f(v) + lam (v - w^t)) twice with the same w^t (the global model the
    round started from, not the client's moving copy); the upload is two plain SGD steps from w^t."""
    lam, lr = 0.7, 0.2
    sim = full_batch_sim("ditto", lr, epochs=2, lam=lam)
    view = sim.view(0, 1)
    w_t = perturbed(sim.server["params"], 0.1, seed=1)
    v = perturbed(sim.clients[0]["v"], 0.1, seed=2)
    new_state, reply = sim.algorithm.local_update(view, {"v": v}, {"params": w_t})
    expected_v, expected_w = v, w_t
    for _ in range(2):
        g = gradient(view, expected_v)
        expected_v = sgd_step(expected_v, {k: g[k] + lam * (expected_v[k] - w_t[k]) for k in g}, lr)
        expected_w = sgd_step(expected_w, gradient(view, expected_w), lr)
    assert_close(new_state["v"], expected_v)
    assert_close(reply["params"], expected_w)
    without_pull = v
    for _ in range(2):
        without_pull = sgd_step(without_pull, gradient(view, without_pull), lr)
    assert distance(new_state["v"], without_pull) > 1e-3  # the pull acted


def test_ditto_with_lambda_zero_trains_the_personal_model_as_local_sgd_on_the_global_models_batches(tiny) -> None:
    sim = simulator(tiny("ditto", algorithm={"lam": 0.0}, train={"local_epochs": 2}))
    view = sim.view(2, 1)
    v = perturbed(sim.clients[2]["v"], 0.05, seed=3)
    payload = sim.algorithm.configure(sim.server, 1, [2])[2]
    new_state, reply = sim.algorithm.local_update(view, {"v": v}, payload)
    assert_close(new_state["v"], view.fit(v).params, atol=1e-7)  # plain local SGD, mini-batches, two epochs
    assert_equal(reply["params"], view.fit(payload["params"]).params)


def test_ditto_evaluates_the_personal_model_and_averages_the_global_copies(tiny) -> None:
    for weighting in ("samples", "uniform"):
        sim = simulator(tiny("ditto", algorithm={"weighting": weighting}))
        start = dict(sim.server["params"])
        _, replies = one_round(sim)
        sizes = {cid: float(r["num_samples"]) for cid, r in replies.items()}
        weights = sizes if weighting == "samples" else {cid: 1.0 for cid in replies}
        for name, value in sim.server["params"].items():
            manual = sum(weights[c] * replies[c]["params"][name].double() for c in replies) / sum(weights.values())
            assert torch.allclose(value.double(), manual, atol=1e-6, rtol=0)
        for cid in replies:
            assert personalized(sim, cid, 1) is sim.clients[cid]["v"]
            assert distance(sim.clients[cid]["v"], start) > 0
        assert sim.algorithm.global_params(sim.server) is sim.server["params"]


def test_ditto_rejects_a_negative_lambda(tiny) -> None:
    with pytest.raises(ConfigError):
        simulator(tiny("ditto", algorithm={"lam": -1.0}))


# --------------------------------------------------------------------------------------------- FedRep


def test_fedrep_head_epochs_move_only_the_head_and_body_epochs_only_the_body() -> None:
    """Full batch, one head epoch and one body epoch: head' = head - lr grad_head f(body, head); body' = body -
    lr grad_body f(body, head'); the upload is body' alone and the client keeps head'."""
    lr = 0.3
    sim = full_batch_sim("fedrep", lr, head_epochs=1)
    sim.clients[1] = {"head": perturbed(sim.clients[1]["head"], 0.2, seed=4)}  # a head of its own
    view, state = sim.view(1, 1), sim.clients[1]
    payload = sim.algorithm.configure(sim.server, 1, [1])[1]
    start = {**payload["backbone"], **state["head"]}
    head_names, body_names = list(state["head"]), body_parameter_names(view)

    after_head = fit_head(view, start, 1, "head").params
    assert_equal(backbone_of(after_head), payload["backbone"])  # the body is bit-identical in the head phase
    assert_close(after_head, sgd_step(start, gradient(view, start, head_names), lr))

    new_state, reply = sim.algorithm.local_update(view, state, payload)
    assert set(reply) == {"backbone", "num_samples"} and not head_of(reply["backbone"])
    assert_equal(new_state["head"], head_of(after_head))  # the body phase leaves the head bit-identical
    expected_body = sgd_step(after_head, gradient(view, after_head, body_names), lr)
    assert_close(reply["backbone"], backbone_of(expected_body))
    assert distance(reply["backbone"], payload["backbone"]) > 1e-4


def test_fedrep_head_phase_equals_training_the_head_alone_with_the_body_frozen(tiny) -> None:
    """The head phase skips the body's backward; it must take the very steps of a pass that trains only the head."""
    sim = simulator(tiny("fedrep", train={"local_epochs": 3}))
    view = sim.view(0, 1)
    start = {**sim.server["backbone"], **sim.clients[0]["head"]}
    fast = fit_head(view, start, 3, "head")
    reference = view.fit(start, epochs=3, trainable=lambda m: list(m.head.parameters()), purpose="head")
    assert fast.steps == reference.steps > 3
    assert_equal(fast.params, reference.params)


def test_fedrep_server_averages_bodies_by_samples_and_never_touches_heads(tiny) -> None:
    sim = simulator(tiny("fedrep", algorithm={"head_epochs": 2}))
    _, replies = one_round(sim)
    heads = {cid: dict(sim.clients[cid]["head"]) for cid in replies}
    assert not head_of(sim.server["backbone"])
    sizes = {cid: float(r["num_samples"]) for cid, r in replies.items()}
    for name, value in sim.server["backbone"].items():
        manual = sum(sizes[c] * replies[c]["backbone"][name].double() for c in replies) / sum(sizes.values())
        assert torch.allclose(value.double(), manual, atol=1e-6, rtol=0)
    one_round(sim, 2)  # another aggregation: each head changes only by its own client's training
    for cid in replies:
        assert distance(personalized(sim, cid, 2), {**sim.server["backbone"], **sim.clients[cid]["head"]}) == 0
        assert distance(sim.clients[cid]["head"], heads[cid]) > 0


def test_fedrep_new_clients_learn_only_a_head_on_the_global_body(tiny) -> None:
    sim = simulator(tiny("fedrep"))
    one_round(sim)
    view = sim.view(0, 2)
    payload = sim.algorithm.configure(sim.server, 2, [0])[0]
    fresh = sim.algorithm.init_client(view)
    adapted = sim.algorithm.adapt_unseen(view, fresh, payload)
    assert set(adapted) == {"head"} and distance(adapted["head"], fresh["head"]) > 0
    expected = fit_head(view, {**payload["backbone"], **fresh["head"]}, sim.algorithm.hp.head_epochs, "head")
    assert_equal(adapted["head"], head_of(expected.params))


# --------------------------------------------------------------------------------------------- FedBABU


def test_fedbabu_every_client_trains_under_the_same_fixed_random_head(tiny, monkeypatch) -> None:
    sim = simulator(tiny("fedbabu", train={"rounds": 3}))
    initial_head = head_of(sim.algorithm.setup.initial_params)
    assert float(initial_head["head.weight"].std()) > 0  # a random head, not a constant one
    seen: list[Params] = []
    fit = LocalTrainer.fit

    def spy(self: LocalTrainer, params: Params, *args: Any, **kwargs: Any) -> Any:
        seen.append(head_of(params))
        result = fit(self, params, *args, **kwargs)
        seen.append(head_of(result.params))
        return result

    monkeypatch.setattr(LocalTrainer, "fit", spy)
    bodies = []
    for r in (1, 2, 3):
        _, replies = one_round(sim, r)
        bodies.append(dict(sim.server["backbone"]))
        assert all(set(reply) == {"backbone", "num_samples"} for reply in replies.values())
    assert len(seen) == 2 * 3 * sim.data.num_clients
    for head in seen:  # the start of every client's pass and its end, in every round
        assert_equal(head, initial_head)
    assert (
        distance(bodies[0], backbone_of(sim.algorithm.setup.initial_params)) > 0 and distance(bodies[2], bodies[1]) > 0
    )
    assert_equal(head_of(sim.algorithm.global_params(sim.server)), initial_head)


def test_fedbabu_body_step_and_uniform_server_mean_by_hand() -> None:
    lr = 0.25
    sim = full_batch_sim("fedbabu", lr)
    start = dict(sim.algorithm.setup.initial_params)
    _, replies = one_round(sim)
    body_names = body_parameter_names(sim.view(0, 1))
    for cid, reply in replies.items():
        view = sim.view(cid, 1)
        assert_close(reply["backbone"], backbone_of(sgd_step(start, gradient(view, start, body_names), lr)))
    for name, value in sim.server["backbone"].items():  # authors' mean: uniform over the sampled clients
        manual = sum(r["backbone"][name].double() for r in replies.values()) / len(replies)
        assert torch.allclose(value.double(), manual, atol=1e-6, rtol=0)


def test_fedbabu_fine_tunes_the_personalized_model_from_the_global_body_and_fixed_head() -> None:
    lr, finetune_lr = 0.1, 0.05
    for part in ("full", "head"):
        sim = full_batch_sim("fedbabu", lr, finetune_epochs=1, finetune_lr=finetune_lr, finetune_part=part)
        one_round(sim)
        view = sim.view(3, 1)
        start = sim.algorithm.global_params(sim.server)
        assert start is not None
        names = list(head_of(start)) if part == "head" else None
        expected = sgd_step(start, gradient(view, start, names), finetune_lr)
        mine = personalized(sim, 3, 1)
        assert_close(mine, expected)
        assert distance(head_of(mine), head_of(start)) > 0  # fine-tuning changes the head
        if part == "head":
            assert_equal(backbone_of(mine), backbone_of(start))
    none = full_batch_sim("fedbabu", lr, finetune_epochs=0)
    one_round(none)
    assert_equal(personalized(none, 0, 1), none.algorithm.global_params(none.server))  # PFLlib's per-round model


# --------------------------------------------------------------------------------------------- FedALA


def ala_setting(seed: int = 0, lr: float = 0.1) -> tuple[ClientView, Params, Params]:
    """A client view with a local model and a different global model (a perturbation of the local one)."""
    sim = full_batch_sim("fedala", lr)
    view = sim.view(0, 2)
    local = perturbed(sim.clients[0]["params"], 0.3, seed=seed)
    global_params = perturbed(local, 0.3, seed=seed + 100)
    return view, local, global_params


def test_fedala_start_is_global_below_and_a_weighted_blend_on_top() -> None:
    """With the weights fixed (eta = 0): W = 1 gives the global model everywhere, W = 0 keeps the local top tensors
    bit for bit; the lower tensors are the global ones bit for bit either way."""
    view, local, global_params = ala_setting()
    hp = FedALAHyperparameters(eta=0.0)
    top = [n for n, _ in view.trainer.module.named_parameters()][-2:]
    assert top == ["head.weight", "head.bias"]
    for fill in (1.0, 0.0):
        weights = {n: torch.full_like(local[n], fill) for n in top}
        result = adaptive_local_aggregation(view, local, global_params, weights, first=False, version=1, hp=hp)
        assert result.ran and all(torch.equal(result.weights[n], weights[n]) for n in top)
        lower = {k: v for k, v in result.start.items() if k not in top}
        assert_equal(lower, {k: v for k, v in global_params.items() if k not in top})
        expected_top = global_params if fill == 1.0 else local
        if fill == 1.0:  # local + (global - local) * 1 is the global tensor up to one rounding
            assert_close({n: result.start[n] for n in top}, {n: expected_top[n] for n in top}, atol=1e-6)
        else:
            assert_equal({n: result.start[n] for n in top}, {n: expected_top[n] for n in top})


def test_fedala_weight_step_is_the_gradient_of_the_loss_through_the_blend() -> None:
    """One pass of one batch (the whole split): W' = clip(W - eta dL/dW, 0, 1), with dL/dW taken independently by
    autograd through theta_l + (theta_g - theta_l) * W; it equals dL/dtheta_hat * (theta_g - theta_l)."""
    eta = 0.5
    view, local, global_params = ala_setting(seed=1)
    hp = FedALAHyperparameters(eta=eta, sample_percent=100.0)
    top = ["head.weight", "head.bias"]
    gen = torch.Generator().manual_seed(5)
    weights = {n: torch.rand(local[n].shape, generator=gen) for n in top}
    result = adaptive_local_aggregation(view, local, global_params, weights, first=False, version=3, hp=hp)
    assert result.passes == 1
    w_leaves = {n: weights[n].clone().requires_grad_(True) for n in top}
    blended = {**local, **{k: v for k, v in global_params.items() if k not in top}}
    blended.update({n: local[n] + (global_params[n] - local[n]) * w_leaves[n] for n in top})
    grads = torch.autograd.grad(loss_on(view, blended), [w_leaves[n] for n in top])
    for n, g in zip(top, grads, strict=True):
        assert torch.allclose(result.weights[n], (weights[n] - eta * g).clamp(0, 1), atol=1e-7, rtol=0)
        moved = global_params[n] - local[n]
        assert torch.allclose(result.start[n], local[n] + moved * result.weights[n], atol=0, rtol=0)


def test_fedala_weights_stay_in_the_unit_interval_and_the_first_aggregation_runs_until_losses_settle() -> None:
    view, local, global_params = ala_setting(seed=2)
    top = ["head.weight", "head.bias"]
    ones = {n: torch.ones_like(local[n]) for n in top}
    hp = FedALAHyperparameters(eta=50.0, threshold=1e9, loss_window=4)  # a huge step; the rule stops at once
    first = adaptive_local_aggregation(view, local, global_params, ones, first=True, version=1, hp=hp)
    assert first.passes == hp.loss_window + 1  # more than loss_window losses are needed before the rule applies
    values = torch.cat([w.reshape(-1) for w in first.weights.values()])
    assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
    assert bool(((values == 0) | (values == 1)).any()) and bool((values < 1).any())  # clipped, and learned
    later = adaptive_local_aggregation(view, local, global_params, first.weights, first=False, version=2, hp=hp)
    assert later.passes == 1
    capped = FedALAHyperparameters(threshold=0.0, max_first_passes=7)  # never settles: the cap stops it
    assert adaptive_local_aggregation(view, local, global_params, ones, first=True, version=1, hp=capped).passes == 7


def test_fedala_skips_while_the_global_model_brings_nothing_new() -> None:
    view, local, _ = ala_setting(seed=3)
    weights = {n: torch.full_like(local[n], 0.5) for n in ["head.weight", "head.bias"]}
    result = adaptive_local_aggregation(
        view, local, dict(local), weights, first=True, version=1, hp=FedALAHyperparameters()
    )
    assert not result.ran and result.passes == 0
    assert result.start is local and result.weights is weights


def test_fedala_evaluates_the_model_its_next_training_starts_from(tiny) -> None:
    """evaluate = "ala": after round 2 a client is scored on ALA(its local model, the latest global model), which is
    bit for bit what round 3 trains from; the server takes FedAvg's sample-weighted mean."""
    sim = simulator(tiny("fedala", train={"rounds": 3}))
    one_round(sim, 1)
    assert all(not sim.clients[c]["ala_done"] for c in sim.clients)  # round 1: local = global, ALA skipped
    _, replies = one_round(sim, 2)
    assert all(sim.clients[c]["ala_done"] and sim.clients[c]["ala_passes"] > 10 for c in sim.clients)
    sizes = {cid: float(r["num_samples"]) for cid, r in replies.items()}
    for name, value in sim.server["params"].items():
        manual = sum(sizes[c] * replies[c]["params"][name].double() for c in replies) / sum(sizes.values())
        assert torch.allclose(value.double(), manual, atol=1e-6, rtol=0)
    algorithm = sim.algorithm
    for cid in sim.clients:
        evaluated = personalized(sim, cid, 2)
        payload = algorithm.configure(sim.server, 3, [cid])[cid]
        start = algorithm.aggregation(sim.view(cid, 3), sim.clients[cid], payload).start  # type: ignore[attr-defined]
        assert_equal(evaluated, start)
        assert distance(evaluated, sim.server["params"]) > 0 and distance(evaluated, sim.clients[cid]["params"]) > 0
    post_local = simulator(tiny("fedala", algorithm={"evaluate": "post_local"}))
    one_round(post_local)
    assert personalized(post_local, 1, 1) is post_local.clients[1]["params"]
