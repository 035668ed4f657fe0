"""FedProto (Tan et al., AAAI 2022): clients share per-class mean features instead of weights, so clients with
different architectures can learn together; each pulls its features toward the averaged global prototypes and
predicts by the nearest one. Defaults follow HtFLlib's FedProto (unweighted average, collection during training,
unshuffled loaders); ``preset`` switches to the HtFLlib benchmark scripts or to FedAli's baseline variant.

``feature = "pooled"`` (FedAli's preset) takes the prototypes on HART's pooled encoder output, the layer FedAli's
code finds by the name "pooling" (getalp/FedAli ``main.py``, ``fed_util.fedProto_Trainer``), before the
Dense(feature_dim, swish) layer and its dropout that end fedpal's HART backbone. The model, its parameters and the
forward pass are unchanged: the client's trainer reads its features at that split while FedProto works
(``LocalTrainer.features_from``), so the pull, the collection and the nearest-prototype scores read the pooled output
of the same forward pass that gives the logits.
Models other than HART have no such layer before their feature, and keep their feature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fedpal.algorithms.core.contract import AlgorithmSetup, ClientState, ClientView, Payload, Reply
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.prototype.base import PrototypeHyperparameters, PrototypeMethod, apply_preset
from fedpal.common.tensors import Tensors

PRESETS: dict[str, dict[str, Any]] = {
    # HtFLlib's benchmark scripts, the setting beside FedTGP and ProtoNorm.
    "htfllib": {"lam": 10.0, "proto_collection": "during_training", "proto_weighting": "uniform"},
    # FedAli's FedProto baseline: class-count weighting, last-epoch collection, prediction by the head, prototypes
    # on the pooled encoder output.
    "fedali": {
        "lam": 1.0,
        "proto_collection": "last_epoch",
        "proto_weighting": "samples",
        "inference": "head",
        "feature": "pooled",
    },
}
# Models whose backbone has a pooled encoder output before its feature layer (``pooled`` and ``project``).
POOLED_MODELS = ("hart", "hart_alp")


@dataclass(frozen=True)
class FedProtoHyperparameters(PrototypeHyperparameters):
    # "", "htfllib" or "fedali": fixes lam, collection, weighting (and inference, feature) as listed
    preset: Literal["", "htfllib", "fedali"] = ""
    # the prototypes' space: "model" = the model's feature (the head's input); "pooled" = HART's pooled encoder
    # output (FedAli's baseline), the model's feature on other models
    feature: Literal["model", "pooled"] = "model"


def pooled_split(
    module: nn.Module, x: torch.Tensor, options: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(HART's pooled encoder output, the model's logits) from one pass; the logits equal the model's forward."""
    model: Any = module
    pooled = model.backbone.pooled(x, **dict(options or {}))
    return pooled, model.head(model.backbone.project(pooled))


@register_algorithm
class FedProto(PrototypeMethod):
    name = "fedproto"
    description = "share per-class mean features; pull features to averaged prototypes (Tan et al., 2022)"
    Hyperparameters = FedProtoHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        super().__init__(apply_preset(hp, PRESETS), setup)
        architectures = setup.architectures or ("",)
        self.pooled = self.hp.feature == "pooled" and all(a in POOLED_MODELS for a in architectures)
        if self.pooled:  # prototypes live in the encoder's width w, not in model.feature_dim
            self.dim = int(setup.initial_params["backbone.norm.weight"].shape[0])
            # The pooled passes are this method's own loop, not plain ``client.fit`` passes (and HART's dropout
            # keeps the batched executor from stacking them anyway): its clients run one by one.
            self.batched_training = False  # type: ignore[misc]

    def features_of(self, client: ClientView) -> contextlib.AbstractContextManager[None]:
        """The block in which the shared prototype mechanics read the client's features: HART's pooled output
        under the pooled option, the model's feature otherwise."""
        return client.trainer.features_from(pooled_split) if self.pooled else contextlib.nullcontext()

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        with self.features_of(client):
            return super().local_update(client, state, payload)

    def predict_scores(
        self, client: ClientView, state: ClientState, payload: Payload, params: Tensors, x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        with self.features_of(client):
            return super().predict_scores(client, state, payload, params, x)
