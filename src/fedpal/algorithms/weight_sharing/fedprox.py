"""FedProx (Li et al., 2020): FedAvg whose local objective adds (mu/2) * ||w - w_global||^2."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpal.algorithms.core.contract import ClientState, ClientView, Payload
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import Batch, FitResult, squared_distance
from fedpal.algorithms.weight_sharing.fedavg import FedAvg, FedAvgHyperparameters


@dataclass(frozen=True)
class FedProxHyperparameters(FedAvgHyperparameters):
    mu: float = 0.01  # proximal strength; PFLlib's default


@register_algorithm
class FedProx(FedAvg):
    name = "fedprox"
    batched_training = False  # an extra loss term per step
    description = "FedAvg with a proximal term (mu/2)||w - w_g||^2 in the local loss (Li et al., 2020)"
    Hyperparameters = FedProxHyperparameters

    def train_locally(self, client: ClientView, payload: Payload, state: ClientState | None = None) -> FitResult:
        reference = payload["params"]
        mu = self.hp.mu

        def proximal(batch: Batch) -> torch.Tensor:
            return 0.5 * mu * squared_distance(batch.module, reference)

        return client.fit(reference, extra_loss=proximal)
