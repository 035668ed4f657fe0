"""Local: every client trains its own model on its own data; nothing is communicated.

The lower bound on collaboration and the upper bound on fitting one's own distribution: the reference that a
personalized method must beat on its own clients.
"""

from __future__ import annotations

from fedpal.algorithms.base import Algorithm, ClientState, ClientView, Payload, Reply, ServerState
from fedpal.algorithms.registry import register_algorithm
from fedpal.algorithms.training import Tensors, clone_tensors


@register_algorithm
class Local(Algorithm):
    name = "local"
    description = "each client trains only on its own data; no communication"

    def init_server(self) -> ServerState:
        return {}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {} for cid in client_ids}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply]) -> ServerState:
        return state

    def init_client(self, client: ClientView) -> ClientState:
        return {"params": clone_tensors(self.setup.initial_params)}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        result = client.fit(state["params"])
        return {"params": result.params}, {}

    def personalized_params(self, client: ClientView, state: ClientState, server: ServerState) -> Tensors:
        return state["params"]
