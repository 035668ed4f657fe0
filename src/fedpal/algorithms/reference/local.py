"""Local: every client trains its own model on its own data; nothing is communicated.

The lower bound on collaboration and the upper bound on fitting one's own distribution: the reference that a
personalized method must beat on its own clients.
"""

from __future__ import annotations

from fedpal.algorithms.core.contract import Algorithm, ClientState, ClientView, Payload, Reduce, Reply, ServerState
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.common.tensors import Tensors


@register_algorithm
class Local(Algorithm):
    name = "local"
    batched_training = True
    description = "each client trains only on its own data; no communication"
    supports_heterogeneous_models = True

    def init_server(self) -> ServerState:
        return {}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {} for cid in client_ids}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        return state

    def init_client(self, client: ClientView) -> ClientState:
        return {"params": client.own_initial_params()}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        result = client.fit(state["params"])
        return {"params": result.params}, {}

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        return state["params"]
