"""FedAvg (McMahan et al., 2017): clients train the global model locally; the server takes the
sample-weighted average.

Which model counts as a client's personalized model is a convention that changes reported numbers, so it is an
option (``evaluate``): ``"global"`` (default) is the global model; ``"post_local"`` is the model the client holds
right after its latest local training, which is how FedAli's code (Ek et al., 2024) evaluates every baseline.
A client that has not trained yet is evaluated on the global model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from fedpal.algorithms.core.contract import (
    AlgorithmSetup,
    ClientState,
    ClientView,
    Payload,
    Reply,
    ServerState,
)
from fedpal.algorithms.core.global_model import GlobalModelServer
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import FitResult
from fedpal.common.tensors import Tensors

EvaluateMode = Literal["global", "post_local"]


@dataclass(frozen=True)
class FedAvgHyperparameters:
    # personalized model: "global" (the global model) or "post_local" (the client's model after its latest training)
    evaluate: EvaluateMode = "global"


def evaluate_mode(hp: Any) -> str:
    """The ``evaluate`` option; "global" for subclasses whose hyperparameters lack it (FedAvg-FT)."""
    return str(getattr(hp, "evaluate", "global"))


@register_algorithm
class FedAvg(GlobalModelServer):
    name = "fedavg"
    streamed_reply = ("params", "num_samples")
    batched_training = True
    description = "sample-weighted average of locally trained models (McMahan et al., 2017)"
    Hyperparameters: ClassVar[type] = FedAvgHyperparameters
    personalized_is_global = True

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        self.evaluate_mode = evaluate_mode(hp)
        if self.evaluate_mode == "post_local":
            # Each client then has its own model, so the evaluator must ask every client: an instance attribute
            # shadows the class flag (written through vars() because mypy forbids assigning a ClassVar).
            vars(self)["personalized_is_global"] = False

    @property
    def keeps_local_model(self) -> bool:
        """Whether a client keeps its freshly trained model in its state (MOON always does)."""
        return self.evaluate_mode == "post_local"

    def train_locally(self, client: ClientView, payload: Payload, state: ClientState | None = None) -> FitResult:
        """The local objective; FedProx and MOON override this to add their terms."""
        return client.fit(payload["params"])

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        result = self.train_locally(client, payload, state)
        if self.keeps_local_model:
            state = {**state, "params": result.params}
        return state, {"params": result.params, "num_samples": client.num_train}

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"params": state["params"]} for cid in client_ids}

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        if self.evaluate_mode == "post_local" and "params" in state:
            return state["params"]
        return payload["params"]
