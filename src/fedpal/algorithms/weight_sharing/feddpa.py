"""A FedDPA-style dual-adapter baseline (after Yang et al., 2024, "Dual-Personalizing Adapter for Federated
Foundation Models"), as FedMosaic's comparison uses it: the same gated dual adapters as FedMosaic, but the global
adapter lora1 is the plain sample-weighted average of every client's lora2 within its architecture (the client's own
included, last round's uploads), with no relevance weighting and no sharing across architectures. The client trains
lora2 and the gate (`AdapterMethod`) and uploads lora2; the personalized model is its saved state run gated.

FedDPA itself trains its global adapter locally before averaging it; here, as in the spec's "dual-adapter baseline
with plain averaging", the global adapter is built from the local adapters, so the comparison with FedMosaic
isolates RELA and Co-LoRA."""

from __future__ import annotations

from typing import ClassVar

from fedpal.algorithms.core.contract import ClientState, ClientView, Payload, Reply, ServerState
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.relevance import first_round_global
from fedpal.algorithms.weight_sharing.adapter_averaging import AdapterAveraging
from fedpal.algorithms.weight_sharing.adapter_method import AdapterHyperparameters
from fedpal.common.tensors import Tensors
from fedpal.models.adapters import AdapterPart


@register_algorithm
class FedDPA(AdapterAveraging):
    name = "feddpa"
    description = "gated dual adapters, the global one the plain per-architecture mean of the local ones (FedDPA-style)"
    Hyperparameters: ClassVar[type] = AdapterHyperparameters
    mixing = "gated"
    payload_key = "lora1"  # the architecture's mean adapter is the client's frozen global adapter

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {} for cid in client_ids}

    def init_client(self, client: ClientView) -> ClientState:
        lora2 = self.initial_part(client, "lora2")
        return {"lora2": lora2, "lora1": first_round_global(lora2), "gate": self.initial_part(client, "gate")}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        lora1 = dict(payload["lora1"]) if "lora1" in payload else first_round_global(state["lora2"])
        parts: dict[AdapterPart, Tensors] = {"lora1": lora1, "lora2": state["lora2"], "gate": state["gate"]}
        done = self.train_adapters(client, parts, state.get("adam", {}))
        new_state = {"lora1": lora1, "lora2": done.lora2, "gate": done.gate, "adam": done.adam}
        return new_state, {"lora2": done.lora2, "num_samples": client.num_train}
