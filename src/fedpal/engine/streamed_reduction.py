"""Folding a round's replies into the mean as they arrive, so a round holds one running sum, not N replies.

A method whose server only ever averages one reply field, weighted by another (FedAvg: ``params`` by
``num_samples``), declares it (``Algorithm.streamed_reply``). When the run's reducer allows it, the driver adds
that field of each accepted reply to a ``ReplyFold`` in ascending client id order and leaves a ``Folded``
placeholder in the reply; ``aggregate`` runs unchanged, and the reducer, handed the placeholders, returns the
fold's mean after checking that it was asked for exactly the clients and weights that were folded. The numbers are
those of holding every reply (``mean_fold.py``). Anything else that touches a placeholder fails loudly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedpal.common.tensors import Tensors
from fedpal.engine.mean_fold import MeanFold


class ReplyFold:
    """The running mean of one reply field over one round."""

    def __init__(self, value_key: str, weight_key: str | None) -> None:
        self.value_key = value_key
        self.weight_key = weight_key
        self.fold = MeanFold()
        self.weights: dict[int, float] = {}

    def take(self, cid: int, reply: dict[str, Any]) -> dict[str, Any]:
        """Add the reply's field (clients in ascending id order) and return the reply with a placeholder."""
        if self.weights and cid <= max(self.weights):
            raise ValueError("replies must be folded in ascending client id order")
        weight = 1.0 if self.weight_key is None else float(reply[self.weight_key])
        self.fold.add(reply[self.value_key], weight)
        self.weights[cid] = weight
        return {**reply, self.value_key: Folded(self)}

    def mean_for(self, ids: set[int], weights: Mapping[int, float] | None) -> Tensors:
        """The mean, when ``ids`` and ``weights`` are what was folded (clients folded with weight 0 may be left
        out: they added nothing)."""
        positive = {cid for cid, w in self.weights.items() if w != 0}
        if not (positive <= ids <= set(self.weights)):
            raise ValueError("reduce was asked for other clients than the ones whose replies were folded")
        if weights is None and self.weight_key is not None:
            raise ValueError("reduce was asked for a uniform mean of a field folded with weights")
        if weights is not None and any(float(weights[cid]) != self.weights[cid] for cid in ids):
            raise ValueError("reduce was asked for other weights than the ones the replies were folded with")
        return self.fold.mean()


@dataclass(frozen=True)
class Folded:
    """What is left in a reply of a field already added to ``fold``."""

    fold: ReplyFold


def folded_mean(parts: Mapping[int, Any], weights: Mapping[int, float] | None) -> Tensors | None:
    """The fold's mean when ``parts`` are one fold's placeholders; None when none of them is a placeholder."""
    folds = {id(part.fold): part.fold for part in parts.values() if isinstance(part, Folded)}
    if not folds:
        return None
    if len(folds) > 1 or not all(isinstance(part, Folded) for part in parts.values()):
        raise ValueError("reduce cannot mix folded replies with other values")
    (fold,) = folds.values()
    return fold.mean_for(set(parts), weights)
