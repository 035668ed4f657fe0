"""Per-FedAvg and pFedMe against their equations.

The step functions are checked on tiny modules whose loss has a closed form (a quadratic, or a loss of zero), so the
expected parameters follow from the update rules by hand; the federation tests check the wiring (which batches a
step uses, the personalized models, the server's mean) against hand-written SGD and means.
"""

from __future__ import annotations

import pytest
import torch
from tests.conftest import distance, one_round, personalized, simulator
from torch import nn
from torch.nn import functional as F

from fedpal.algorithms.weight_sharing import perfedavg as perfedavg_module
from fedpal.algorithms.weight_sharing.perfedavg import meta_step
from fedpal.algorithms.weight_sharing.pfedme import personal_steps, pull_local, server_step
from fedpal.errors import ConfigError

# ---------------------------------------------------------------------------------------- tiny closed-form modules


class Quadratic(nn.Module):
    """f(w; batch) = 1/2 a_batch ||w||^2, a_batch the mean curvature of the batch's samples: grad = a w, H = a I."""

    def __init__(self, w: list[float], curvatures: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.curvatures = torch.tensor(curvatures, dtype=torch.float64)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.curvatures[batch].mean() * self.w.pow(2).sum()


W0 = [1.0, -2.0, 0.5]
D, D1, D2 = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])  # D, D', D'' by their curvature's position


