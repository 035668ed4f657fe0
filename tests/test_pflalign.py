"""pFLAlign against its equations (specs/pflalign.md §3, §8): v·P is an EMA of m² for any gradient stream, the
closed-form first steps (P = 0.01, γ = 0.6306 / 0.3694; γ ≈ 0.540 / 0.460 after an m reset), the limits of a
constant gradient (P → 1, γ → 1 or 0) and of vanishing gradients (P → 1 + β without a reset), where zero gradients
leave θ for each γ, T as the steps actually taken, Δ against this round's global, stale state, the personalized
models; the `sgd` variant is FedAvg bit for bit and every variant's messages and bytes are FedAvg's."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import one_round, personalized, simulator, tiny_config, without_wall
from torch import nn

from fedpal.algorithms.core.contract import AlgorithmSetup, ClientView
from fedpal.algorithms.core.training import LocalTrainer, TrainSettings
from fedpal.algorithms.weight_sharing.pflalign import (
    PFLAlign,
    PFLAlignHyperparameters,
    PFLAlignStep,
    update_moments,
)
from fedpal.errors import ConfigError

BETA = 0.9
F64 = torch.float64
VARIANTS = [
    "full",
    "no_preconditioner",
    "no_correction",
    "constant_gamma",
    "constant_gamma_one",
    "hard_gamma",
    "no_personalization",
    "sgd",
]

# --------------------------------------------------------------------------------------------- helpers


def stepper(
    theta: torch.Tensor,
    *,
    variant: str = "full",
    lr: float = 0.2,
    steps: int = 5,
    delta: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
) -> tuple[nn.Parameter, PFLAlignStep]:
    """One float64 parameter at ``theta`` and a pFLAlign step over it from a zero m and the given (default zero)
    v, P, Δ."""
    param = nn.Parameter(theta.clone().to(F64))
    n = param.numel()
    zeros = torch.zeros(n, dtype=F64)
    optimizer = PFLAlignStep(
        [param],
        lr=lr,
        steps=steps,
        variant=variant,
        beta=BETA,
        m=zeros.clone(),
        v=zeros.clone() if v is None else v.to(F64),
        p=zeros.clone() if p is None else p.to(F64),
        delta=zeros.clone() if delta is None else delta.to(F64),
    )
    return param, optimizer


def take(param: nn.Parameter, optimizer: PFLAlignStep, g: torch.Tensor) -> torch.Tensor:
    """One step with gradient ``g``; returns θ before the step."""
    before = param.detach().clone()
    param.grad = g.clone().to(F64)
    optimizer.step()
    return before


def first_step_gamma(sign: float) -> float:
    """γ at a client's very first step: |m| / σ = (1 − β) / √(β (1 − β)) whatever g, so the closed form."""
    return 0.5 + 0.5 * math.erf(math.sqrt((1 - BETA) / (2 * BETA))) * sign


class ZeroLogits(nn.Module):
    """A linear model whose logits are multiplied by 0: every gradient is exactly 0, so only the correction moves."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 0.0


def client_of(module: nn.Module, n: int, batch: int, epochs: int = 1, round: int = 1, lr: float = 0.5) -> ClientView:
    """One float64 client of n random samples (3 features, 2 classes) with the module and settings given."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=gen, dtype=F64)
    y = torch.randint(0, 2, (n,), generator=gen)
    trainer = LocalTrainer(module.double(), TrainSettings(epochs=epochs, batch_size=batch, lr=lr))
    return ClientView(id=0, round=round, seed=0, train_x=x, train_y=y, val_x=x[:0], val_y=y[:0], trainer=trainer)


def algorithm(client: ClientView, **hp: object) -> PFLAlign:
    setup = AlgorithmSetup(num_classes=2, train=client.settings, initial_params=client.trainer.snapshot(), seed=0)
    return PFLAlign(PFLAlignHyperparameters(**hp), setup)  # type: ignore[arg-type]


