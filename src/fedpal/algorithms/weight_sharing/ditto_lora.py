"""Ditto of adapters, FedMosaic's Ditto baseline (Li et al., 2021, on adapters as the FedMosaic code runs it): a global
plain LoRA adapter per architecture trained by FedAvg, and beside it on every client a personal one v pulled toward the
round's global one w by (lam / 2) ||v - w||^2. The official code adds 0.001 ||v - w||^2, so lam defaults to 0.002
(Ditto's own scripts use lam = 1 on full models). Both passes take ``local_steps`` steps on the same mini-batches of the
replay store (default 20 each, half of the single-pass methods' 40: the spec's compute matching, 50 vs 100 for the
authors), each with its own AdamW state. The personalized model is v (lora2 alone, no gate)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedpal.algorithms.core.contract import (
    AlgorithmSetup,
    ClientState,
    ClientView,
    Payload,
    Reply,
    ServerState,
)
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.weight_sharing.adapter_averaging import AdapterAveraging
from fedpal.algorithms.weight_sharing.adapter_method import AdapterHyperparameters, ExtraAdapterLoss
from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError


@dataclass(frozen=True)
class DittoLoRAHyperparameters(AdapterHyperparameters):
    local_steps: int = 20  # per pass; two passes a round
    lam: float = 0.002  # lambda of the personal objective: the FedMosaic code's 0.001 ||v - w||^2


@register_algorithm
class DittoLoRA(AdapterAveraging):
    name = "ditto_lora"
    description = "Ditto on adapters: FedAvg global adapter plus a personal one pulled toward it (Li et al., 2021)"
    Hyperparameters: ClassVar[type] = DittoLoRAHyperparameters
    mixing = "local"
    adapter_layout = "lora"

    def __init__(self, hp: DittoLoRAHyperparameters, setup: AlgorithmSetup) -> None:
        if hp.lam < 0:
            raise ConfigError(f"algorithm.lam must be >= 0, got {hp.lam}")
        super().__init__(hp, setup)

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {} for cid in client_ids}

    def init_client(self, client: ClientView) -> ClientState:
        start = self.initial_part(client, "lora2")
        return {"lora2": start, "w": {k: t.clone() for k, t in start.items()}}

    def proximal(self, anchor: Tensors) -> ExtraAdapterLoss:
        """(lam / 2) ||v - w||^2 over the adapter's tensors, w the round's global adapter."""
        lam = self.hp.lam

        def term(current: Mapping[str, nn.Parameter]) -> torch.Tensor:
            return 0.5 * lam * torch.stack([(current[k] - anchor[k]).pow(2).sum() for k in current]).sum()

        return term

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        w = payload["lora2"] if "lora2" in payload else state["w"]
        batches, replay = self.replay_batches(client, state)  # both models see the same batches, as uniformly
        personal = self.train_adapters(
            client, {"lora2": state["lora2"]}, state.get("adam", {}), extra_loss=self.proximal(w), batches=batches
        )
        shared = self.train_adapters(client, {"lora2": w}, state.get("adam_w", {}), batches=batches)
        new_state = {
            "lora2": personal.lora2,
            "adam": personal.adam,
            "w": shared.lora2,
            "adam_w": shared.adam,
            **replay,
        }
        return new_state, {"lora2": shared.lora2, "num_samples": client.num_train}