@pytest.mark.parametrize(("alpha", "beta"), [(0.1, 0.05), (0.3, 0.2), (1.5, 0.01)])
def test_per_fedavg_fo_step_on_a_quadratic_is_the_closed_form(alpha: float, beta: float) -> None:
    """w~ = w - alpha a w; w <- w - beta a' w~ = w - beta a' (1 - alpha a) w, with a of D and a' of D'."""
    a, a1 = 2.0, 3.0
    q = Quadratic(W0, [a, a1, 7.0])
    meta_step([q.w], q.loss, [D, D1], alpha=alpha, beta=beta, variant="fo")
    w = torch.tensor(W0, dtype=torch.float64)
    assert torch.allclose(q.w.detach(), w - beta * a1 * (1 - alpha * a) * w, rtol=0, atol=1e-12)
    # the same curvature everywhere: spec check (a), w - beta a (1 - alpha a) w
    q = Quadratic(W0, [a, a, a])
    meta_step([q.w], q.loss, [D, D1], alpha=alpha, beta=beta, variant="fo")
    assert torch.allclose(q.w.detach(), w - beta * a * (1 - alpha * a) * w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("delta", [1e-3, 0.5])
def test_per_fedavg_hf_step_on_a_quadratic_is_the_exact_maml_step(delta: float) -> None:
    """For a quadratic the finite difference is exact for any delta: d = a'' g, so the HF step is
    w - beta (1 - alpha a'') a' (1 - alpha a) w; with one curvature, the MAML gradient (1 - alpha a) grad f(w~)."""
    alpha, beta = 0.2, 0.1
    a, a1, a2 = 2.0, 3.0, 0.5
    w = torch.tensor(W0, dtype=torch.float64)
    q = Quadratic(W0, [a, a1, a2])
    meta_step([q.w], q.loss, [D, D1, D2], alpha=alpha, beta=beta, variant="hf", delta=delta)
    expected = w - beta * (1 - alpha * a2) * a1 * (1 - alpha * a) * w
    assert torch.allclose(q.w.detach(), expected, rtol=0, atol=1e-9)
    q = Quadratic(W0, [a, a, a])
    meta_step([q.w], q.loss, [D, D1, D2], alpha=alpha, beta=beta, variant="hf", delta=delta)
    maml_gradient = (1 - alpha * a) * a * (1 - alpha * a) * w  # (I - alpha H) grad f(w - alpha grad f(w))
    assert torch.allclose(q.w.detach(), w - beta * maml_gradient, rtol=0, atol=1e-9)


def _linear_case() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    module = nn.Linear(4, 3).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    return module, x, y


def test_per_fedavg_hf_matches_the_second_order_maml_gradient_of_a_cross_entropy() -> None:
    """Off the quadratic case the finite difference is exact up to O(delta^2): with D'' = D the HF step agrees with
    w - beta grad_w f(w - alpha grad f(w; D); D') computed by double backpropagation."""
    alpha, beta = 0.3, 0.5
    module, x, y = _linear_case()
    start = [p.detach().clone() for p in module.parameters()]
    d, d1 = torch.arange(0, 6), torch.arange(6, 12)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(module(x[idx]), y[idx])

    meta_step(list(module.parameters()), loss_on, [d, d1, d], alpha=alpha, beta=beta, variant="hf", delta=1e-4)
    weight, bias = (p.clone().requires_grad_(True) for p in start)
    inner = F.cross_entropy(F.linear(x[d], weight, bias), y[d])
    gw, gb = torch.autograd.grad(inner, (weight, bias), create_graph=True)
    outer = F.cross_entropy(F.linear(x[d1], weight - alpha * gw, bias - alpha * gb), y[d1])
    exact = torch.autograd.grad(outer, (weight, bias))
    for p, w, g in zip(module.parameters(), start, exact, strict=True):
        assert torch.allclose(p.detach(), w - beta * g, rtol=0, atol=1e-8)
    # and the first-order step leaves out exactly the Hessian term, so it differs
    fo_module, _, _ = _linear_case()
    meta_step(list(fo_module.parameters()), loss_on, [d, d1], alpha=alpha, beta=beta, variant="fo")
    assert not torch.allclose(fo_module.weight.detach(), module.weight.detach(), atol=1e-6)


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_per_fedavg_with_alpha_zero_is_one_sgd_step_of_size_beta_on_the_second_batch(variant: str) -> None:
    beta = 0.4
    module, x, y = _linear_case()
    start = [p.detach().clone() for p in module.parameters()]
    d, d1, d2 = torch.arange(0, 4), torch.arange(4, 8), torch.arange(8, 12)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(module(x[idx]), y[idx])

    grads = torch.autograd.grad(loss_on(d1), list(module.parameters()))
    meta_step(list(module.parameters()), loss_on, [d, d1, d2], alpha=0.0, beta=beta, variant=variant)
    for p, w, g in zip(module.parameters(), start, grads, strict=True):
        assert torch.equal(p.detach(), w - beta * g)


def test_a_hf_step_needs_three_batches() -> None:
    q = Quadratic(W0, [1.0, 1.0])
    with pytest.raises(ValueError, match="3 batches"):
        meta_step([q.w], q.loss, [D, D1], alpha=0.1, beta=0.1, variant="hf")


# ---------------------------------------------------------------------------------------- Per-FedAvg in a federation


@pytest.mark.parametrize(("variant", "k"), [("fo", 2), ("hf", 3)])
def test_per_fedavg_steps_take_fresh_consecutive_batches_of_one_walk(tiny, monkeypatch, variant: str, k: int) -> None:
    """tau steps, each on k fresh batches: consecutive slices of the client's "train" permutation (new permutations
    once a pass is used up), D being the batch the loop's own forward pass used."""
    sim = simulator(tiny("perfedavg", algorithm={"variant": variant, "local_steps": 5}, train={"batch_size": 16}))
    seen: list[list[torch.Tensor]] = []
    original = perfedavg_module.meta_step

    def spy(parameters, loss_on, batches, **options):  # type: ignore[no-untyped-def]
        seen.append([b.clone() for b in batches])
        original(parameters, loss_on, batches, **options)

    monkeypatch.setattr(perfedavg_module, "meta_step", spy)
    view = sim.view(0, 1)
    w0 = sim.server["params"]
    state, reply = sim.algorithm.local_update(view, {}, {"params": w0})
    assert state == {} and set(reply) == {"params", "num_samples"} and reply["num_samples"] == view.num_train
    assert len(seen) == 5 and all(len(group) == k for group in seen)
    n, bs = view.num_train, 16
    gen = view.generator("train")
    walk: list[torch.Tensor] = []
    while len(walk) < 5 * k:
        order = torch.randperm(n, generator=gen)
        walk += [order[s : s + bs] for s in range(0, n, bs)]
    assert all(torch.equal(a, b) for a, b in zip([b for group in seen for b in group], walk[: 5 * k], strict=True))
    assert distance(reply["params"], w0) > 0


def test_per_fedavg_zero_local_steps_uses_train_local_epochs_passes(tiny) -> None:
    sim = simulator(tiny("perfedavg", algorithm={"local_steps": 0}, train={"batch_size": 16, "local_epochs": 3}))
    view = sim.view(1, 1)
    before = sim.assembly.local_steps()
    sim.algorithm.local_update(view, {}, {"params": sim.server["params"]})
    batches = -(-view.num_train // 16)
    assert sim.assembly.local_steps() - before == 3 * batches // 2


def test_per_fedavg_personalized_model_is_one_alpha_step_from_the_global_model(tiny) -> None:
    alpha, bs = 0.3, 8
    sim = simulator(tiny("perfedavg", algorithm={"alpha": alpha}, train={"batch_size": bs}))
    one_round(sim)
    w = sim.server["params"]
    for cid in (0, 2):
        view = sim.view(cid, 1)
        idx = torch.randperm(view.num_train, generator=view.generator("perfedavg-eval"))[:bs]
        module = sim.trainer.module
        sim.trainer.load(w)
        grads = dict(
            zip(
                [n for n, _ in module.named_parameters()],
                torch.autograd.grad(F.cross_entropy(module(view.train_x[idx]), view.train_y[idx]), module.parameters()),
                strict=True,
            )
        )
        personal = personalized(sim, cid, 1)
        assert all(torch.allclose(personal[k], w[k] - alpha * grads[k], rtol=0, atol=1e-7) for k in w)
        assert distance(personal, personalized(sim, cid, 1)) == 0  # the same batch every time
    assert sim.algorithm.global_params(sim.server) is w
    view = sim.view(0, 1)
    assert sim.algorithm.adapt_unseen(view, {}, {"params": w}) == {}  # nothing to adapt beyond evaluation's step


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_per_fedavg_server_takes_the_mean_of_the_uploads(tiny, weighting: str) -> None:
    sim = simulator(tiny("perfedavg", algorithm={"weighting": weighting}))
    _, replies = one_round(sim)
    sizes = {c: float(r["num_samples"]) if weighting == "samples" else 1.0 for c, r in replies.items()}
    assert len({r["num_samples"] for r in replies.values()}) > 1
    for name, value in sim.server["params"].items():
        mean = sum(sizes[c] * r["params"][name].double() for c, r in replies.items()) / sum(sizes.values())
        assert torch.allclose(value.double(), mean, rtol=0, atol=1e-6)
    assert sim.reduce.calls == {"update": 1}
    assert sim.algorithm.streamed_reply == ("params", "num_samples" if weighting == "samples" else None)


def test_per_fedavg_rejects_bad_settings(tiny) -> None:
    with pytest.raises(ConfigError, match="local_steps"):
        simulator(tiny("perfedavg", algorithm={"local_steps": -1}))
    with pytest.raises(ConfigError, match="delta"):
        simulator(tiny("perfedavg", algorithm={"variant": "hf", "delta": 0.0}))


# ---------------------------------------------------------------------------------------- pFedMe steps


def _zero_loss(parameters: list[nn.Parameter]) -> torch.Tensor:
    return sum(p.sum() for p in parameters) * 0.0  # type: ignore[return-value]


@pytest.mark.parametrize("steps", [1, 5])
def test_pfedme_inner_steps_without_data_loss_contract_toward_the_local_model(steps: int) -> None:
    """f = 0, mu = 0: theta - w_i shrinks by (1 - p_lr lam) per step; with mu > 0 theta contracts by
    (1 - p_lr (lam + mu)) toward lam w_i / (lam + mu), the minimiser of lam/2 ||theta - w||^2 + mu/2 ||theta||^2."""
    lr, lam = 0.05, 15.0
    theta0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    w = torch.tensor([0.5, 0.5, -1.0], dtype=torch.float64)
    theta = nn.Parameter(theta0.clone())
    personal_steps([theta], [w], lambda: _zero_loss([theta]), steps=steps, lr=lr, lam=lam, mu=0.0)
    assert torch.allclose(theta.detach() - w, (1 - lr * lam) ** steps * (theta0 - w), rtol=0, atol=1e-12)
    mu = 0.1
    theta = nn.Parameter(theta0.clone())
    personal_steps([theta], [w], lambda: _zero_loss([theta]), steps=steps, lr=lr, lam=lam, mu=mu)
    fixed = lam * w / (lam + mu)
    assert torch.allclose(theta.detach() - fixed, (1 - lr * (lam + mu)) ** steps * (theta0 - fixed), atol=1e-12)


def test_pfedme_inner_steps_follow_the_data_gradient_plus_the_pull() -> None:
    """On a quadratic f = 1/2 a ||theta||^2 one step is theta - lr (a theta + lam (theta - w) + mu theta)."""
    a, lr, lam, mu = 2.0, 0.01, 15.0, 0.001
    q = Quadratic(W0, [a])
    w = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    personal_steps([q.w], [w], lambda: q.loss(torch.tensor([0])), steps=1, lr=lr, lam=lam, mu=mu)
    theta0 = torch.tensor(W0, dtype=torch.float64)
    assert torch.allclose(q.w.detach(), theta0 - lr * (a * theta0 + lam * (theta0 - w) + mu * theta0), atol=1e-12)


def test_pfedme_local_model_takes_a_convex_step_toward_theta() -> None:
    eta, lam = 0.005, 15.0
    w = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    theta = nn.Parameter(torch.tensor([3.0, 0.0, -2.0], dtype=torch.float64))
    local = [w.clone()]
    pull_local(local, [theta], eta=eta, lam=lam)
    assert torch.allclose(local[0], (1 - eta * lam) * w + eta * lam * theta.detach(), rtol=0, atol=1e-12)
    assert torch.equal(theta.detach(), torch.tensor([3.0, 0.0, -2.0], dtype=torch.float64))  # theta stays


def test_pfedme_server_step_is_the_mean_at_beta_one_and_the_old_model_at_beta_zero() -> None:
    w = {"a": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    mean = {"a": torch.tensor([0.1, -0.7]), "n": torch.tensor(5)}
    assert torch.equal(server_step(w, mean, 1.0)["a"], mean["a"])
    assert torch.equal(server_step(w, mean, 0.0)["a"], w["a"])
    assert torch.allclose(server_step(w, mean, 0.25)["a"], 0.75 * w["a"] + 0.25 * mean["a"])
    assert int(server_step(w, mean, 0.0)["n"]) == 5  # counters take the mean's value


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_pfedme_server_moves_toward_the_sample_weighted_mean_by_beta(tiny, beta: float) -> None:
    sim = simulator(tiny("pfedme", algorithm={"beta": beta}))
    w = {k: v.clone() for k, v in sim.server["params"].items()}
    _, replies = one_round(sim)
    sizes = {c: float(r["num_samples"]) for c, r in replies.items()}
    for name, value in sim.server["params"].items():
        mean = sum(sizes[c] * r["params"][name].double() for c, r in replies.items()) / sum(sizes.values())
        assert torch.allclose(value.double(), (1 - beta) * w[name].double() + beta * mean, rtol=0, atol=1e-6)
        if beta == 0.0:
            assert torch.equal(value, w[name])
    assert sim.reduce.calls == {"update": 1}


# ---------------------------------------------------------------------------------------- pFedMe in a federation


def test_pfedme_without_pull_is_k_sgd_steps_per_batch_and_theta_carries_over(tiny) -> None:
    """lam = mu = 0: theta does plain SGD, K steps on each of the R batches of the "train" walk, never reset between
    iterations; w_i does not move (eta lam = 0), so the upload is the global model."""
    k, r, bs, lr = 2, 3, 16, 0.2
    raw = tiny("pfedme", algorithm={"lam": 0.0, "mu": 0.0, "inner_steps": k, "local_iterations": r, "personal_lr": lr})
    sim = simulator(raw | {"train": {**raw["train"], "batch_size": bs}})
    view = sim.view(2, 1)
    w0 = sim.server["params"]
    state, reply = sim.algorithm.local_update(view, {}, {"params": w0})
    assert distance(reply["params"], w0) == 0
    module = sim.trainer.module
    theta = {key: v.clone() for key, v in w0.items()}
    order = torch.randperm(view.num_train, generator=view.generator("train"))
    assert view.num_train >= r * bs
    for i in range(r):
        idx = order[i * bs : (i + 1) * bs]
        for _ in range(k):
            sim.trainer.load(theta)
            loss = F.cross_entropy(module(view.train_x[idx]), view.train_y[idx])
            grads = torch.autograd.grad(loss, list(module.parameters()))
            theta = {n: theta[n] - lr * g for (n, _), g in zip(module.named_parameters(), grads, strict=True)}
    assert all(torch.allclose(state["theta"][n], theta[n], rtol=0, atol=1e-6) for n in theta)


def test_pfedme_round_moves_both_models_and_evaluates_the_personal_one(tiny) -> None:
    sim = simulator(tiny("pfedme", algorithm={"local_iterations": 4, "inner_steps": 3}))
    w0 = {k: v.clone() for k, v in sim.server["params"].items()}
    assert distance(personalized(sim, 0, 1), w0) == 0  # before training: the global model
    before = sim.assembly.local_steps()
    _, replies = one_round(sim)
    assert sim.assembly.local_steps() - before == sim.data.num_clients * 4 * 3  # K theta steps per iteration
    for cid, reply in replies.items():
        theta = sim.clients[cid]["theta"]
        assert set(sim.clients[cid]) == {"theta"}
        assert personalized(sim, cid, 1) is theta
        assert 0 < distance(reply["params"], w0) < distance(theta, w0)  # w_i moved only part of the way to theta
    local = simulator(tiny("pfedme", algorithm={"local_iterations": 4, "inner_steps": 3, "evaluate": "local"}))
    _, replies = one_round(local)
    assert distance(personalized(local, 1, 1), replies[1]["params"]) == 0


def test_pfedme_theta_start_personal_continues_from_last_rounds_theta(tiny) -> None:
    raw = tiny("pfedme", algorithm={"theta_start": "personal", "local_iterations": 2})
    sim = simulator(raw)
    one_round(sim)
    view, state = sim.view(0, 2), sim.clients[0]
    payload = sim.algorithm.configure(sim.server, 2, [0])[0]
    from_theta, _ = sim.algorithm.local_update(view, state, payload)
    from_global, _ = sim.algorithm.local_update(view, {}, payload)  # no theta yet: starts from w, as "global" does
    reference = simulator(tiny("pfedme", algorithm={"local_iterations": 2}))
    one_round(reference)
    again, _ = reference.algorithm.local_update(view, reference.clients[0], payload)
    assert distance(from_global["theta"], again["theta"]) == 0
    assert distance(from_theta["theta"], again["theta"]) > 0


def test_pfedme_rejects_bad_settings(tiny) -> None:
    with pytest.raises(ConfigError, match="inner_steps"):
        simulator(tiny("pfedme", algorithm={"inner_steps": 0}))
    with pytest.raises(ConfigError, match="beta"):
        simulator(tiny("pfedme", algorithm={"beta": -1.0}))
