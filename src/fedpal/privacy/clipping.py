"""Clipping of client updates, the client transform that bounds each client's influence (its L2 sensitivity).

- Joint L2 clipping: a client's update Δ is every floating-point tensor it sends, minus the reference it started
  from (the round's broadcast), taken as one vector over all keys; Δ ← Δ·min(1, C/‖Δ‖). An update with ‖Δ‖ ≤ C
  passes untouched, bit for bit. Integer tensors (counters such as BatchNorm's ``num_batches_tracked``) are not
  part of the norm and pass unchanged: they carry no private gradient signal here, and a pipeline under DP must
  not average them as if they were private. Arithmetic is in float64; tensors return in their own dtype and device.
- Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping", 2021, as Flower's
  ``DifferentialPrivacyServerSideAdaptiveClipping``): each client reports the bit ‖Δ_i‖ ≤ C; the server noises the
  count of set bits with N(0, σ_b²), b̄ = noised count / m, and moves C geometrically toward the target quantile q:
  C ← C·exp(−lr·(b̄ − q)). Flower's defaults: initial C 0.1, q 0.5, lr 0.2, σ_b = m/20 (m the clients per round).
  The count is a second private release, so the update's noise multiplier drops to
  z_eff = (z⁻² − (2σ_b)⁻²)^(−1/2) for the same privacy; z ≥ 2σ_b leaves no budget for it and is refused.
  The noise added to a round's sum must use the C that clipped that round (the value before ``update``).
- Prototype payloads ({str(class): vector}) are statistics, not updates: each class vector is clipped to C on its
  own. A client reporting k classes then moves the per-class sums by at most C·√k jointly
  (``prototype_sensitivity``), which is the L2 sensitivity the noise must be calibrated to for user-level DP.

Each clipping over a round returns a ``ClipReport`` (fraction clipped, mean norm before clipping) to log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError, UserError

# Float32 parameters cannot hold ref + Δ·s exactly; the received delta is re-measured and shrunk this many times at
# most (each step removes the rounding excess; one step is almost always enough).
_MAX_REFINEMENTS = 8


@dataclass(frozen=True)
class ClipReport:
    """Per-round figures of a clipping step (pfl-research reports the same two)."""

    clip_norm: float
    fraction_clipped: float  # share of the clipped values whose norm exceeded the bound
    mean_norm: float  # mean L2 norm before clipping
    count: int  # how many values (updates, or class vectors) were measured


def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _check_bound(clip_norm: float) -> None:
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ConfigError(f"the clipping bound must be a positive finite number, got {clip_norm}")


def update_norm(update: Tensors) -> float:
    """The joint L2 norm of all floating-point tensors of ``update`` as one vector (float64)."""
    total = 0.0
    for key in sorted(update):
        t = update[key]
        if _floating(t):
            total += float(t.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def clip_update(update: Tensors, clip_norm: float) -> tuple[Tensors, float]:
    """Δ·min(1, C/‖Δ‖) jointly over the floating-point tensors, and ‖Δ‖ before clipping.

    Inside the bound the tensors come back unchanged (the same values, cloned)."""
    _check_bound(clip_norm)
    norm = update_norm(update)
    if norm <= clip_norm:
        return {k: v.detach().clone() for k, v in update.items()}, norm
    scale = clip_norm / norm
    return {
        k: (v.detach().to(torch.float64) * scale).to(v.dtype) if _floating(v) else v.detach().clone()
        for k, v in update.items()
    }, norm


def _delta64(params: Tensors, reference: Tensors) -> dict[str, torch.Tensor]:
    if params.keys() != reference.keys():
        raise ValueError("clipping: a reply and its reference must hold the same tensors")
    return {
        k: params[k].detach().to(torch.float64) - reference[k].detach().to(torch.float64)
        for k in sorted(params)
        if _floating(params[k])
    }


def clip_reply(params: Tensors, clip_norm: float, reference: Tensors | None = None) -> tuple[Tensors, float]:
    """Clip a reply's update from ``reference`` (None: the values themselves) and return the reply to send on.

    Returns (reference + Δ·min(1, C/‖Δ‖), ‖Δ‖ before clipping). Inside the bound the reply is untouched, bit for
    bit. Outside, the result is rebuilt in each tensor's dtype; as float32 cannot hold ref + Δ·s exactly, the
    delta the server will measure is re-measured and shrunk until it lies within C as well (up to the rounding of
    parameters much larger than C itself)."""
    if reference is None:
        return clip_update(params, clip_norm)
    _check_bound(clip_norm)
    delta = _delta64(params, reference)
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
    if norm <= clip_norm:
        return {k: v.detach().clone() for k, v in params.items()}, norm
    scale = clip_norm / norm
    out: Tensors = {}
    for _ in range(_MAX_REFINEMENTS):
        out = {
            k: (reference[k].detach().to(torch.float64) + delta[k] * scale).to(v.dtype)
            if k in delta
            else v.detach().clone()
            for k, v in params.items()
        }
        received = update_norm(_delta64(out, reference))
        if received <= clip_norm:
            break
        scale *= clip_norm / received * (1.0 - 1e-9)
    return out, norm


def report(norms: Sequence[float], clip_norm: float) -> ClipReport:
    """Fraction of ``norms`` above ``clip_norm`` and their mean (NaN for none)."""
    count = len(norms)
    if count == 0:
        return ClipReport(clip_norm, float("nan"), float("nan"), 0)
    clipped = sum(1 for n in norms if n > clip_norm)
    return ClipReport(clip_norm, clipped / count, math.fsum(norms) / count, count)


def clip_replies(
    parts: Mapping[int, Tensors], clip_norm: float, reference: Tensors | None = None
) -> tuple[dict[int, Tensors], ClipReport]:
    """``clip_reply`` for every client of a round (ascending id) and the round's report."""
    clipped: dict[int, Tensors] = {}
    norms: list[float] = []
    for cid in sorted(parts):
        clipped[cid], norm = clip_reply(parts[cid], clip_norm, reference)
        norms.append(norm)
    return clipped, report(norms, clip_norm)


