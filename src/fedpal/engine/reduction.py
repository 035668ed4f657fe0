"""The engine's one reduction point: every average of client values in every method goes through here.

Methods receive a ``reduce`` callable in ``aggregate`` (see ``fedpal.algorithms.core.contract.Reduce``); the
engine configures it once per run, so a robust aggregator, clipping or noise added here acts for all methods.
Today's reducer is the weighted mean (sample-weighted when the method passes sample counts).

The mean is a fold (``mean_fold.py``): sum w_i * x_i in float64, client by client in ascending id order, then
divide by sum w_i and cast back. The order is fixed, so the result is the same whether the replies are all held
(``weighted_mean``) or folded one by one as they arrive (``streamed_reduction.py``), which keeps a round's memory
flat in the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedpal.algorithms.core.contract import ReduceKind
from fedpal.common.tensors import Tensors
from fedpal.engine.mean_fold import MeanFold
from fedpal.engine.streamed_reduction import folded_mean


def weighted_mean(items: list[tuple[Tensors, float]]) -> Tensors:
    """Sum of w_i * params_i / sum of w_i, accumulated in the given order (no stacking of all replies)."""
    fold = MeanFold()
    for params, weight in items:
        fold.add(params, weight)
    return fold.mean()


class MeanReducer:
    """The default reducer: the weighted mean over clients in ascending id order (uniform without weights).

    ``streams``: the driver may fold a method's declared reply field as replies arrive (``streamed_reduction``);
    the reducer then returns that fold's mean when ``aggregate`` asks for it. A reducer that needs every reply at
    once (a median, a trimmed mean) says False.
    """

    streams = True

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}  # how many reductions of each kind ran (for tests and diagnostics)

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        *,
        kind: ReduceKind = "update",
        reference: Tensors | None = None,
    ) -> Tensors:
        if not parts:
            raise ValueError("nothing to reduce")
        if weights is not None and set(weights) != set(parts):
            raise ValueError("reduce: weights must name exactly the clients of parts")
        self.calls[kind] = self.calls.get(kind, 0) + 1
        folded = folded_mean(parts, weights)
        if folded is not None:
            return folded
        ids = sorted(parts)
        return weighted_mean([(parts[c], 1.0 if weights is None else float(weights[c])) for c in ids])
