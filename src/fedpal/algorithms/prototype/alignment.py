"""ProtoNorm's server-side Prototype Alignment (PA): Thomson-type repulsion of class prototypes on the unit sphere.

The aggregated class prototypes are normalised, then pushed apart by the pairwise force of a repulsive energy
with heavy-ball momentum; after every step each row is projected back onto the sphere (the velocity is not
projected). The loop follows ProtoNorm's official server (regulationLee/ProtoNorm,
``system/flcore/servers/serverprotonorm.py``, ``optimize_proto``), in this order for t = 0, 1, ..., steps-1:

1. F = force at the current points (d²_ij with +1e-6 on the diagonal, weights 1/(d²+1e-10), diagonal weight 0);
2. v <- momentum * v + lr * F;  x <- x + v;  x_i <- x_i / ||x_i||;
3. if t % decay_every == 0: lr <- decay * lr   (so the first step uses the undecayed lr);
4. early stop (official rule): at t == early_stop the value m_t = mean_i ||F_i||, rounded to 4 decimals, is
   recorded; for every later t the rounded m_t is compared with the previous one: equal -> a counter goes up,
   different -> the counter is reset to 0; when the counter reaches ``patience`` (10, hard-coded in the official
   code) the loop breaks after that iteration's update. The earliest stop is therefore t = early_stop + patience
   (t = 20 with the defaults), i.e. 21 updates applied.

``AlignmentResult.iterations`` counts the updates actually applied (t_stop + 1 on an early stop, ``steps``
otherwise); the official code returns the loop index, which is one less. ``final_force`` is m_t (unrounded) of the
last iteration run, i.e. the mean force norm at the configuration that iteration started from. At a converged
configuration this is not 0: the log-energy force of the regular simplex is radial with norm (C-1)/2.

Everything runs in float64 on the input's device; the result has the input's dtype when that is a floating dtype
(float32 otherwise). Cost per iteration is O(C^2 D) with no [C, C, D] intermediate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ENERGIES = ("log", "coulomb")
DIAGONAL_EPS = 1e-6  # added to d²_ii so the diagonal never divides by zero (its weight is zeroed anyway)
DISTANCE_EPS = 1e-10  # added to every d²_ij inside the force weights (and inside the energy, so they match)


@dataclass(frozen=True)
class AlignmentResult:
    """Outcome of :func:`align_prototypes`."""

    prototypes: torch.Tensor  # [C, D] unit rows
    iterations: int  # updates actually applied (early stop -> fewer than ``steps``)
    final_force: float  # mean_i ||F_i|| measured in the last iteration run


def _check_energy(energy: str) -> None:
    if energy not in ENERGIES:
        raise ValueError(f"unknown PA energy {energy!r}; expected one of {ENERGIES}")


def _check_matrix(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what} must be a [C, D] matrix, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} must have at least one row and one column, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains non-finite values")


def _unit_rows(x: torch.Tensor, what: str) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if bool((norms == 0).any()):
        bad = torch.nonzero(norms.squeeze(1) == 0).flatten().tolist()
        raise ValueError(f"{what} has zero-norm rows {bad}; they have no direction to align")
    return x / norms


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    """d²_ij = ||x_i - x_j||² (0 exactly on i = j, then +DIAGONAL_EPS there), via the Gram matrix.

    In float64 the Gram form agrees with explicit differences to ~1e-15 and avoids a [C, C, D] tensor (16x faster
    at C = 100, D = 512).
    """
    sq = x.square().sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.T)).clamp_min(0.0)
    d2 = d2.fill_diagonal_(0.0)
    return d2 + DIAGONAL_EPS * torch.eye(x.shape[0], dtype=x.dtype, device=x.device)


def pairwise_force(x: torch.Tensor, energy: str = "log") -> torch.Tensor:
    """F_i = sum_{j != i} w_ij (x_i - x_j) for the rows of ``x`` [C, D].

    ``"log"``: w_ij = 1 / (d²_ij + 1e-10), the negative gradient of the logarithmic energy (official ProtoNorm);
    ``"coulomb"``: w_ij = 1 / (d²_ij + 1e-10)^1.5, the negative gradient of the Coulomb energy sum 1/||x_i - x_j||.
    The force lives in the ambient space (it is not projected onto the sphere's tangent plane).
    """
    _check_energy(energy)
    if x.dim() != 2:
        raise ValueError(f"x must be a [C, D] matrix, got shape {tuple(x.shape)}")
    shifted = _squared_distances(x) + DISTANCE_EPS
    weights = shifted.reciprocal() if energy == "log" else shifted.pow(-1.5)
    weights = weights * (1 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device))
    # sum_j w_ij (x_i - x_j) = x_i * sum_j w_ij - (W x)_i
    return x * weights.sum(dim=1, keepdim=True) - weights @ x


def prototype_energy(x: torch.Tensor, energy: str = "log") -> torch.Tensor:
    """The scalar energy whose negative gradient (w.r.t. ``x``) is :func:`pairwise_force`, summed over i < j.

    ``"log"``: -sum log sqrt(d²_ij + 1e-10);  ``"coulomb"``: sum (d²_ij + 1e-10)^(-1/2). Differentiable everywhere
    (built from explicit differences, no square root of d² itself).
    """
    _check_energy(energy)
    if x.dim() != 2:
        raise ValueError(f"x must be a [C, D] matrix, got shape {tuple(x.shape)}")
    rows, cols = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    shifted = (x[rows] - x[cols]).square().sum(dim=1) + DISTANCE_EPS
    if energy == "log":
        return -0.5 * torch.log(shifted).sum()
    return shifted.rsqrt().sum()


def align_prototypes(
    prototypes: torch.Tensor,
    *,
    steps: int = 500,
    lr: float = 0.1,
    momentum: float = 0.9,
    energy: str = "log",
    early_stop: int | None = 10,
    decay_every: int = 10,
    decay: float = 0.95,
    patience: int = 10,
) -> AlignmentResult:
    """Run PA on the class prototypes ``prototypes`` [C, D] (raw means; rows are normalised first).

    ``early_stop`` is the iteration from which the rounded mean force norm is tracked (``None``: run all
    ``steps``); ``patience`` is the number of consecutive unchanged values that stops the loop (10 in the official
    code, where it is not an argument). Raises ``ValueError`` for zero-norm or non-finite rows.
    """
    _check_energy(energy)
    _check_matrix(prototypes, "prototypes")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if decay_every < 1:
        raise ValueError(f"decay_every must be >= 1, got {decay_every}")
    if early_stop is not None and early_stop < 0:
        raise ValueError(f"early_stop must be >= 0 or None, got {early_stop}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    out_dtype = prototypes.dtype if prototypes.is_floating_point() else torch.float32

    x = _unit_rows(prototypes.detach().to(torch.float64), "prototypes")
    velocity = torch.zeros_like(x)
    step_lr = lr
    iterations = 0
    tracked: float | None = None
    unchanged = 0
    force_norm = torch.linalg.vector_norm(pairwise_force(x, energy), dim=1).mean() if steps == 0 else None

    for t in range(steps):
        force = pairwise_force(x, energy)
        velocity = momentum * velocity + step_lr * force
        x = x + velocity
        x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
        iterations = t + 1
        if t % decay_every == 0:
            step_lr *= decay
        force_norm = torch.linalg.vector_norm(force, dim=1).mean()
        if early_stop is None or t < early_stop:
            continue
        rounded = round(float(force_norm), 4)
        if t > early_stop and rounded == tracked:
            unchanged += 1
        else:
            unchanged = 0
        tracked = rounded
        if unchanged == patience:
            break

    assert force_norm is not None
    return AlignmentResult(prototypes=x.to(out_dtype), iterations=iterations, final_force=float(force_norm))


def pairwise_cosine_stats(prototypes: torch.Tensor) -> dict[str, float]:
    """Separation diagnostics of the rows of ``prototypes`` [C, D].

    Keys: ``cos_min``, ``cos_mean``, ``cos_max`` over the C(C-1)/2 pairs; ``angle_min_deg``, ``angle_mean_deg``
    (pairwise angles in degrees); ``norm_mean`` (mean row norm). With C < 2 the pairwise entries are NaN.
    Raises ``ValueError`` for zero-norm or non-finite rows.
    """
    _check_matrix(prototypes, "prototypes")
    x = prototypes.detach().to(torch.float64)
    norm_mean = float(torch.linalg.vector_norm(x, dim=1).mean())
    unit = _unit_rows(x, "prototypes")
    c = unit.shape[0]
    if c < 2:
        nan = math.nan
        return {
            "cos_min": nan,
            "cos_mean": nan,
            "cos_max": nan,
            "angle_min_deg": nan,
            "angle_mean_deg": nan,
            "norm_mean": norm_mean,
        }
    rows, cols = torch.triu_indices(c, c, offset=1, device=unit.device)
    cos = (unit[rows] * unit[cols]).sum(dim=1).clamp(-1.0, 1.0)
    angles = torch.rad2deg(torch.arccos(cos))
    return {
        "cos_min": float(cos.min()),
        "cos_mean": float(cos.mean()),
        "cos_max": float(cos.max()),
        "angle_min_deg": float(angles.min()),
        "angle_mean_deg": float(angles.mean()),
        "norm_mean": norm_mean,
    }


@dataclass(frozen=True)
class AlignmentSettings:
    """PA's settings as a method's hyperparameters name them (``pa_steps``, ``pa_lr``, ...): ProtoNorm's, and
    FedProto's under ``inference_prototypes = "pa"``, so both run the same server computation."""

    steps: int = 500
    lr: float = 0.1
    momentum: float = 0.9
    energy: str = "log"
    early_stop: int = 10  # 0 = run all ``steps``
    decay_every: int = 10
    decay: float = 0.95

    @classmethod
    def of(cls, hp: object) -> AlignmentSettings:
        """The settings from a hyperparameter object's ``pa_*`` fields."""
        names = ("steps", "lr", "momentum", "energy", "early_stop", "decay_every", "decay")
        return cls(**{name: getattr(hp, f"pa_{name}") for name in names})


def present_directions(mean: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The present rows of ``mean`` [C, D], where PA starts from (it normalises them). A present class whose
    average is all zeros (dead ReLUs) has no direction: it starts from its own axis (class index mod D) instead."""
    rows = mean[present]
    dead = rows.norm(dim=1) < 1e-12
    if bool(dead.any()):
        dim = mean.shape[1]
        axes = torch.nn.functional.one_hot(torch.nonzero(present).flatten() % dim, dim).to(rows.dtype)
        rows = torch.where(dead.unsqueeze(1), axes, rows)
    return rows


def align_class_prototypes(
    mean: torch.Tensor, present: torch.Tensor, settings: AlignmentSettings
) -> tuple[torch.Tensor, int]:
    """ProtoNorm's server step on the averaged class prototypes ``mean`` [C, D]: PA of the present rows (unit rows
    in the result, the absent rows left as they are) and the number of PA updates applied."""
    out = mean.clone()
    if not bool(present.any()):
        return out, 0
    result = align_prototypes(
        present_directions(mean, present),
        steps=settings.steps,
        lr=settings.lr,
        momentum=settings.momentum,
        energy=settings.energy,
        early_stop=settings.early_stop or None,
        decay_every=settings.decay_every,
        decay=settings.decay,
    )
    out[present] = result.prototypes.to(out.dtype)
    return out, result.iterations