def dyadic_models() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A global model of ZeroLogits and a flat offset, all multiples of 1/8 (sums and quarters stay exact)."""
    theta_g = {
        "linear.weight": torch.arange(6, dtype=F64).view(2, 3) / 8 - 0.25,
        "linear.bias": torch.tensor([0.5, -1.0], dtype=F64),
    }
    delta = torch.tensor([0.5, -0.25, 1.0, 0.0, -0.75, 0.25, 2.0, -0.5], dtype=F64)
    return theta_g, delta


def state_with(alg: PFLAlign, delta: torch.Tensor, last_round: int) -> dict[str, object]:
    """A client state that took part in ``last_round`` and holds the offset ``delta`` (zero v, P)."""
    state: dict[str, object] = {key: torch.zeros_like(delta) for key in alg.persistent_keys()}
    if "delta" in state:
        state["delta"] = delta.clone()
    return {**state, "round": last_round}


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """A model's tensors as one vector, in its order (the module's: weight, then bias)."""
    return torch.cat([t.reshape(-1) for t in params.values()])


# --------------------------------------------------------------------------------------------- moments


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_v_times_p_is_an_ema_of_m_squared_for_any_gradient_stream(seed: int) -> None:
    """v·P = EMA_β(m²) for gradients of every scale, a run of zeros and an m reset mid-stream; α ∈ [0, 1] and
    α = β v_old / v_new."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.cat(
        [torch.full((20,), 1.0), torch.full((10,), 0.0), torch.full((20,), 30.0), torch.full((20,), 0.01)]
    )
    m, v, p = torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64)
    m_ref, ema_ref = torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64)
    for k, scale in enumerate(scales):
        if k == 35:  # a new round: m restarts, v and P persist
            m.zero_()
            m_ref.zero_()
        g = scale * (torch.randn(5, generator=gen, dtype=F64) + 0.5)
        v_old = v.clone()
        alpha = update_moments(g, m, v, p, beta=BETA, eps=1e-12)
        assert alpha is not None
        m_ref = BETA * m_ref + (1 - BETA) * g
        ema_ref = BETA * ema_ref + (1 - BETA) * m_ref**2
        assert torch.allclose(m, m_ref, rtol=1e-12, atol=0)
        assert torch.allclose(v * p, ema_ref, rtol=1e-6, atol=1e-15)  # up to ε / v
        assert bool((alpha >= 0).all() and (alpha <= 1).all())
        if bool((v > 0).all()):
            assert torch.allclose(alpha, BETA * v_old / v, rtol=0, atol=1e-6)  # up to ε / v


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_first_step_from_zero_state_has_the_closed_form(variant: str, sign: float) -> None:
    """The reimplementation's check: θ = 1, g = 2, Δ = ±0.4, η = 0.2, T = 5: θ moves by −η P g − γ Δ / T with
    P = (1 − β)² = 0.01 (1 without a preconditioner) and γ per variant (0.6306 / 0.3694 for the full rule)."""
    theta, g, delta, lr, steps = 1.0, 2.0, 0.4 * sign, 0.2, 5
    param, optimizer = stepper(
        torch.tensor([theta], dtype=F64), variant=variant, lr=lr, steps=steps, delta=torch.tensor([delta], dtype=F64)
    )
    take(param, optimizer, torch.tensor([g], dtype=F64))
    preconditioned = variant not in ("no_preconditioner", "sgd")
    gamma = {
        "full": first_step_gamma(sign),
        "no_preconditioner": first_step_gamma(sign),
        "no_correction": 0.0,
        "constant_gamma": 0.5,
        "constant_gamma_one": 1.0,
        "hard_gamma": 1.0 if sign > 0 else 0.0,
        "no_personalization": 0.0,  # Δ ≡ 0
        "sgd": 0.0,
    }[variant]
    p = 0.01 if preconditioned else 1.0
    if preconditioned:
        assert optimizer.p is not None and float(optimizer.p[0]) == pytest.approx(0.01, rel=1e-9)
    assert float(param.detach()[0]) == pytest.approx(theta - lr * p * g - gamma * delta / steps, abs=1e-12)
    if variant == "full":
        assert first_step_gamma(sign) == pytest.approx(0.6306 if sign > 0 else 0.3694, abs=5e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_first_step_of_a_later_round_keeps_gamma_near_one_half(sign: float) -> None:
    """m reset, v persisted at g², any P: |m| / σ = 0.1 / √0.99, so γ = ½ ± ½ erf(0.1 / √1.98) ≈ 0.540 / 0.460."""
    g, delta, lr, steps = 1.5, 0.3 * sign, 0.1, 4
    param, optimizer = stepper(
        torch.tensor([0.7], dtype=F64),
        lr=lr,
        steps=steps,
        delta=torch.tensor([delta], dtype=F64),
        v=torch.tensor([g * g], dtype=F64),
        p=torch.tensor([0.37], dtype=F64),
    )
    before = take(param, optimizer, torch.tensor([g], dtype=F64))
    assert optimizer.p is not None
    p = float(optimizer.p[0])
    assert p == pytest.approx(BETA * 0.37 + (1 - BETA) * (0.1 * g) ** 2 / (g * g), rel=1e-9)  # α = β v_old / v_new
    gamma = (float(before[0]) - float(param.detach()[0]) - lr * p * g) * steps / delta
    assert gamma == pytest.approx(0.5 + 0.5 * math.erf(0.1 / math.sqrt(2 * 0.99)) * sign, abs=1e-9)
    assert gamma == pytest.approx(0.540 if sign > 0 else 0.460, abs=5e-4)


def test_a_constant_gradient_drives_p_to_one_and_gamma_to_the_sign_agreement() -> None:
    """After many equal gradients m = v^½ sign(g) exactly in the limit: P → 1, σ² → 0, γ → 1 where g and Δ agree
    in sign (descent shrinks the offset) and 0 where they disagree (the offset is kept)."""
    g = torch.tensor([0.5, -2.0, 3.0, -0.1], dtype=F64)
    delta = torch.tensor([0.2, 0.3, -0.4, -0.1], dtype=F64)  # agree, disagree, disagree, agree
    lr, steps = 0.05, 400
    param, optimizer = stepper(torch.zeros(4, dtype=F64), lr=lr, steps=steps, delta=delta)
    for _ in range(steps - 1):
        take(param, optimizer, g)
    before = take(param, optimizer, g)
    assert optimizer.p is not None and optimizer.m is not None and optimizer.v is not None
    assert torch.allclose(optimizer.p, torch.ones(4, dtype=F64), atol=1e-9)
    assert torch.allclose(optimizer.v - optimizer.m**2, torch.zeros(4, dtype=F64), atol=1e-12)  # σ²
    gamma = (before - param.detach() - lr * optimizer.p * g) * steps / delta
    assert torch.allclose(gamma, torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), atol=1e-6)


