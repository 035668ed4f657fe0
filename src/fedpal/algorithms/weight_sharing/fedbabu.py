"""FedBABU (Oh, Kim and Yun, ICLR 2022, "FedBABU: Toward Enhanced Representation for Federated Image
Classification"): during federated training only the body (fedpal's backbone) learns; the head keeps its random
initial values on every client (head learning rate 0), so all clients fit their bodies to one fixed classifier.
Personalization happens afterwards, by fine-tuning.

A round on a client: the global body under the fixed head, the run's local epochs on the body alone; upload the
body. The server averages the bodies (uniformly, as the authors' ``main_fed.py``; ``weighting = "samples"`` for
PFLlib's sample weights). The fixed head is the architecture's seeded initial head, which every client holds from
the start, so it never travels. The personalized model is the global body with the fixed head fine-tuned on the
client's training split for ``finetune_epochs`` epochs (the whole model by default, as the authors' evaluation
notebook), computed at every evaluation and never sent back; the global row is the body with the fixed head.
``docs/methods/ditto_fedrep_fedbabu_fedala.md`` gives the defaults and where they come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

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
from fedpal.algorithms.weight_sharing.fedper import backbone_of
from fedpal.algorithms.weight_sharing.fedrep import body_parameters
from fedpal.algorithms.weight_sharing.lg_fedavg import HEAD_PREFIX, head_of
from fedpal.common.tensors import Tensors, clone_tensors
from fedpal.errors import ConfigError


@dataclass(frozen=True)
class FedBABUHyperparameters:
    finetune_epochs: int = 5  # tau_ft: fine-tuning epochs of the personalized model (authors' ft_ep); 0 = none
    finetune_lr: float = 0.001  # lr of the fine-tuning (authors' evaluation notebook); 0 = train.lr
    finetune_part: Literal["full", "head"] = "full"  # what fine-tuning moves: the whole model (authors), or the head
    weighting: Literal["uniform", "samples"] = (
        "uniform"  # server mean of the bodies (authors: uniform; PFLlib: samples)
    )


def head_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in module.named_parameters() if name.startswith(HEAD_PREFIX)]


@register_algorithm
class FedBABU(Algorithm):
    name = "fedbabu"
    streamed_reply = ("backbone", None)
    batched_training = False  # the local passes train the body alone
    description = "body averaged under a fixed random head, fine-tuned at evaluation (Oh, Kim and Yun, 2022)"
    Hyperparameters: ClassVar[type] = FedBABUHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.finetune_epochs < 0 or hp.finetune_lr < 0:
            raise ConfigError("algorithm.finetune_epochs and algorithm.finetune_lr must be >= 0")
        super().__init__(hp, setup)
        if hp.weighting == "samples":  # an instance attribute shadows the class declaration (see GlobalModelServer)
            vars(self)["streamed_reply"] = ("backbone", "num_samples")

    # ---- server
    def init_server(self) -> ServerState:
        initial = self.setup.initial_params
        return {"backbone": clone_tensors(backbone_of(initial)), "head": clone_tensors(head_of(initial))}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"backbone": state["backbone"]} for cid in client_ids}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        usable = {cid: r for cid, r in replies.items() if r["num_samples"] > 0}
        if not usable:
            return state
        bodies = {cid: r["backbone"] for cid, r in usable.items()}
        weights = (
            {cid: float(r["num_samples"]) for cid, r in usable.items()} if self.hp.weighting == "samples" else None
        )
        return {**state, "backbone": reduce(bodies, weights, reference=state["backbone"])}

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return self.configure(state, round, client_ids)

    def global_params(self, server: ServerState) -> Tensors | None:
        """The global body under the fixed head: the model before any fine-tuning (PFLlib's per-round numbers)."""
        return {**server["backbone"], **server["head"]}

    # ---- client
    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        start = {**payload["backbone"], **client.own_initial_params(head_of)}
        result = client.fit(start, trainable=body_parameters)
        return state, {"backbone": backbone_of(result.params), "num_samples": client.num_train}

    def adapt_unseen(self, client: ClientView, state: ClientState, payload: Payload) -> ClientState:
        """Nothing to keep: a new client personalizes by the fine-tuning of evaluation, like every other client."""
        return state

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        start = {**payload["backbone"], **client.own_initial_params(head_of)}
        if self.hp.finetune_epochs == 0 or client.num_train == 0:
            return start
        trainable = head_parameters if self.hp.finetune_part == "head" else None
        lr = self.hp.finetune_lr or None
        return client.fit(start, epochs=self.hp.finetune_epochs, lr=lr, trainable=trainable, purpose="finetune").params

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {"backbone": {k: v.shape for k, v in payload["backbone"].items()}, "num_samples": int}
