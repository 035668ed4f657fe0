"""The client and server mechanics FedProto, FedTGP and ProtoNorm share; each method only says how the server
turns the averaged client prototypes into global ones (``make_global``) and how far the client scales them.

Client: L = CE(head(r), y) + lam * mean over the batch x D of (r_i - s * P_{y_i})^2, where rows whose class has no
global prototype keep their own (detached) feature as target: they add 0 but still count in the B x D mean, as
``nn.MSELoss`` does in the sources. Then per-class mean features go up: collected during training (all epochs or
the last one, train mode, before each step) or by an eval-mode pass after training. Models never leave clients.

Server: per-class average over the clients that hold the class (uniform or by class counts), classes nobody sent
this round keep their last average (``missing_class="keep_last"``) or have no prototype (``"drop"``), then
``make_global``. Prediction: nearest global prototype (or the personal head); both are reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn import functional as F

from fedpal.algorithms.core import prototypes as protos
from fedpal.algorithms.core.contract import (
    Algorithm,
    AlgorithmSetup,
    ClientState,
    ClientView,
    Payload,
    Reduce,
    Reply,
    ServerState,
)
from fedpal.algorithms.core.training import FunctionalTerm, TermBatch, TermStats
from fedpal.algorithms.prototype.alignment import pairwise_cosine_stats
from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError

Collection = Literal["during_training", "last_epoch", "eval_pass"]


@dataclass(frozen=True)
class PrototypeHyperparameters:
    lam: float = 1.0  # weight of the feature-to-prototype MSE
    proto_collection: Collection = "during_training"  # or "last_epoch", "eval_pass"
    # server average over clients: "uniform" (code) or "samples" (class counts)
    proto_weighting: Literal["uniform", "samples"] = "uniform"
    # class nobody sent this round: keep its last prototype, or "drop" it
    missing_class: Literal["keep_last", "drop"] = "keep_last"
    inference: Literal["prototype", "head"] = "prototype"  # reported prediction: nearest global prototype, or head
    shuffle_train: bool = False  # HtFLlib's train loaders are not shuffled
    drop_last: bool = True  # HtFLlib drops the last partial batch (a client smaller than a batch keeps it)


class PrototypeMethod(Algorithm):
    """Shared client loss, collection, averaging and inference of the prototype methods."""

    supports_heterogeneous_models = True
    # plain passes plus a functional term (collection through its stats): the batched executor trains clients together
    batched_training = True

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.lam < 0:
            raise ConfigError(f"algorithm.lam must be >= 0, got {hp.lam}")
        super().__init__(hp, setup)
        self.num_classes = setup.num_classes
        self.dim = setup.feature_dim

    # ---- what a method changes
    def target_scale(self) -> float:
        """s: the client pulls features toward s * P_y (ProtoNorm's upscaling; 1 elsewhere)."""
        return 1.0

    def make_global(
        self, state: ServerState, round: int, mean: torch.Tensor, present: torch.Tensor, replies: dict[int, Reply]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], ServerState]:
        """Global prototypes [C, D] and their presence mask from the averaged ones, diagnostics, and entries the
        method keeps in the server state (FedTGP's generator)."""
        return mean, present, {}, {}

    # ---- server
    def init_server(self) -> ServerState:
        return {"global": {}, "aggregated": {}, "stats": {}}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"prototypes": state["global"]} for cid in client_ids}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        """Per-class averages over the clients holding each class: per-class weights, so the method reads the
        individual replies explicitly instead of reducing whole parameter sets."""
        if not replies:
            return state
        uploads = {}
        for cid, reply in replies.items():
            stacked, held = protos.from_dict(reply["prototypes"], self.num_classes, self.dim, device=self.setup.device)
            counts = reply.get("class_counts", held.float())
            uploads[cid] = (stacked, held, counts)
        mean, present = reduce.prototypes(uploads, self.hp.proto_weighting)
        if self.hp.missing_class == "keep_last" and state["aggregated"]:
            last, had = protos.from_dict(state["aggregated"], self.num_classes, self.dim, device=self.setup.device)
            fill = had & ~present
            mean[fill] = last[fill]
            present = present | had
        stats = {"aggregated_norm": float(mean[present].norm(dim=1).mean()) if present.any() else float("nan")}
        global_protos, global_present, extra, kept = self.make_global(state, round, mean, present, replies)
        stats.update(extra)
        if int(global_present.sum()) >= 2:
            geometry = pairwise_cosine_stats(global_protos[global_present])
            stats.update({f"global_{k}": v for k, v in geometry.items()})
        return {
            **state,
            **kept,
            "global": protos.to_dict(global_protos, global_present),
            "aggregated": protos.to_dict(mean, present),
            "stats": stats,
        }

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        return {"params": client.own_initial_params()}

    def prototype_term(self, params: Mapping[str, torch.Tensor], batch: TermBatch) -> tuple[torch.Tensor, TermStats]:
        """lam * MSE of the features to their class's target (context: ``targets`` [C, D], ``has_target`` [C]), over
        the B x D entries; rows without a target, and padding rows, aim at their own detached feature. Stats, when
        the method collects during training: the detached features with their labels and row weights, and the gaps
        of the rows with a target (for the feature-to-target distance)."""
        hp = self.hp
        features, y = batch.features, batch.y
        detached = features.detach()
        collect = hp.proto_collection in ("during_training", "last_epoch")
        stats: TermStats = {"features": detached, "y": y, "rows": batch.mask} if collect else {}
        with_target = batch.context["has_target"][y] & (batch.mask > 0)
        if not batch.batched and not bool(with_target.any()):  # nothing to pull (vmap computes the exact 0 instead)
            return features.new_zeros(()), stats
        target = torch.where(with_target.unsqueeze(1), batch.context["targets"][y], detached)
        if collect:
            stats.update(gap=detached - target, with_target=with_target)
        return hp.lam * batch.real_mean(F.mse_loss(features, target)), stats

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        hp = self.hp
        c, d = self.num_classes, self.dim
        device = client.device
        targets, has_target = protos.from_dict(payload["prototypes"], c, d, device=device)
        targets = targets * self.target_scale()
        epochs = client.settings.epochs
        sums, counts = torch.zeros(c, d, device=device), torch.zeros(c, device=device)
        residual = torch.zeros(2, device=device)  # sum of ||r - s P_y|| over rows with a target, and their number
        collect = hp.proto_collection in ("during_training", "last_epoch")

        def accumulate(stats: TermStats, epoch: int) -> None:
            """Per-class sums and counts of the step's real rows (all epochs or the last), and the residual."""
            if hp.proto_collection == "during_training" or epoch == epochs - 1:
                y, rows = stats["y"], stats["rows"]
                sums.index_add_(0, y, stats["features"] * rows.unsqueeze(1))
                counts.index_add_(0, y, rows)
            if "gap" in stats:
                with_target = stats["with_target"]
                residual.add_(torch.stack([stats["gap"][with_target].norm(dim=1).sum(), with_target.sum()]))

        needs_term = collect or bool(has_target.any())
        context = {"targets": targets, "has_target": has_target}
        term = FunctionalTerm(self.prototype_term, context=context, after_step=accumulate if collect else None)
        result = client.fit(
            state["params"],
            extra_loss=term if needs_term else None,
            shuffle=hp.shuffle_train,
            drop_last=hp.drop_last,
        )
        if not collect:
            features, _ = client.trainer.features_and_logits(result.params, client.train_x)
            sums, counts = protos.class_sums(features, client.train_y, c)
            with_target = has_target[client.train_y]
            if bool(with_target.any()):
                gap = features[with_target] - targets[client.train_y[with_target]]
                residual = torch.stack([gap.norm(dim=1).sum(), with_target.sum().float()])
        held = counts > 0
        means = sums / counts.clamp_min(1).unsqueeze(1)
        reply: Reply = {"prototypes": protos.to_dict(means, held)}
        if hp.proto_weighting == "samples":
            reply["class_counts"] = counts
        new_state = {
            "params": result.params,
            "target_distance": residual[0] / residual[1] if residual[1] > 0 else residual.new_tensor(float("nan")),
        }
        return new_state, reply

    def expected_reply_shapes(self, payload: Payload) -> dict[str, Any]:
        return {"class_counts": torch.Size([self.num_classes])} if self.hp.proto_weighting == "samples" else {}

    # ---- evaluation
    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return self.configure(state, round, client_ids)  # the latest global prototypes, for nearest-prototype

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        params: Tensors = state["params"]
        return params

    def inference_modes(self) -> tuple[str, ...]:
        return ("prototype", "head") if self.hp.inference == "prototype" else ("head", "prototype")

    def prototype_modes(self) -> dict[str, str]:
        """Nearest-prototype inference modes and the evaluation-payload key of the prototypes each one scores."""
        return {"prototype": "prototypes"}

    def predict_scores(
        self, client: ClientView, state: ClientState, payload: Payload, params: Tensors, x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The head's logits and, for every prototype mode, nearest-prototype scores, from one forward pass."""
        features, logits = client.trainer.features_and_logits(params, x)
        scores: dict[str, torch.Tensor] = {}
        for mode, key in self.prototype_modes().items():
            prototypes, present = protos.from_dict(payload[key], self.num_classes, self.dim, device=x.device)
            scores[mode] = protos.nearest_prototype_scores(features, prototypes, present)
        return {**scores, "head": logits}

    def server_diagnostics(self, server: ServerState) -> dict[str, float]:
        return {**server.get("stats", {}), "target_scale": self.target_scale()}

    def client_diagnostics(self, state: ClientState) -> dict[str, float]:
        return {"feature_target_distance": float(state["target_distance"])} if "target_distance" in state else {}


def apply_preset(hp: Any, presets: dict[str, dict[str, Any]]) -> Any:
    """Replace the fields a named preset fixes (``preset = ""`` keeps the values as given)."""
    name = getattr(hp, "preset", "")
    return dataclasses.replace(hp, **presets[name]) if name else hp