@pytest.mark.parametrize("reset_at_switch", [False, True])
def test_p_rises_towards_one_plus_beta_when_gradients_vanish_unless_m_resets(reset_at_switch: bool) -> None:
    """A steady gradient, then zeros: EMA(m²) decays slower than v, so P → 1 + β = 1.9 (P is not capped); an m reset
    at the switch keeps P ≤ 1. ``p_max`` reports the largest coordinate seen, also after P falls again."""
    param, optimizer = stepper(torch.zeros(3, dtype=F64), delta=torch.zeros(3, dtype=F64))
    g = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    for _ in range(200):
        take(param, optimizer, g)
    assert optimizer.m is not None and optimizer.p is not None
    if reset_at_switch:
        optimizer.m.zero_()
    for _ in range(150):
        take(param, optimizer, torch.zeros(3, dtype=F64))
    if reset_at_switch:
        assert bool((optimizer.p <= 1 + 1e-12).all()) and float(optimizer.p_max) <= 1 + 1e-12
    else:
        assert torch.allclose(optimizer.p, torch.full((3,), 1 + BETA, dtype=F64), atol=1e-6)
    peak = float(optimizer.p.max())
    assert float(optimizer.p_max) == pytest.approx(peak, abs=1e-12)
    for k in range(40):  # sign-flipping gradients: noise, so P falls while p_max keeps the peak
        take(param, optimizer, (-1.0) ** k * 5.0 * torch.ones(3, dtype=F64))
    assert float(optimizer.p.max()) < peak - 0.1 and float(optimizer.p_max) == pytest.approx(peak, abs=1e-12)


