"""FedProx (Li et al., 2020): FedAvg whose local objective adds (mu/2) * ||w - w_global||^2."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedpal.algorithms.core.contract import ClientState, ClientView, Payload
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import FitResult, FunctionalTerm, TermBatch, TermStats, parameter_distance
from fedpal.algorithms.weight_sharing.fedavg import FedAvg, FedAvgHyperparameters


@dataclass(frozen=True)
class FedProxHyperparameters(FedAvgHyperparameters):
    mu: float = 0.01  # proximal strength; PFLlib's default


@register_algorithm
class FedProx(FedAvg):
    name = "fedprox"
    batched_training = True  # the proximal term is a function of the parameters: vmap runs it for many clients
    description = "FedAvg with a proximal term (mu/2)||w - w_g||^2 in the local loss (Li et al., 2020)"
    Hyperparameters = FedProxHyperparameters

    def proximal_term(self, params: Mapping[str, torch.Tensor], batch: TermBatch) -> tuple[torch.Tensor, TermStats]:
        """(mu/2) ||w - w_ref||^2, the reference (the round's global model) in the client's context."""
        return 0.5 * self.hp.mu * parameter_distance(params, batch.context), {}

    def train_locally(self, client: ClientView, payload: Payload, state: ClientState | None = None) -> FitResult:
        reference = payload["params"]
        return client.fit(reference, extra_loss=FunctionalTerm(self.proximal_term, context=reference))
