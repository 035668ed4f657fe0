"""FedProto (Tan et al., AAAI 2022): clients share per-class mean features instead of weights, so clients with
different architectures can learn together; each pulls its features toward the averaged global prototypes and
predicts by the nearest one. Defaults follow HtFLlib's FedProto (unweighted average, collection during training,
unshuffled loaders); ``preset`` switches to the HtFLlib benchmark scripts or to FedAli's baseline variant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fedpal.algorithms.core.contract import AlgorithmSetup
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.prototype.base import PrototypeHyperparameters, PrototypeMethod, apply_preset

PRESETS: dict[str, dict[str, Any]] = {
    # HtFLlib's benchmark scripts, the setting beside FedTGP and ProtoNorm.
    "htfllib": {"lam": 10.0, "proto_collection": "during_training", "proto_weighting": "uniform"},
    # FedAli's FedProto baseline: class-count weighting, last-epoch collection, prediction by the head.
    "fedali": {"lam": 1.0, "proto_collection": "last_epoch", "proto_weighting": "samples", "inference": "head"},
}


@dataclass(frozen=True)
class FedProtoHyperparameters(PrototypeHyperparameters):
    # "", "htfllib" or "fedali": fixes lam, collection, weighting (and inference) as listed
    preset: Literal["", "htfllib", "fedali"] = ""


@register_algorithm
class FedProto(PrototypeMethod):
    name = "fedproto"
    description = "share per-class mean features; pull features to averaged prototypes (Tan et al., 2022)"
    Hyperparameters = FedProtoHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        super().__init__(apply_preset(hp, PRESETS), setup)