def test_constant_gamma_one_ends_at_the_global_model_plus_the_preconditioned_path() -> None:
    """γ ≡ 1 removes exactly Δ over T steps: θ_end = θ_g + Σ_k (−η P_k g_k), whatever the gradients."""
    gen = torch.Generator().manual_seed(5)
    theta_g = torch.randn(6, generator=gen, dtype=F64)
    delta = torch.randn(6, generator=gen, dtype=F64)
    lr, steps = 0.3, 12
    param, optimizer = stepper(theta_g + delta, variant="constant_gamma_one", lr=lr, steps=steps, delta=delta)
    path = torch.zeros(6, dtype=F64)
    for _ in range(steps):
        g = torch.randn(6, generator=gen, dtype=F64)
        take(param, optimizer, g)
        assert optimizer.p is not None
        path -= lr * optimizer.p * g
    assert torch.allclose(param.detach(), theta_g + path, rtol=0, atol=1e-13)


def test_a_tensor_without_a_gradient_is_skipped_entirely() -> None:
    """A parameter that gets no gradient in a step keeps its value and its m, v, P, correction included; the others
    step as they would alone."""
    first, second = nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64)), nn.Parameter(torch.tensor([3.0], dtype=F64))
    delta = torch.tensor([0.5, 0.5, 0.5], dtype=F64)
    zeros = torch.zeros(3, dtype=F64)
    optimizer = PFLAlignStep(
        [first, second], lr=0.2, steps=5, m=zeros.clone(), v=zeros.clone(), p=zeros.clone(), delta=delta
    )
    second.grad = torch.tensor([2.0], dtype=F64)
    optimizer.step()
    alone, alone_step = stepper(torch.tensor([3.0], dtype=F64), lr=0.2, steps=5, delta=torch.tensor([0.5], dtype=F64))
    take(alone, alone_step, torch.tensor([2.0], dtype=F64))
    assert torch.equal(first.detach(), torch.tensor([1.0, 2.0], dtype=F64))
    assert optimizer.m is not None and optimizer.v is not None and optimizer.p is not None
    assert torch.equal(optimizer.m[:2], zeros[:2]) and torch.equal(optimizer.p[:2], zeros[:2])
    assert torch.equal(second.detach(), alone.detach())


# --------------------------------------------------------------------------------------------- a client's round


@pytest.mark.parametrize(("variant", "left"), [("constant_gamma_one", 0.0), ("no_correction", 1.0), ("full", 0.5)])
def test_zero_gradients_leave_the_offset_that_gamma_keeps(variant: str, left: float) -> None:
    """With zero gradients only the correction moves θ from its start θ_g + Δ: T = 4 steps (7 samples in batches of
    2, the partial batch counted) end exactly at θ_g (γ ≡ 1), θ_g + Δ (γ ≡ 0) and θ_g + Δ/2 (m = 0, so γ = ½)."""
    client = client_of(ZeroLogits(), n=7, batch=2, round=4)
    alg = algorithm(client, variant=variant)
    theta_g, delta = dyadic_models()
    state, reply = alg.local_update(client, state_with(alg, delta, last_round=3), {"params": theta_g})
    assert torch.equal(flat(reply["params"]), flat(theta_g) + left * delta)
    assert torch.equal(state["delta"], left * delta)  # Δ ← θ_end − θ_g


