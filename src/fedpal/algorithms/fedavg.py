"""FedAvg (McMahan et al., 2017): clients train the global model locally; the server takes the
sample-weighted average. The personalized model of every client is the global model."""

from __future__ import annotations

from fedpal.algorithms.base import Algorithm, ClientState, ClientView, Payload, Reply, ServerState
from fedpal.algorithms.registry import register_algorithm
from fedpal.algorithms.training import FitResult, Tensors, clone_tensors, weighted_average


@register_algorithm
class FedAvg(Algorithm):
    name = "fedavg"
    description = "sample-weighted average of locally trained models (McMahan et al., 2017)"
    personalized_is_global = True

    def init_server(self) -> ServerState:
        return {"params": clone_tensors(self.setup.initial_params)}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"params": state["params"]} for cid in client_ids}

    def train_locally(self, client: ClientView, payload: Payload) -> FitResult:
        """The local objective; FedProx overrides this to add its proximal term."""
        return client.fit(payload["params"])

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        result = self.train_locally(client, payload)
        return state, {"params": result.params, "num_samples": client.num_train}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply]) -> ServerState:
        if not replies:
            return state
        items = [(reply["params"], float(reply["num_samples"])) for reply in replies.values()]
        return {**state, "params": weighted_average(items)}

    def personalized_params(self, client: ClientView, state: ClientState, server: ServerState) -> Tensors:
        return server["params"]

    def global_params(self, server: ServerState) -> Tensors | None:
        return server["params"]

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {"params": {k: v.shape for k, v in payload["params"].items()}, "num_samples": int}