# ------------------------------------------------------------------------------------------------- prototypes


def clip_prototypes(
    prototypes: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Each class vector clipped to norm ≤ C on its own; returns the vectors and their norms before clipping."""
    out: dict[str, torch.Tensor] = {}
    norms: list[float] = []
    for cls in sorted(prototypes, key=_class_order):
        clipped, norm = clip_update({"v": prototypes[cls]}, clip_norm)
        out[cls] = clipped["v"]
        norms.append(norm)
    return out, norms


def clip_prototype_replies(
    parts: Mapping[int, Mapping[str, torch.Tensor]], clip_norm: float
) -> tuple[dict[int, dict[str, torch.Tensor]], ClipReport]:
    """``clip_prototypes`` for every client; the report counts class vectors, not clients."""
    clipped: dict[int, dict[str, torch.Tensor]] = {}
    norms: list[float] = []
    for cid in sorted(parts):
        clipped[cid], client_norms = clip_prototypes(parts[cid], clip_norm)
        norms.extend(client_norms)
    return clipped, report(norms, clip_norm)


def prototype_sensitivity(clip_norm: float, max_classes: int) -> float:
    """The joint L2 sensitivity C·√k of per-class sums when a client reports at most k class vectors."""
    _check_bound(clip_norm)
    if max_classes < 1:
        raise ValueError("a client reports at least one class")
    return clip_norm * math.sqrt(max_classes)


def _class_order(cls: str) -> tuple[int, str]:
    return (int(cls), cls) if cls.lstrip("-").isdigit() else (0, cls)


# ------------------------------------------------------------------------------------------- adaptive clipping


def default_count_stddev(cohort_size: int) -> float:
    """Flower's σ_b = m/20 for m clients per round."""
    if cohort_size < 1:
        raise ValueError("a round has at least one client")
    return cohort_size / 20.0


def effective_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_eff = (z⁻² − (2σ_b)⁻²)^(−1/2): the update's multiplier once the clipped-count release takes its share.

    z = 0 (no noise) stays 0. z ≥ 2σ_b is refused: the count alone would spend the whole budget."""
    if noise_multiplier < 0 or count_stddev <= 0:
        raise ConfigError("the noise multiplier must be ≥ 0 and the clipped-count noise σ_b > 0")
    if noise_multiplier == 0:
        return 0.0
    if noise_multiplier >= 2 * count_stddev:
        raise UserError(
            f"adaptive clipping needs noise_multiplier < 2·sigma_b, got z = {noise_multiplier:g} ≥ "
            f"2·{count_stddev:g}: raise sigma_b (default m/20) or lower z"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


class AdaptiveClipping:
    """The clipping bound C, moved each round toward the ``target_quantile`` of the clients' update norms.

    ``count_stddev`` is σ_b (None: m/20 for ``cohort_size`` m, Flower's default). The noise on the count is drawn
    from the generator the caller seeds for the round. ``state_dict`` holds C, so a resumed run continues the
    same sequence of bounds."""

    def __init__(
        self,
        cohort_size: int,
        *,
        initial_clip_norm: float = 0.1,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        count_stddev: float | None = None,
    ) -> None:
        _check_bound(initial_clip_norm)
        if not 0.0 <= target_quantile <= 1.0:
            raise ConfigError(f"the target quantile must lie in [0, 1], got {target_quantile}")
        if learning_rate <= 0:
            raise ConfigError(f"the clipping learning rate must be positive, got {learning_rate}")
        self.clip_norm = float(initial_clip_norm)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_stddev = default_count_stddev(cohort_size) if count_stddev is None else float(count_stddev)
        if self.count_stddev < 0:
            raise ConfigError("sigma_b must be ≥ 0")

    def noised_fraction_unclipped(self, norms: Sequence[float], generator: torch.Generator | None) -> float:
        """b̄ = (#{‖Δ_i‖ ≤ C} + N(0, σ_b²)) / m, with the current C."""
        if not norms:
            raise ValueError("adaptive clipping needs the norms of at least one client")
        count = float(sum(1 for n in norms if n <= self.clip_norm))
        if self.count_stddev > 0:
            if generator is None:
                raise ValueError("a noised count needs a seeded generator")
            count += self.count_stddev * float(torch.randn((), generator=generator, dtype=torch.float64))
        return count / len(norms)

    def update(self, norms: Sequence[float], generator: torch.Generator | None = None) -> float:
        """One geometric step C ← C·exp(−lr·(b̄ − q)) from this round's norms (before clipping); returns the new C."""
        fraction = self.noised_fraction_unclipped(norms, generator)
        self.clip_norm *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.clip_norm

    def state_dict(self) -> dict[str, float]:
        return {"clip_norm": self.clip_norm}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.clip_norm = float(state["clip_norm"])