def test_a_clients_first_round_starts_at_the_global_model() -> None:
    """Round 1: Δ = 0, so the start is θ_g and the correction vanishes."""
    client = client_of(ZeroLogits(), n=7, batch=2, round=1)
    alg = algorithm(client)
    theta_g, _ = dyadic_models()
    state, reply = alg.local_update(client, alg.init_client(client), {"params": theta_g})
    assert torch.equal(flat(reply["params"]), flat(theta_g))
    assert torch.equal(state["delta"], torch.zeros(8, dtype=F64)) and state["round"] == 1


@pytest.mark.parametrize(("correction_steps", "left"), [("actual", 0.0), ("formula", 0.25)])
def test_t_is_the_number_of_steps_actually_taken(correction_steps: str, left: float) -> None:
    """Dropping the last partial batch leaves 3 of ceil(7 / 2) = 4 steps: T counted from the walk removes all of Δ
    under γ ≡ 1, the reimplementation's formula leaves a quarter of it (spec §7)."""
    client = client_of(ZeroLogits(), n=7, batch=2, round=2)
    alg = algorithm(client, variant="constant_gamma_one", drop_last=True, correction_steps=correction_steps)
    assert alg.planned_steps(client) == (3 if correction_steps == "actual" else 4)
    theta_g, delta = dyadic_models()
    _, reply = alg.local_update(client, state_with(alg, delta, last_round=1), {"params": theta_g})
    assert torch.allclose(flat(reply["params"]), flat(theta_g) + left * delta, rtol=0, atol=1e-14)


@pytest.mark.parametrize(("stale_state", "left"), [("keep", 0.5), ("reset", 0.0)])
def test_a_client_back_after_skipped_rounds_keeps_or_drops_its_state(stale_state: str, left: float) -> None:
    """Last seen in round 2, back in round 4: ``keep`` starts from θ_g + (stale) Δ, ``reset`` from θ_g with zero
    v, P, Δ; a client that took part in the previous round keeps its state under both."""
    theta_g, delta = dyadic_models()
    for last_round, expected in ((2, left), (3, 0.5)):
        client = client_of(ZeroLogits(), n=7, batch=2, round=4)
        alg = algorithm(client, stale_state=stale_state)
        _, reply = alg.local_update(client, state_with(alg, delta, last_round), {"params": theta_g})
        assert torch.equal(flat(reply["params"]), flat(theta_g) + expected * delta)


def test_m_carries_over_rounds_when_it_is_not_reset() -> None:
    """Without the round-wise reset (and without Δ), two one-epoch rounds are one two-epoch pass: m, v and P all
    continue; with the reset, the second round's P differs."""
    full_batch = {"n": 10, "batch": 10}

    def module() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(3, 2)

    two = client_of(module(), **full_batch, epochs=2, round=1)
    alg_two = algorithm(two, variant="no_personalization", reset_m_each_round=False)
    start = two.trainer.snapshot()
    _, once = alg_two.local_update(two, {}, {"params": start})
    ends = {}
    for reset in (False, True):
        first = client_of(module(), **full_batch, round=1)
        alg = algorithm(first, variant="no_personalization", reset_m_each_round=reset)
        state, reply = alg.local_update(first, {}, {"params": start})
        assert ("m" in state) is not reset
        second = client_of(module(), **full_batch, round=2)
        _, ends[reset] = alg.local_update(second, state, {"params": reply["params"]})
    assert torch.allclose(flat(ends[False]["params"]), flat(once["params"]), rtol=0, atol=1e-12)
    assert not torch.allclose(flat(ends[True]["params"]), flat(once["params"]), rtol=0, atol=1e-6)


def test_the_run_settings_must_be_plain_sgd_and_the_rates_valid() -> None:
    client = client_of(ZeroLogits(), n=7, batch=2)
    for settings in (
        TrainSettings(optimizer="adam"),
        TrainSettings(momentum=0.9),
        TrainSettings(weight_decay=1e-4),
        TrainSettings(grad_clip=1.0),
    ):
        setup = AlgorithmSetup(num_classes=2, train=settings, initial_params=client.trainer.snapshot(), seed=0)
        with pytest.raises(ConfigError, match=r"train\.optimizer"):
            PFLAlign(PFLAlignHyperparameters(), setup)
    for bad in ({"beta": 1.0}, {"eps": 0.0}, {"lr_scale": 0.0}):
        with pytest.raises(ConfigError):
            algorithm(client, **bad)


