"""FedRep (Collins, Hassani, Mokhtari and Shakkottai, ICML 2021, "Exploiting Shared Representations for
Personalized Federated Learning"): the body (fedpal's backbone) is a representation learned by all clients and
averaged by the server; every client keeps its own head.

A round on a client: load the global body under its own head; ``head_epochs`` epochs on the head with the body
frozen; then the run's local epochs on the body with the head frozen; keep the head, upload the body. The server takes
the sample-weighted mean of the bodies (as the authors' ``main_fedrep.py``); heads never travel. The personalized
model is the latest global body with the client's latest head (FedPer's evaluation, which FedRep inherits, with its
``evaluate = "post_local"`` option).
``docs/methods/ditto_fedrep_fedbabu_fedala.md`` gives the defaults and the differences from the authors' code and
PFLlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.algorithms.core.contract import AlgorithmSetup, ClientState, ClientView, Payload, Reply
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import FitResult, seeded_stochastic_layers, train_steps
from fedpal.algorithms.weight_sharing.fedavg import FedAvgHyperparameters
from fedpal.algorithms.weight_sharing.fedper import FedPer, backbone_of
from fedpal.algorithms.weight_sharing.lg_fedavg import HEAD_PREFIX, head_of
from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError


@dataclass(frozen=True)
class FedRepHyperparameters(FedAvgHyperparameters):  # evaluate: "global" (latest body, own head) or "post_local"
    head_epochs: int = 10  # tau_h: head-only epochs before the body's train.local_epochs (authors: local_ep 11 - 1)


def body_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter outside the head: what the body phase moves."""
    return [p for name, p in module.named_parameters() if not name.startswith(HEAD_PREFIX)]


def fit_head(client: ClientView, params: Tensors, epochs: int, purpose: str) -> FitResult:
    """``epochs`` epochs of the run's optimizer on the head alone, the body frozen.

    The same steps as ``client.fit(params, trainable=head parameters)``, but the body's forward runs without
    autograd: nothing behind the features needs a gradient, so the backward stops at the head. Stochastic and
    normalization layers of the body still run in train mode, as in the authors' code.
    """
    trainer, x, y = client.trainer, client.train_x, client.train_y
    module = trainer.module
    with seeded_stochastic_layers(client.stochastic_seed(purpose), x.device):
        trainer.load(params)
        module.train()
        head = module.get_submodule("head")
        backbone = module.get_submodule("backbone")
        optimizer = trainer.make_optimizer(parameters=list(head.parameters()))

        def loss_of(epoch: int, idx: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                features = backbone(x[idx])
            return F.cross_entropy(head(features), y[idx])

        batches = trainer.batches(x.shape[0], client.generator(purpose), epochs, device=x.device)
        result = train_steps(batches, loss_of, [optimizer], grad_clip=trainer.settings.grad_clip)
        trainer.steps += result.steps
        return FitResult(trainer.snapshot(), result.steps, result.mean_loss)


@register_algorithm
class FedRep(FedPer):
    name = "fedrep"
    streamed_reply = ("backbone", "num_samples")
    batched_training = False  # each phase trains a chosen part of the model
    description = "averaged body (representation), personal heads fitted first each round (Collins et al., 2021)"
    Hyperparameters = FedRepHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.head_epochs < 0:
            raise ConfigError(f"algorithm.head_epochs must be >= 0, got {hp.head_epochs}")
        super().__init__(hp, setup)

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        start = {**payload["backbone"], **state["head"]}
        fitted = fit_head(client, start, self.hp.head_epochs, "head")
        result = client.fit(fitted.params, trainable=body_parameters, purpose="body")
        new_state: ClientState = {"head": head_of(result.params)}
        if self.evaluate_mode == "post_local":
            new_state["params"] = result.params
        return new_state, {"backbone": backbone_of(result.params), "num_samples": client.num_train}

    def adapt_unseen(self, client: ClientView, state: ClientState, payload: Payload) -> ClientState:
        """A new client learns only its head on the fixed global body (the paper's generalization to new clients)."""
        start = {**payload["backbone"], **state["head"]}
        return {"head": head_of(fit_head(client, start, self.hp.head_epochs, "head").params)}
