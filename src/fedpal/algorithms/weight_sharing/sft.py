"""SFT, FedMosaic's local baseline: every client fine-tunes its own plain LoRA adapter (lora2 alone, no gate, A and
B trained in every layer, as the official code's ``sft`` mode) on its replay store and nothing travels; the adapter
methods' local training, step-matched (`AdapterMethod`)."""

from __future__ import annotations

from typing import ClassVar

from fedpal.algorithms.core.contract import ClientState, ClientView, Payload, Reduce, Reply, ServerState
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.weight_sharing.adapter_method import AdapterHyperparameters, AdapterMethod


@register_algorithm
class SFT(AdapterMethod):
    name = "sft"
    description = "local fine-tuning of one adapter per client on a frozen trunk, nothing shared (FedMosaic's SFT)"
    Hyperparameters: ClassVar[type] = AdapterHyperparameters
    mixing = "local"
    adapter_layout = "lora"

    def init_server(self) -> ServerState:
        return {}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {} for cid in client_ids}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        return state

    def init_client(self, client: ClientView) -> ClientState:
        return {"lora2": self.initial_part(client, "lora2")}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        batches, replay = self.replay_batches(client, state)
        done = self.train_adapters(client, {"lora2": state["lora2"]}, state.get("adam", {}), batches=batches)
        return {"lora2": done.lora2, "adam": done.adam, **replay}, {}
