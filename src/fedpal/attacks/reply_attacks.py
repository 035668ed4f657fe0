"""Attacks on the reply a malicious client sends: its model update, or its class prototypes.

Model attacks act on the update Δ = x − reference, the difference between the parameter set the client returns
and the one it started from (the round's broadcast), and return the parameter set reference + Δ' that the server
then receives. Only floating-point tensors are attacked; integer ones (counters) pass through unchanged. The
arithmetic is in float64 and each tensor is cast back to its dtype and device.

- ``sign_flip``: Δ' = −s·Δ (s = 1: the plain flip of FedML's byzantine attack).
- ``gaussian``: Δ' ~ N(0, σ²) elementwise, σ = 200 by default (an update unrelated to the data, as in the
  N(0, 200²) Byzantine baseline); ``noise="add"`` adds that noise to the honest Δ instead.
- ``scale``: Δ' = γ·Δ, model replacement (Bagdasaryan et al.: γ = n/η); with the server's rate η = 1 of a plain
  mean, γ = n, the number of clients whose replies the round reduces, is the default.
- ``alie``, "a little is enough" (Baruch et al.): Δ' = μ − z·σ per coordinate, μ and σ (unbiased) over the round's
  benign updates, z = Φ⁻¹((n − m − s)/(n − m)) with s = ⌊n/2 + 1⌋ − m supporters needed for a majority, n the
  clients in the round, m the malicious ones among them.
- ``ipm``, inner-product manipulation (Xie et al.): Δ' = −ε·mean(benign Δ), ε = 0.1.

ALIE and IPM are omniscient: they read the benign clients' updates of the same round, as the literature simulates
them. Randomness (the Gaussian attack, random prototypes) comes from one generator per reply, seeded with
``derive_seed(seed, round, client, "attack")``, drawn tensor by tensor in sorted name order.

Prototype payloads ({str(class): vector[D]}, see ``fedpal.algorithms.core.prototypes``) are statistics, not
updates from a reference, so their attack replaces each reported class vector:
- ``negate`` (default): −s·(mean of the benign clients' vectors of that class), or −s·own vector when no benign
  client reported the class. Under a per-class mean over k reporters, m of them malicious, the class mean becomes
  (k − m(1 + s))/k times the benign one: s > (k − m)/m flips it.
- ``random``: a uniformly random direction with s times the norm of the own vector, so a norm check sees nothing
  unusual and prototypes on the unit sphere (ProtoNorm, FedAli) stay on it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedpal.common.seeding import generator_for
from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError, UserError

ReplyAttackName = Literal["sign_flip", "gaussian", "scale", "alie", "ipm"]
PrototypeAttackMode = Literal["negate", "random"]
REPLY_ATTACKS: tuple[str, ...] = ("sign_flip", "gaussian", "scale", "alie", "ipm")
PROTOTYPE_ATTACKS: tuple[str, ...] = ("negate", "random")


@dataclass(frozen=True)
class ReplyAttack:
    """An attack on model updates and its settings (each used only by the attack it names)."""

    name: ReplyAttackName
    flip_scale: float = 1.0  # sign_flip: Δ' = −flip_scale·Δ
    sigma: float = 200.0  # gaussian: noise standard deviation
    noise: Literal["replace", "add"] = "replace"  # gaussian: replace Δ by the noise, or add it to Δ
    gamma: float | None = None  # scale: Δ' = γ·Δ; None = the number of clients in the round
    z: float | None = None  # alie: None = Φ⁻¹((n − m − s)/(n − m))
    epsilon: float = 0.1  # ipm

    def __post_init__(self) -> None:
        if self.name not in REPLY_ATTACKS:
            raise ConfigError(f"unknown reply attack '{self.name}'; choose one of {', '.join(REPLY_ATTACKS)}")
        if self.noise not in ("replace", "add"):
            raise ConfigError(f"gaussian attack noise must be 'replace' or 'add', got '{self.noise}'")
        if not self.sigma >= 0:
            raise ConfigError(f"gaussian attack sigma must be >= 0, got {self.sigma}")


@dataclass(frozen=True)
class PrototypeAttack:
    """An attack on prototype payloads: ``negate`` the benign class mean, or a ``random`` direction."""

    mode: PrototypeAttackMode = "negate"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in PROTOTYPE_ATTACKS:
            raise ConfigError(f"unknown prototype attack '{self.mode}'; choose one of {', '.join(PROTOTYPE_ATTACKS)}")


def attack_generator(seed: int, round: int, client: int) -> torch.Generator:
    """The one source of an attacking client's randomness in a round."""
    return generator_for(seed, round, client, "attack")


# ---- deltas


