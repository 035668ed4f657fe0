"""pFLAlign (Kim and Lee, arXiv 2605.02143, "Personalized Federated Learning for Gradient Alignment"): FedAvg on the
server; each client starts a round from the global model plus its last personal offset Δ_i, takes steps scaled
coordinate by coordinate by a preconditioner P_i (the estimated signal fraction of its gradients), and removes over
the round the parts of Δ_i that its gradients confidently oppose.

The paper's Algorithm 1 could not be read; the update follows a third-party reimplementation (kdwaha/Flex), as
``shared/specs/pflalign.md`` §3 states it. Round t, client i, with T the exact number of steps of this round:

    θ ← θ_g + Δ_i;  m ← 0 (v_i, P_i persist across rounds)
    each step, with stochastic gradient g (per coordinate):
        m ← β m + (1 − β) g;   v ← β v + (1 − β) g²
        α = 1 − (1 − β) g² / (v + ε);   P ← α P + (1 − β) m² / (v + ε)      (v·P is an EMA of m²)
        σ² = max(v − m², 0);   γ = ½ + ½ erf(|m| / √(2σ² + ε)) sign(m Δ_i)
        θ ← θ − η P g − γ Δ_i / T
    Δ_i ← θ_end − θ_g   (against the global model received this round); upload θ_end

The step is an optimizer (``PFLAlignStep``) handed to the one training loop through ``optimizer_factory``; Δ, v and
P live in the client state as flat tensors over the trainable parameters (module order) and never leave the client.
Buffers follow FedAvg. η = ``lr_scale`` · ``train.lr``. ``docs/methods/pflalign.md`` lists every option and variant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fedpal.algorithms.core.contract import AlgorithmSetup, ClientState, ClientView, Payload, Reply
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import batch_indices
from fedpal.algorithms.weight_sharing.fedavg import FedAvg
from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError

Variant = Literal[
    "full",
    "no_preconditioner",
    "no_correction",
    "constant_gamma",
    "constant_gamma_one",
    "hard_gamma",
    "no_personalization",
    "sgd",
]
CorrectionSteps = Literal["actual", "formula"]
StaleState = Literal["keep", "reset"]
PersonalModel = Literal["post_local", "next_init"]


@dataclass(frozen=True)
class PFLAlignHyperparameters:
    variant: Variant = "full"  # ablations: which of P, γ and Δ are replaced by constants (spec §7)
    lr_scale: float = 1.0  # η = lr_scale * train.lr (P < 1 shrinks steps: tune it, e.g. over {1, 3, 10})
    beta: float = 0.9  # EMA rate of m, v and P (reimplementation)
    eps: float = 1e-12  # in the denominators of α, P and γ (reimplementation)
    reset_m_each_round: bool = True  # m restarts at 0 every round; False keeps it in the client state
    correction_steps: CorrectionSteps = "actual"  # T: the steps the pass takes, or ceil(n / B) * E (formula)
    drop_last: bool = False  # skip each epoch's last partial batch (then "formula" overcounts T)
    stale_state: StaleState = "keep"  # a client back after skipped rounds keeps Δ, v, P, or restarts from zero
    personal_model: PersonalModel = "post_local"  # θ_end of the latest round, or the next start θ_g + Δ


@dataclass(frozen=True)
class VariantRules:
    """Which parts of the update a variant keeps: the moments m and v, the preconditioner P (else P ≡ 1), the
    personal offset Δ (else Δ ≡ 0) and the correction (else γ ≡ 0)."""

    moments: bool
    preconditioner: bool
    personal_offset: bool
    correction: bool

    @classmethod
    def of(cls, variant: str) -> VariantRules:
        personal = variant not in ("no_personalization", "sgd")
        return cls(
            moments=variant != "sgd",
            preconditioner=variant not in ("no_preconditioner", "sgd"),
            personal_offset=personal,
            correction=personal and variant != "no_correction",
        )


def update_moments(
    g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, p: torch.Tensor | None, *, beta: float, eps: float
) -> torch.Tensor | None:
    """m, v and (unless None) P after one gradient, in place and in the spec's order (m, v, then P from the new
    m and v); returns the decay α applied to P (None without P)."""
    m.mul_(beta).add_(g, alpha=1.0 - beta)
    v.mul_(beta).addcmul_(g, g, value=1.0 - beta)
    if p is None:
        return None
    denominator = v + eps
    alpha = 1.0 - (1.0 - beta) * g.square() / denominator  # = β v_old / v_new up to ε
    p.mul_(alpha).add_((1.0 - beta) * m.square() / denominator)
    return alpha


def alignment_weight(
    m: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, variant: str, eps: float
) -> torch.Tensor | float:
    """γ, the share of Δ removed this step: the probability that the true gradient has Δ's sign (descent then
    shrinks the offset), ≈ Φ(sign(Δ) m / σ); a constant or the bare sign agreement for the ablations."""
    if variant == "constant_gamma":
        return 0.5
    if variant == "constant_gamma_one":
        return 1.0
    agreement = torch.sign(m * delta)  # sign(0) = 0: γ = ½ where m or Δ vanishes
    if variant == "hard_gamma":
        return 0.5 * (1.0 + agreement)
    variance = (v - m.square()).clamp_min(0.0)
    return 0.5 + 0.5 * torch.erf(m.abs() / torch.sqrt(2.0 * variance + eps)) * agreement


class PFLAlignStep(torch.optim.Optimizer):
    """θ ← θ − η P⊙g − γ⊙Δ/T on the trainable parameters, after updating m, v and P with the step's gradient.

    ``m``, ``v``, ``p`` and ``delta`` are flat over ``params`` (in their order) and updated in place (pass copies);
    None where the variant has no such tensor (P ≡ 1, Δ ≡ 0; ``sgd`` needs none). A tensor without a gradient in a
    step is skipped entirely, correction included. ``p_max`` is the largest P coordinate seen (a 0-d tensor).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        *,
        lr: float,
        steps: int,
        variant: str = "full",
        beta: float = 0.9,
        eps: float = 1e-12,
        m: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        p: torch.Tensor | None = None,
        delta: torch.Tensor | None = None,
    ) -> None:
        parameters = list(params)
        super().__init__(parameters, {"lr": lr})
        self.parameters = parameters
        self.offsets = list(accumulate((q.numel() for q in parameters), initial=0))
        self.lr, self.steps, self.variant, self.beta, self.eps = lr, max(1, int(steps)), variant, beta, eps
        rules = VariantRules.of(variant)
        if rules.moments and (m is None or v is None):
            raise ValueError(f"variant {variant!r} needs m and v")
        if rules.preconditioner and p is None:
            raise ValueError(f"variant {variant!r} needs P")
        for name, vector in (("m", m), ("v", v), ("P", p), ("delta", delta)):
            if vector is not None and vector.shape != (self.offsets[-1],):
                raise ValueError(f"{name} has shape {tuple(vector.shape)}, expected ({self.offsets[-1]},)")
        self.m = m if rules.moments else None
        self.v = v if rules.moments else None
        self.p = p if rules.preconditioner else None
        self.delta = delta if rules.correction else None
        reference = parameters[0] if parameters else torch.zeros((), device="cpu")
        self.p_max = torch.zeros((), dtype=reference.dtype, device=reference.device)

    def runs(self) -> list[tuple[int, list[int]]]:
        """Consecutive parameters that have a gradient this step, as (flat start, parameter indices) runs: one run
        over everything when every tensor has a gradient."""
        runs: list[tuple[int, list[int]]] = []
        for i, q in enumerate(self.parameters):
            if q.grad is None:
                continue
            if runs and runs[-1][1][-1] == i - 1:
                runs[-1][1].append(i)
            else:
                runs.append((self.offsets[i], [i]))
        return runs

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        if self.m is None:  # sgd: P ≡ 1, Δ ≡ 0, the run's plain SGD step
            for q in self.parameters:
                if q.grad is not None:
                    q.add_(q.grad, alpha=-self.lr)
            return loss
        assert self.v is not None
        for start, indices in self.runs():
            end = self.offsets[indices[-1] + 1]
            pieces = [grad.reshape(-1) for i in indices if (grad := self.parameters[i].grad) is not None]
            g = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            m, v = self.m[start:end], self.v[start:end]  # views: updates land in the flat state
            p = None if self.p is None else self.p[start:end]
            update_moments(g, m, v, p, beta=self.beta, eps=self.eps)
            direction = g if p is None else p * g
            if p is not None:
                self.p_max = torch.maximum(self.p_max, p.max())
            correction = None
            if self.delta is not None:
                delta = self.delta[start:end]
                correction = alignment_weight(m, v, delta, self.variant, self.eps) * delta
            for i in indices:
                q = self.parameters[i]
                a, b = self.offsets[i] - start, self.offsets[i + 1] - start
                q.add_(direction[a:b].view_as(q), alpha=-self.lr)
                if correction is not None:
                    q.add_(correction[a:b].view_as(q), alpha=-1.0 / self.steps)
        return loss


