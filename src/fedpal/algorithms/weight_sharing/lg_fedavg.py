"""LG-FedAvg (Liang et al., 2020, "Think Locally, Act Globally"), as in HtFLlib: only the heads are federated.

Every architecture ends in the same Linear(D -> C) head, so heads can be averaged across different backbones while
each backbone stays personal: the backbones fit local data, the shared head keeps one decision rule over a common
feature space, which pulls the personal feature extractors toward compatible representations.

HtFLlib (`clientlg.py`, `serverlg.py`): the server starts from client 0's head; every round each client loads the
global head into its own model, trains the whole model with cross-entropy, and uploads its head; the server
takes the sample-weighted mean (``uploaded_weights`` = train samples / total). The global head is sent to all
clients *before* evaluation, so the evaluated model is the client's own backbone with the latest global head.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpal.algorithms.core.contract import Algorithm, ClientState, ClientView, Payload, Reduce, Reply, ServerState
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.common.tensors import Tensors, clone_tensors

HEAD_PREFIX = "head."


def head_of(params: Tensors) -> Tensors:
    """The head tensors ("head.*") of a full parameter set."""
    return {k: v for k, v in params.items() if k.startswith(HEAD_PREFIX)}


@dataclass(frozen=True)
class LGFedAvgHyperparameters:
    shuffle_train: bool = False  # HtFLlib's train loader is unshuffled (fixed order every epoch)
    drop_last: bool = True  # HtFLlib's train loader drops the last partial batch (a lone partial batch is kept)


@register_algorithm
class LGFedAvg(Algorithm):
    name = "lg_fedavg"
    streamed_reply = ("head", "num_samples")
    batched_training = True
    description = "personal backbones, sample-weighted average of the shared heads (Liang et al., 2020)"
    Hyperparameters = LGFedAvgHyperparameters
    supports_heterogeneous_models = True

    def init_server(self) -> ServerState:
        return {"head": clone_tensors(head_of(self.setup.initial_params))}  # client 0's initial head

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"head": state["head"]} for cid in client_ids}

    def init_client(self, client: ClientView) -> ClientState:
        return {"params": client.own_initial_params()}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        start = {**state["params"], **payload["head"]}
        result = client.fit(start, shuffle=self.hp.shuffle_train, drop_last=self.hp.drop_last)
        return {"params": result.params}, {"head": head_of(result.params), "num_samples": client.num_train}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        usable = {cid: r for cid, r in replies.items() if r["num_samples"] > 0}
        if not usable:
            return state
        heads = {cid: r["head"] for cid, r in usable.items()}
        weights = {cid: float(r["num_samples"]) for cid, r in usable.items()}
        return {**state, "head": reduce(heads, weights, reference=state["head"])}

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return self.configure(state, round, client_ids)  # HtFLlib sends the global head before evaluating

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        return {**state["params"], **payload["head"]}

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {"head": {k: v.shape for k, v in payload["head"].items()}, "num_samples": int}
