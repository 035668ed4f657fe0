"""FedAvg-FT: FedAvg for training; each client's personalized model is the global model fine-tuned for
``finetune_epochs`` local epochs on its own training split (evaluated, never sent back)."""

from __future__ import annotations

from dataclasses import dataclass

from fedpal.algorithms.core.contract import ClientState, ClientView, Payload
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.weight_sharing.fedavg import FedAvg
from fedpal.common.tensors import Tensors


@dataclass(frozen=True)
class FedAvgFTHyperparameters:
    finetune_epochs: int = 1  # E: local epochs of fine-tuning for the personalized model
    finetune_lr: float = 0.0  # 0 = use train.lr


@register_algorithm
class FedAvgFT(FedAvg):
    name = "fedavg_ft"
    description = "FedAvg, then E local fine-tuning epochs from the global model as the personalized model"
    Hyperparameters = FedAvgFTHyperparameters
    personalized_is_global = False

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        lr = self.hp.finetune_lr or None
        return client.fit(payload["params"], epochs=self.hp.finetune_epochs, lr=lr, purpose="finetune").params
