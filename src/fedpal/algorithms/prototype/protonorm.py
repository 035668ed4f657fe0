"""ProtoNorm (Lee, Shin and Choi, 2025): averaged prototypes of different classes crowd together, so the server
spreads them over the unit sphere by a Thomson-type repulsion (Prototype Alignment, PA) and clients pull their
features toward the prototypes scaled by s (Prototype Upscaling, PU), which asks for large, well-separated
features. PA costs the clients nothing; PU only changes the client's target.

Switches: ``pa`` and ``pu`` give the four ablation cells. PU without PA sends the unit-normalised averages
(s * P/||P|| on the client); the official code's PU-only path is broken (it overwrites the normalised prototypes
with the raw mean x 80 and reads an undefined argument), so this follows the paper's intent instead. With both off
the method is FedProto with eval-pass collection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from fedpal.algorithms.core.contract import AlgorithmSetup, Reply, ServerState
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.prototype.alignment import AlignmentSettings, align_class_prototypes, present_directions
from fedpal.algorithms.prototype.base import Collection, PrototypeHyperparameters, PrototypeMethod
from fedpal.errors import ConfigError


@dataclass(frozen=True)
class ProtoNormHyperparameters(PrototypeHyperparameters):
    lam: float = 10.0
    proto_collection: Collection = "eval_pass"
    pa: bool = True  # Prototype Alignment on the server
    pu: bool = True  # Prototype Upscaling on the client
    scale: float = 80.0  # s, the client's target scale when pu is on
    pa_steps: int = 500  # T
    pa_lr: float = 0.1  # eta
    pa_momentum: float = 0.9  # mu (heavy ball)
    # "log" (official force (x_i - x_j)/|x_i - x_j|^2) or "coulomb" (over |.|^3)
    pa_energy: Literal["log", "coulomb"] = "log"
    pa_early_stop: int = 10  # stop once the rounded mean force is unchanged this many iterations; 0 = run all T
    pa_decay_every: int = 10  # eta <- pa_decay * eta every this many iterations
    pa_decay: float = 0.95


@register_algorithm
class ProtoNorm(PrototypeMethod):
    name = "protonorm"
    description = "prototypes aligned on the sphere by repulsion (PA) and upscaled client targets (PU), Lee et al. 2025"
    Hyperparameters = ProtoNormHyperparameters
    # the authors' SGD 0.01, batch 32, one local epoch
    recommended_training: ClassVar[Mapping[str, Any]] = {
        "optimizer": "sgd",
        "lr": 0.01,
        "batch_size": 32,
        "local_epochs": 1,
    }

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.scale <= 0 or hp.pa_steps < 0:
            raise ConfigError("algorithm.scale must be > 0 and algorithm.pa_steps >= 0")
        super().__init__(hp, setup)

    def target_scale(self) -> float:
        return float(self.hp.scale) if self.hp.pu else 1.0

    def make_global(
        self, state: ServerState, round: int, mean: torch.Tensor, present: torch.Tensor, replies: dict[int, Reply]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], ServerState]:
        hp = self.hp
        if not (hp.pa or hp.pu):
            return mean, present, {}, {}
        if hp.pa:
            aligned, iterations = align_class_prototypes(mean, present, AlignmentSettings.of(hp))
            return aligned, present, {"pa_iterations": float(iterations)}, {}
        out = mean.clone()
        rows = present_directions(mean, present)
        out[present] = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return out, present, {}, {}
