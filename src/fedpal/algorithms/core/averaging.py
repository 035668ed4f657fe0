"""The server average most weight-sharing methods take: the mean of the replies' ``params``, through the engine's
``reduce`` (so a robust reducer acts on it), weighted by the clients' training samples or uniform."""

from __future__ import annotations

from fedpal.algorithms.core.contract import Reduce, Reply, ServerState
from fedpal.common.tensors import Tensors


def mean_of_replies(
    state: ServerState, replies: dict[int, Reply], reduce: Reduce, weighting: str = "samples"
) -> Tensors:
    """The mean of the replies' ``params`` through the engine's ``reduce``: sample-weighted, or uniform."""
    params = {cid: reply["params"] for cid, reply in replies.items()}
    weights = {cid: float(r["num_samples"]) for cid, r in replies.items()} if weighting == "samples" else None
    return reduce(params, weights, reference=state["params"])
