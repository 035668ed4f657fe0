"""The server side shared by every method that keeps one global model: it sends that model to each client, and
replaces it by the mean of the clients' uploaded ``params`` (sample-weighted, or uniform when the method's
hyperparameters say ``weighting = "uniform"``), taken through the engine's one ``reduce``.

FedAvg and its kin, Ditto, APFL and pFedMe differ only on the client (and pFedMe in one server step after the mean),
so they derive from this instead of each repeating it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedpal.algorithms.core.averaging import mean_of_replies
from fedpal.algorithms.core.contract import Algorithm, AlgorithmSetup, Payload, Reduce, Reply, ServerState
from fedpal.common.tensors import Tensors, clone_tensors


class GlobalModelServer(Algorithm):
    """One global model, averaged from the uploaded ``params`` each round."""

    streamed_reply: ClassVar[tuple[str, str | None] | None] = ("params", "num_samples")

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        # the mean's weights; methods whose hyperparameters have no ``weighting`` average by samples
        self.weighting = str(getattr(hp, "weighting", "samples"))
        # The engine's fold must average with the weights ``aggregate`` asks for (an instance attribute shadows the
        # class declaration; written through vars() because mypy forbids assigning a ClassVar).
        declared = type(self).streamed_reply
        if declared is not None:
            vars(self)["streamed_reply"] = (declared[0], "num_samples" if self.weighting == "samples" else None)

    def init_server(self) -> ServerState:
        return {"params": clone_tensors(self.setup.initial_params)}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"params": state["params"]} for cid in client_ids}

    def average(self, state: ServerState, replies: dict[int, Reply], reduce: Reduce) -> Tensors:
        """The mean of the replies' ``params`` with this method's weighting."""
        return mean_of_replies(state, replies, reduce, self.weighting)

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        if not replies:
            return state
        return {**state, "params": self.average(state, replies, reduce)}

    def global_params(self, server: ServerState) -> Tensors | None:
        return server["params"]

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {"params": {k: v.shape for k, v in payload["params"].items()}, "num_samples": int}
