"""FedDPA (Yang et al., 2024, "Dual-Personalizing Adapter for Federated Foundation Models") as FedMosaic's official
code runs it (``federated_methods/feddpa.py``): two plain LoRA adapters in every layer, a global one (lora1) that is
averaged across the architecture's clients and a local one (lora2) that never leaves the client, mixed evenly
(W0 x + (Ad1(x) + Ad2(x)) / 2) with no gate.

A round on a client: start lora1 from the architecture's mean the server sent (the client's own before the first
mean exists), train it alone (W0 x + Ad1(x)) for the first half of the steps; then freeze it and train lora2 in the
even mix for the rest. lora1 goes up; the server's new mean is the plain mean of the uploads (`AdapterAveraging`).
The personalized model is the saved state (the lora1 the client trained this round and its lora2) in the even mix.

FedDPA's paper also weighs the two adapters per test input by similarity; the FedMosaic code, which is what
FedMosaic is compared against, evaluates with the fixed even mix, and so does this baseline."""

from __future__ import annotations

from typing import ClassVar

from fedpal.algorithms.core.contract import ClientState, ClientView, Payload, Reply, ServerState
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.weight_sharing.adapter_averaging import AdapterAveraging
from fedpal.algorithms.weight_sharing.adapter_method import AdapterHyperparameters
from fedpal.common.tensors import Tensors
from fedpal.models.adapters import AdapterPart


@register_algorithm
class FedDPA(AdapterAveraging):
    name = "feddpa"
    description = "a global and a local LoRA adapter mixed evenly; the global one trained first and averaged (FedDPA)"
    Hyperparameters: ClassVar[type] = AdapterHyperparameters
    mixing = "mean"
    adapter_layout = "lora"
    payload_key = "lora1"  # the architecture's mean is the client's starting global adapter
    upload_key = "lora1"

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {} for cid in client_ids}

    def init_client(self, client: ClientView) -> ClientState:
        return {"lora1": self.initial_part(client, "lora1"), "lora2": self.initial_part(client, "lora2")}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        start = dict(payload["lora1"]) if "lora1" in payload else state["lora1"]
        global_steps = self.hp.local_steps // 2
        batches, replay = self.replay_batches(client, state)  # priority draws: the first half, then the rest
        # lora1 alone is W0 x + Ad(x) with lora1's tensors: trained in the lora2 slot of the "local" mixing
        shared = self.train_adapters(
            client,
            {"lora2": start},
            state.get("adam_global", {}),
            purpose="train_global",
            mixing="local",
            steps=global_steps,
            batches=None if batches is None else batches[:global_steps],
        )
        parts: dict[AdapterPart, Tensors] = {"lora1": shared.lora2, "lora2": state["lora2"]}
        local = self.train_adapters(
            client,
            parts,
            state.get("adam", {}),
            steps=self.hp.local_steps - global_steps,
            batches=None if batches is None else batches[global_steps:],
        )
        new_state = {
            "lora1": shared.lora2,
            "lora2": local.lora2,
            "adam_global": shared.adam,
            "adam": local.adam,
            **replay,
        }
        return new_state, {"lora1": shared.lora2, "num_samples": client.num_train}

    def evaluated_parts(self, client: ClientView, state: ClientState, payload: Payload) -> dict[AdapterPart, Tensors]:
        return {"lora1": state["lora1"], "lora2": state["lora2"]}