def _attacked_names(params: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(name for name, t in params.items() if t.is_floating_point())


def update_of(params: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> Tensors:
    """Δ = params − reference in float64, for the floating-point tensors."""
    if set(params) != set(reference):
        raise ValueError("an attacked reply must hold the same tensors as its reference")
    return {name: params[name].double() - reference[name].double() for name in _attacked_names(params)}


def _with_update(params: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], update: Tensors) -> Tensors:
    """reference + update for the attacked tensors, cast back; the others copied from ``params``."""
    out: Tensors = {}
    for name, t in params.items():
        if name in update:
            out[name] = (reference[name].double() + update[name].to(t.device)).to(t.dtype)
        else:
            out[name] = t.detach().clone()
    return out


def _benign_updates(
    benign: Sequence[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor]
) -> list[Tensors]:
    return [update_of(b, reference) for b in benign]


# ---- the attacks, each returning the parameter set the server receives


def sign_flip(params: Tensors, reference: Tensors, scale: float = 1.0) -> Tensors:
    """reference − scale·Δ."""
    return _with_update(params, reference, {k: -scale * d for k, d in update_of(params, reference).items()})


def gaussian(
    params: Tensors, reference: Tensors, generator: torch.Generator, sigma: float = 200.0, noise: str = "replace"
) -> Tensors:
    """reference + ε (``replace``) or reference + Δ + ε (``add``), ε ~ N(0, σ²) drawn on the CPU generator."""
    update = update_of(params, reference)
    out: Tensors = {}
    for name, d in update.items():
        draw = torch.randn(d.shape, generator=generator, dtype=torch.float64) * sigma
        out[name] = draw.to(d.device) if noise == "replace" else d + draw.to(d.device)
    return _with_update(params, reference, out)


def scale(params: Tensors, reference: Tensors, gamma: float) -> Tensors:
    """reference + γ·Δ (model replacement)."""
    return _with_update(params, reference, {k: gamma * d for k, d in update_of(params, reference).items()})


def alie_z(num_clients: int, num_malicious: int) -> float:
    """z = Φ⁻¹((n − m − s)/(n − m)), s = ⌊n/2 + 1⌋ − m: the largest shift that keeps the crafted update closer to
    the benign mean than s benign updates are (so a majority-based rule still accepts it)."""
    n, m = num_clients, num_malicious
    if not 0 < m < n:
        raise ValueError(f"ALIE needs 0 < malicious < clients, got m={m}, n={n}")
    supporters = math.floor(n / 2 + 1) - m
    p = (n - m - supporters) / (n - m)
    if not 0.0 < p < 1.0:
        raise UserError(
            f"ALIE's z is undefined for n={n} clients with m={m} malicious ((n-m-s)/(n-m) = {p:.3g}); set z explicitly"
        )
    return statistics.NormalDist().inv_cdf(p)


def alie(
    params: Tensors,
    reference: Tensors,
    benign: Sequence[Tensors],
    num_clients: int,
    num_malicious: int,
    z: float | None,
) -> Tensors:
    """reference + μ − z·σ, per coordinate over the benign updates (σ with Bessel's correction)."""
    if len(benign) < 2:
        raise UserError(f"ALIE needs the updates of at least 2 benign clients in the round, got {len(benign)}")
    z_value = alie_z(num_clients, num_malicious) if z is None else z
    updates = _benign_updates(benign, reference)
    crafted = {}
    for name in update_of(params, reference):
        stacked = torch.stack([u[name] for u in updates])
        crafted[name] = stacked.mean(0) - z_value * stacked.std(0, correction=1)
    return _with_update(params, reference, crafted)


def ipm(params: Tensors, reference: Tensors, benign: Sequence[Tensors], epsilon: float = 0.1) -> Tensors:
    """reference − ε·mean(benign Δ)."""
    if not benign:
        raise UserError("IPM needs the update of at least 1 benign client in the round")
    updates = _benign_updates(benign, reference)
    crafted = {
        name: -epsilon * torch.stack([u[name] for u in updates]).mean(0) for name in update_of(params, reference)
    }
    return _with_update(params, reference, crafted)


def attack_update(
    attack: ReplyAttack,
    params: Tensors,
    reference: Tensors,
    *,
    benign: Sequence[Tensors],
    num_clients: int,
    num_malicious: int,
    seed: int,
    round: int,
    client: int,
) -> Tensors:
    """The parameter set malicious ``client`` sends in ``round`` instead of ``params``.

    ``benign``: the parameter sets the round's benign clients return (ALIE, IPM); ``num_clients``: the clients
    whose replies the round reduces (n), ``num_malicious``: the malicious ones among them (m).
    """
    if attack.name == "sign_flip":
        return sign_flip(params, reference, attack.flip_scale)
    if attack.name == "gaussian":
        return gaussian(params, reference, attack_generator(seed, round, client), attack.sigma, attack.noise)
    if attack.name == "scale":
        return scale(params, reference, float(num_clients) if attack.gamma is None else attack.gamma)
    if attack.name == "alie":
        return alie(params, reference, benign, num_clients, num_malicious, attack.z)
    return ipm(params, reference, benign, attack.epsilon)


# ---- prototypes


def _class_order(protos: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(protos, key=int)


def poison_prototypes(
    attack: PrototypeAttack,
    own: Mapping[str, torch.Tensor],
    benign: Sequence[Mapping[str, torch.Tensor]],
    *,
    seed: int,
    round: int,
    client: int,
) -> dict[str, torch.Tensor]:
    """The prototypes malicious ``client`` sends in ``round``: each class it reports, replaced (see module doc).

    ``benign``: the prototype dicts of the round's benign clients (used by ``negate``).
    """
    out: dict[str, torch.Tensor] = {}
    generator = attack_generator(seed, round, client) if attack.mode == "random" else None
    for key in _class_order(own):
        vector = own[key]
        if generator is not None:
            direction = torch.randn(vector.shape, generator=generator, dtype=torch.float64)
            norm = direction.norm()
            while norm == 0:  # probability zero; keeps the division safe
                direction = torch.randn(vector.shape, generator=generator, dtype=torch.float64)
                norm = direction.norm()
            poisoned = attack.scale * vector.double().norm() * direction.to(vector.device) / norm.to(vector.device)
        else:
            reporters = [b[key].double() for b in benign if key in b]
            anchor = torch.stack(reporters).mean(0).to(vector.device) if reporters else vector.double()
            poisoned = -attack.scale * anchor
        out[key] = poisoned.to(vector.dtype)
    return out