# --------------------------------------------------------------------------------------------- in the federation


def test_delta_is_measured_against_the_global_model_of_this_round(tiny) -> None:
    """After each round Δ_i = θ_i^end − θ_g^(t) with θ_g^(t) the model the client received, not the new aggregate;
    replies carry the model and the sample count only (Δ, v, P stay on the client)."""
    sim = simulator(tiny("pflalign"))
    names = [name for name, _ in sim.view(0, 1).trainer.module.named_parameters()]
    for round in (1, 2):
        payloads, replies = one_round(sim, round)
        for cid, reply in replies.items():
            assert set(payloads[cid]) == {"params"} and set(reply) == {"params", "num_samples"}
            received = torch.cat([(reply["params"][k] - payloads[cid]["params"][k]).reshape(-1) for k in names])
            aggregate = torch.cat([(reply["params"][k] - sim.server["params"][k]).reshape(-1) for k in names])
            assert torch.equal(sim.clients[cid]["delta"], received)
            assert not torch.allclose(sim.clients[cid]["delta"], aggregate)


def test_personalized_models_are_the_post_local_model_or_the_next_start(tiny) -> None:
    for choice in ("post_local", "next_init"):
        sim = simulator(tiny("pflalign", algorithm={"personal_model": choice}))
        _, replies = one_round(sim, 1)
        names = [name for name, _ in sim.view(0, 1).trainer.module.named_parameters()]
        for cid, reply in replies.items():
            mine = personalized(sim, cid, 1)
            if choice == "post_local":
                expected = reply["params"]
            else:  # θ_g^(t+1) + Δ_i, split back into the parameters
                offset = sim.clients[cid]["delta"].split([sim.server["params"][k].numel() for k in names])
                expected = {
                    k: sim.server["params"][k] + d.view_as(sim.server["params"][k])
                    for k, d in zip(names, offset, strict=True)
                }
            assert all(torch.equal(mine[k], expected[k]) for k in expected)


def test_the_sgd_variant_is_fedavg_bit_for_bit(tiny) -> None:
    """P ≡ 1 and Δ ≡ 0 leave plain SGD from the global model: with partial participation, the same seed gives the
    same server model, client models, metrics and bytes as FedAvg evaluated on its post-local models."""
    train = {"rounds": 3, "client_fraction": 0.75}
    ours = simulator(tiny("pflalign", train=train, algorithm={"variant": "sgd"}))
    fedavg = simulator(tiny("fedavg", train=train, algorithm={"evaluate": "post_local"}))
    ours.run()
    fedavg.run()
    assert all(torch.equal(ours.server["params"][k], fedavg.server["params"][k]) for k in fedavg.server["params"])
    for cid, state in fedavg.clients.items():
        if "params" in state:
            assert all(torch.equal(ours.clients[cid]["params"][k], v) for k, v in state["params"].items())
    assert without_wall(ours.history) == without_wall(fedavg.history)


@pytest.mark.parametrize("variant", ["full", "no_personalization"])
def test_messages_and_bytes_are_fedavgs(variant: str) -> None:
    """Down the global model, up the local model and n_i: every round's byte counts (training and evaluation)
    equal plain FedAvg's."""
    train = {"rounds": 2, "client_fraction": 0.75}
    ours = simulator(tiny_config("pflalign", train=train, algorithm={"variant": variant}))
    fedavg = simulator(tiny_config("fedavg", train=train))
    ours.run()
    fedavg.run()
    assert [h["bytes"] for h in ours.history] == [h["bytes"] for h in fedavg.history]
    assert all(h["bytes"]["up"] > 0 for h in ours.history)
