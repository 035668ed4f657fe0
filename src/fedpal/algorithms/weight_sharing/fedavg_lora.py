"""FedAvg of adapters, FedMosaic's FedAvg baseline: one plain LoRA adapter (lora2 alone, no gate, A and B trained in
every layer) per architecture, averaged over that architecture's clients (unweighted, as the official code), fine-tuned
by each client on its replay store every round. A client's personalized model is its adapter after its latest local
training (the saved client state, as FedMosaic's evaluation reads it); a client that has not trained yet is scored with
its architecture's global adapter."""

from __future__ import annotations

from typing import ClassVar

from fedpal.algorithms.core.contract import ClientState, ClientView, Payload, Reply, ServerState
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.weight_sharing.adapter_averaging import AdapterAveraging
from fedpal.algorithms.weight_sharing.adapter_method import AdapterHyperparameters
from fedpal.common.tensors import Tensors
from fedpal.models.adapters import AdapterPart


@register_algorithm
class FedAvgLoRA(AdapterAveraging):
    name = "fedavg_lora"
    description = "FedAvg of one adapter per architecture on frozen trunks, fine-tuned locally (FedMosaic's FedAvg)"
    Hyperparameters: ClassVar[type] = AdapterHyperparameters
    mixing = "local"
    adapter_layout = "lora"

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return self.configure(state, round, client_ids)

    def init_client(self, client: ClientView) -> ClientState:
        return {"lora2": self.initial_part(client, "lora2")}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        start = payload["lora2"] if "lora2" in payload else state["lora2"]
        batches, replay = self.replay_batches(client, state)
        done = self.train_adapters(client, {"lora2": start}, state.get("adam", {}), batches=batches)
        new_state = {"lora2": done.lora2, "adam": done.adam, **replay}
        return new_state, {"lora2": done.lora2, "num_samples": client.num_train}

    def evaluated_parts(self, client: ClientView, state: ClientState, payload: Payload) -> dict[AdapterPart, Tensors]:
        if "adam" in state or "lora2" not in payload:  # trained (its AdamW state exists) or nothing to score
            return {"lora2": state["lora2"]}
        return {"lora2": payload["lora2"]}
