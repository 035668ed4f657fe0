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

``inference_prototypes = "pa"`` isolates ProtoNorm's Prototype Alignment at inference: each round the server also
runs PA (``align_class_prototypes``, ProtoNorm's own server step, with the ``pa_*`` settings) on the same averaged
prototypes, keeps the result apart and sends it only with the evaluation payload. Training still pulls toward the
plain average, so the trained clients are those of plain FedProto, bit for bit; each client is then scored both
ways, by the nearest averaged prototype (mode "prototype") and by the nearest PA prototype (mode "prototype_pa").
PA's unit prototypes all have norm 1, so the nearest one is the one of largest dot product with the feature: no
upscaling s enters inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fedpal.algorithms.core import prototypes as protos
from fedpal.algorithms.core.contract import AlgorithmSetup, ClientState, ClientView, Payload, Reply, ServerState
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.prototype.alignment import AlignmentSettings, align_class_prototypes, pairwise_cosine_stats
from fedpal.algorithms.prototype.base import PrototypeHyperparameters, PrototypeMethod, apply_preset
from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError

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
    # prototypes scored at inference besides the averaged ones: "pa" adds ProtoNorm's PA of the same averages (mode
    # "prototype_pa"); training always pulls toward the average
    inference_prototypes: Literal["average", "pa"] = "average"
    # PA's settings under inference_prototypes = "pa" (ProtoNorm's defaults and meaning)
    pa_steps: int = 500
    pa_lr: float = 0.1
    pa_momentum: float = 0.9
    pa_energy: Literal["log", "coulomb"] = "log"
    pa_early_stop: int = 10  # 0 = run all pa_steps
    pa_decay_every: int = 10
    pa_decay: float = 0.95


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
        if hp.pa_steps < 0 or hp.pa_early_stop < 0 or hp.pa_decay_every < 1:
            raise ConfigError(
                "algorithm.pa_steps and algorithm.pa_early_stop must be >= 0 and algorithm.pa_decay_every >= 1"
            )
        super().__init__(apply_preset(hp, PRESETS), setup)
        self.inference_pa = self.hp.inference_prototypes == "pa"
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

    # ---- PA at inference only (inference_prototypes = "pa")
    def make_global(
        self, state: ServerState, round: int, mean: torch.Tensor, present: torch.Tensor, replies: dict[int, Reply]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], ServerState]:
        """The global prototypes stay the averages; under "pa" PA of the same averages is kept for evaluation."""
        if not self.inference_pa:
            return mean, present, {}, {}
        aligned, iterations = align_class_prototypes(mean, present, AlignmentSettings.of(self.hp))
        stats = {"inference_pa_iterations": float(iterations)}
        if int(present.sum()) >= 2:
            geometry = pairwise_cosine_stats(aligned[present])
            stats.update({f"inference_pa_{k}": v for k, v in geometry.items()})
        return mean, present, stats, {"inference_pa": protos.to_dict(aligned, present)}

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        payloads = super().configure_evaluation(state, round, client_ids)
        if not self.inference_pa:
            return payloads
        aligned = state.get("inference_pa", {})
        return {cid: {**payload, "pa_prototypes": aligned} for cid, payload in payloads.items()}

    def inference_modes(self) -> tuple[str, ...]:
        return (*super().inference_modes(), "prototype_pa") if self.inference_pa else super().inference_modes()

    def prototype_modes(self) -> dict[str, str]:
        modes = super().prototype_modes()
        return {**modes, "prototype_pa": "pa_prototypes"} if self.inference_pa else modes

    # ---- client
    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        with self.features_of(client):
            return super().local_update(client, state, payload)

    def predict_scores(
        self, client: ClientView, state: ClientState, payload: Payload, params: Tensors, x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        with self.features_of(client):
            return super().predict_scores(client, state, payload, params, x)
