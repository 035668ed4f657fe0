"""FedPer (Arivazhagan et al., 2019, "Federated Learning with Personalization Layers"): the base layers (the
backbone) are federated with FedAvg's sample-weighted mean, the personalization layers (the head) stay on the
client and never travel.

Each round a client loads the global backbone under its own head, trains the whole model with cross-entropy,
keeps the head and uploads the backbone. Every client's head starts as the initial model's head.

The evaluated model (``evaluate``): ``"global"`` (default) is the latest global backbone with the client's own
head, as PFLlib does (it sends the new backbone to every client before evaluating); ``"post_local"`` is the whole
model right after the client's latest local training, as FedAli's code does.
"""

from __future__ import annotations

from typing import Any

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
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.weight_sharing.fedavg import FedAvgHyperparameters, evaluate_mode
from fedpal.algorithms.weight_sharing.lg_fedavg import HEAD_PREFIX, head_of
from fedpal.common.tensors import Tensors, clone_tensors


def backbone_of(params: Tensors) -> Tensors:
    """Everything but the head: the federated base layers (buffers included, as FedAvg averages them)."""
    return {k: v for k, v in params.items() if not k.startswith(HEAD_PREFIX)}


@register_algorithm
class FedPer(Algorithm):
    name = "fedper"
    streamed_reply = ("backbone", "num_samples")
    batched_training = True
    description = "federated backbone, personal heads that never leave the client (Arivazhagan et al., 2019)"
    Hyperparameters = FedAvgHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        self.evaluate_mode = evaluate_mode(hp)

    def init_server(self) -> ServerState:
        return {"backbone": clone_tensors(backbone_of(self.setup.initial_params))}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"backbone": state["backbone"]} for cid in client_ids}

    def init_client(self, client: ClientView) -> ClientState:
        return {"head": client.own_initial_params(head_of)}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        result = client.fit({**payload["backbone"], **state["head"]})
        new_state: ClientState = {"head": head_of(result.params)}
        if self.evaluate_mode == "post_local":
            new_state["params"] = result.params
        return new_state, {"backbone": backbone_of(result.params), "num_samples": client.num_train}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        usable = {cid: r for cid, r in replies.items() if r["num_samples"] > 0}
        if not usable:
            return state
        backbones = {cid: r["backbone"] for cid, r in usable.items()}
        weights = {cid: float(r["num_samples"]) for cid, r in usable.items()}
        return {**state, "backbone": reduce(backbones, weights, reference=state["backbone"])}

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return self.configure(state, round, client_ids)  # PFLlib sends the new backbone before evaluating

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        if self.evaluate_mode == "post_local" and "params" in state:
            return state["params"]
        return {**payload["backbone"], **state["head"]}

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {"backbone": {k: v.shape for k, v in payload["backbone"].items()}, "num_samples": int}
