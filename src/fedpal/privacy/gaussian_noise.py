"""Gaussian noise on the sum of clipped client updates: the server's half of DP-FedAvg (McMahan et al. 2018).

The sum of m updates, each clipped to L2 norm C, changes by at most C when one client's data change (user-level
sensitivity); adding N(0, (z·C)²) to every coordinate of the sum gives the sampled Gaussian mechanism that the
accountant composes over rounds. On the mean over m clients that is std z·C/m (Flower's ``add_gaussian_noise``).

``noise_cohort_size`` M (pfl-research): simulate the noise of a deployment with M clients per round while training
with m ≤ M. The noise on the sum is scaled by m/M, so the mean carries std z·C/M, as a cohort of M would; the
accountant must then be told M clients per round (``accounted_cohort_size``). Results stand for a real deployment
of M clients per round, not for the m simulated ones.

Noise is drawn on the CPU in float64 from the generator the caller seeds (e.g. ``generator_for(seed, round,
"dp-noise")``), tensor by tensor in sorted name order, so it is the same under every executor and device.

Prototype class counts, when they travel with prototypes, are private too: ``withhold_counts`` replaces a client's
counts by presence (0/1), so the server weighs clients uniformly per class; or each client clips its count vector
(``clipping.clip_update`` on it) and the server adds noise to the summed counts (``noise_counts``).

Prototype payloads themselves (``noised_prototype_mean``): per class, the sum of the holders' prototypes (each
clipped to C) and the number of holders are released with Gaussian noise, and the server divides. One client moves
the K class sums by at most C·√K and the K holder counts by at most √K; with the counts scaled by C, the pair has
L2 sensitivity C·√(2K), and noise of std z·C·√(2K) on every coordinate (z·√(2K) on a count) makes it one more
Gaussian mechanism of multiplier z per round for the accountant. K is the number of classes (a client may hold
them all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError

CountPolicy = Literal["withhold", "noise"]
COUNT_POLICIES: tuple[str, ...] = ("withhold", "noise")


@dataclass(frozen=True)
class NoiseReport:
    """What one noised reduction added: std on the sum and on the mean, and the cohort it stands for."""

    std_on_sum: float
    std_on_mean: float
    cohort_size: int  # clients summed
    accounted_cohort_size: int  # clients per round the accountant must assume (M when noise_cohort_size is set)


def noise_stddev(
    noise_multiplier: float, clip_norm: float, *, cohort_size: int | None = None, noise_cohort_size: int | None = None
) -> float:
    """The std of the noise on the sum: z·C, times m/M when a noise cohort M stands in for the m clients."""
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ConfigError(f"the noise multiplier must be a finite number ≥ 0, got {noise_multiplier}")
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ConfigError(f"the clipping bound must be a positive finite number, got {clip_norm}")
    std = noise_multiplier * clip_norm
    if noise_cohort_size is None:
        return std
    if cohort_size is None or cohort_size < 1:
        raise ValueError("noise_cohort_size needs the number of clients actually summed")
    if noise_cohort_size < cohort_size:
        raise ConfigError(
            f"noise_cohort_size ({noise_cohort_size}) must be at least the clients per round ({cohort_size})"
        )
    return std * cohort_size / noise_cohort_size


def accounted_cohort_size(cohort_size: int, noise_cohort_size: int | None = None) -> int:
    """The clients per round the accountant assumes: M with a noise cohort (pfl-research's max(m, M)), else m."""
    return cohort_size if noise_cohort_size is None else max(cohort_size, noise_cohort_size)


def add_gaussian_noise(values: Tensors, stddev: float, generator: torch.Generator) -> Tensors:
    """values + N(0, stddev²) on every coordinate of every floating-point tensor (integers pass unchanged)."""
    if stddev < 0:
        raise ValueError("a noise std is ≥ 0")
    out: Tensors = {}
    for key in sorted(values):
        value = values[key]
        if not value.is_floating_point():
            out[key] = value.detach().clone()
            continue
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * stddev
        out[key] = (value.detach().to(torch.float64) + noise.to(value.device)).to(value.dtype)
    return out


def noised_mean(
    clipped: Mapping[int, Tensors],
    *,
    noise_multiplier: float,
    clip_norm: float,
    generator: torch.Generator,
    cohort_size: int | None = None,
    noise_cohort_size: int | None = None,
) -> tuple[Tensors, NoiseReport]:
    """(Σ_i Δ_i + N(0, std²)) / m over clipped updates, summed in float64 in ascending client id order.

    ``cohort_size`` is the denominator m (None: the number of updates). A fixed, expected cohort keeps the
    denominator independent of who was sampled (Andrew et al.); the number received is Flower's choice."""
    if not clipped:
        raise ValueError("nothing to reduce")
    ids = sorted(clipped)
    m = len(ids) if cohort_size is None else cohort_size
    first = clipped[ids[0]]
    sums = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in first.items()}
    for cid in ids:
        if clipped[cid].keys() != sums.keys():
            raise ValueError("a sum needs the same tensors from every client")
        for k, acc in sums.items():
            acc.add_(clipped[cid][k].detach().to(torch.float64))
    std = noise_stddev(noise_multiplier, clip_norm, cohort_size=m, noise_cohort_size=noise_cohort_size)
    noised = add_gaussian_noise(sums, std, generator)
    mean = {k: (noised[k] / m).to(first[k].dtype) for k in first}
    return mean, NoiseReport(std, std / m, m, accounted_cohort_size(m, noise_cohort_size))


def withhold_counts(counts: torch.Tensor) -> torch.Tensor:
    """A client's per-class counts replaced by presence: 1 where it holds the class, 0 elsewhere."""
    return (counts > 0).to(counts.dtype)


def noise_counts(
    summed_counts: torch.Tensor, *, noise_multiplier: float, count_clip: float, generator: torch.Generator
) -> torch.Tensor:
    """Summed per-class counts (each client's count vector clipped to L2 ≤ ``count_clip``) plus N(0, (z·clip)²),
    floored at 0 (post-processing, so no privacy cost) so that they remain usable as weights."""
    std = noise_stddev(noise_multiplier, count_clip)
    noised = add_gaussian_noise({"counts": summed_counts}, std, generator)["counts"]
    return noised.clamp_min(0)


def noised_prototype_mean(
    prototypes: torch.Tensor,
    held: torch.Tensor,
    *,
    noise_multiplier: float,
    clip_norm: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, (Σ held prototypes + noise) / max(noised holder count, 1) and whether the noised count is at least
    one half (a class somebody holds has a true count of at least 1; thresholding is post-processing).

    ``prototypes`` [n, K, D] are the clients' clipped class prototypes (zero where not held), ``held`` [n, K] their
    presence; sums in float64 in client order, noise drawn on the CPU (sums first, then counts)."""
    _, classes, dim = prototypes.shape
    scale = math.sqrt(2 * classes)
    std = noise_stddev(noise_multiplier, clip_norm) * scale
    presence = held.to(torch.float64)
    sums = (prototypes.detach().to(torch.float64) * presence.unsqueeze(2)).sum(0)
    counts = presence.sum(0)
    sum_noise = torch.randn((classes, dim), generator=generator, dtype=torch.float64) * std
    count_noise = torch.randn((classes,), generator=generator, dtype=torch.float64) * (noise_multiplier * scale)
    noised_sums = sums + sum_noise.to(sums.device)
    noised_counts = counts + count_noise.to(counts.device)
    mean = noised_sums / noised_counts.clamp_min(1.0).unsqueeze(1)
    return mean.to(prototypes.dtype), noised_counts >= 0.5