def flat(params: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The named tensors as one flat vector, in ``names`` order."""
    return torch.cat([params[name].detach().reshape(-1) for name in names])


def unflat(vector: torch.Tensor, shapes: Mapping[str, torch.Size]) -> Tensors:
    """Views of a flat vector shaped as ``shapes`` (in their order)."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    parts = vector.split(sizes)
    return {name: part.view(shape) for (name, shape), part in zip(shapes.items(), parts, strict=True)}


@register_algorithm
class PFLAlign(FedAvg):
    name = "pflalign"
    streamed_reply = ("params", "num_samples")
    batched_training = False  # its own preconditioned step
    description = "preconditioned local steps from a personal start, offsets aligned with gradients (Kim and Lee, 2026)"
    Hyperparameters: ClassVar[type] = PFLAlignHyperparameters
    personalized_is_global = False

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if not 0.0 <= hp.beta < 1.0:
            raise ConfigError(f"algorithm.beta must lie in [0, 1), got {hp.beta}")
        if hp.eps <= 0:
            raise ConfigError(f"algorithm.eps must be > 0, got {hp.eps}")
        if hp.lr_scale <= 0:
            raise ConfigError(f"algorithm.lr_scale must be > 0, got {hp.lr_scale}")
        train = setup.train
        if train.optimizer != "sgd" or train.momentum != 0 or train.weight_decay != 0 or train.grad_clip != 0:
            raise ConfigError(
                "pflalign takes its own step in place of train.optimizer: use train.optimizer = 'sgd' with "
                "momentum = 0, weight_decay = 0 and grad_clip = 0 (its preconditioner reads the raw gradient; got "
                f"{train.optimizer!r}, {train.momentum}, {train.weight_decay}, {train.grad_clip})"
            )
        super().__init__(hp, setup)
        self.rules = VariantRules.of(hp.variant)

    @property
    def keeps_local_model(self) -> bool:
        return self.hp.personal_model == "post_local"

    # ---- client
    def planned_steps(self, client: ClientView) -> int:
        """T, fixed before training: the steps the pass will take (``actual``: its batch walk counted, which
        shuffling does not change), or the reimplementation's ceil(n / B) * E (``formula``)."""
        n, settings = client.num_train, client.settings
        if self.hp.correction_steps == "formula":
            return math.ceil(n / settings.batch_size) * settings.epochs
        walk = batch_indices(
            n, settings.batch_size, torch.Generator(), epochs=1, shuffle=False, drop_last=self.hp.drop_last
        )
        return sum(1 for _ in walk) * settings.epochs

    def persistent_keys(self) -> list[str]:
        """The flat tensors a client keeps between rounds under this variant: v and P (and m when it is not reset
        each round), Δ; none for ``sgd``."""
        keys = ["m"] if self.rules.moments and not self.hp.reset_m_each_round else []
        keys += ["v"] if self.rules.moments else []
        keys += ["p"] if self.rules.preconditioner else []
        return keys + (["delta"] if self.rules.personal_offset else [])

    def carried(self, client: ClientView, state: ClientState, like: torch.Tensor) -> tuple[Tensors, bool]:
        """The persistent tensors this round starts from and whether they are fresh zeros (a new client, or one
        back from skipped rounds under ``stale_state = "reset"``); copies, as the step updates them in place."""
        stale = "round" in state and int(state["round"]) != client.round - 1
        if "round" not in state or (stale and self.hp.stale_state == "reset"):
            return {key: torch.zeros_like(like) for key in self.persistent_keys()}, True
        return {key: state[key].clone() for key in self.persistent_keys()}, False

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        hp = self.hp
        global_params: Tensors = payload["params"]
        shapes = {name: q.shape for name, q in client.trainer.module.named_parameters()}
        names = list(shapes)
        flat_global = flat(global_params, names)
        tensors, fresh = self.carried(client, state, flat_global)
        start = dict(global_params)
        if "delta" in tensors and not fresh:  # personalised start θ_g + Δ (Δ = 0 when fresh: θ_g itself)
            offset = unflat(tensors["delta"], shapes)
            start.update({name: global_params[name] + offset[name] for name in names})
        m = tensors.get("m")
        if m is None and self.rules.moments:  # reset every round
            m = torch.zeros_like(flat_global)
        steps = self.planned_steps(client)
        made: list[PFLAlignStep] = []

        def make(parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
            optimizer = PFLAlignStep(
                parameters,
                lr=hp.lr_scale * client.settings.lr,
                steps=steps,
                variant=hp.variant,
                beta=hp.beta,
                eps=hp.eps,
                m=m,
                v=tensors.get("v"),
                p=tensors.get("p"),
                delta=tensors.get("delta"),
            )
            made.append(optimizer)
            return optimizer

        result = client.fit(start, drop_last=hp.drop_last, optimizer_factory=make)
        if hp.correction_steps == "actual" and result.steps != steps:
            raise RuntimeError(f"pflalign planned T = {steps} steps but the pass took {result.steps}")
        new_state: ClientState = {key: tensors[key] for key in ("v", "p") if key in tensors}
        if self.rules.personal_offset:  # against the global model received this round, not the next aggregate
            new_state["delta"] = flat(result.params, names) - flat_global
        if not hp.reset_m_each_round and m is not None:
            new_state["m"] = m
        if self.rules.preconditioner:
            new_state["p_max"] = made[0].p_max
        if self.keeps_local_model:
            new_state["params"] = result.params
        new_state["round"] = client.round
        return new_state, {"params": result.params, "num_samples": client.num_train}

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        """θ_end of the client's latest round (``post_local``), or the start of its next round θ_g + Δ
        (``next_init``); the global model for a client that has not trained yet."""
        if self.hp.personal_model == "post_local":
            return state["params"] if "params" in state else payload["params"]
        if "delta" not in state:
            return payload["params"]
        shapes = {name: q.shape for name, q in client.trainer.module.named_parameters()}
        offset = unflat(state["delta"], shapes)
        return {**payload["params"], **{name: payload["params"][name] + offset[name] for name in shapes}}

    def client_diagnostics(self, state: ClientState) -> dict[str, float]:
        """The largest preconditioner coordinate of the client's latest round (P may exceed 1, up to 1 + β)."""
        return {"p_max": float(state["p_max"])} if "p_max" in state else {}
