"""The weighted mean as a fold: sum w_i * x_i in float64 in a fixed order, then divide by sum w_i and cast back.

Float64 keeps the sum of many clients' small updates accurate, and the order is fixed by the caller (ascending
client id), so the mean is the same whether the values are all held first or added one by one as they arrive.
"""

from __future__ import annotations

import torch

from fedpal.common.tensors import Tensors


class MeanFold:
    """A running weighted sum of parameter sets; ``mean()`` divides by the weights' total."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.total = 0.0

    def add(self, params: Tensors, weight: float) -> None:
        if not self.sums:
            self.dtypes = {k: v.dtype for k, v in params.items()}
            self.sums = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in params.items()}
        elif params.keys() != self.sums.keys():
            raise ValueError("a mean needs the same tensors from every client")
        for k, acc in self.sums.items():
            acc.add_(params[k].detach().to(torch.float64), alpha=weight)
        self.total += weight

    def mean(self) -> Tensors:
        if self.total <= 0:
            raise ValueError("a weighted mean needs a positive total weight")
        return {k: (acc / self.total).to(self.dtypes[k]) for k, acc in self.sums.items()}


def weighted_mean(items: list[tuple[Tensors, float]]) -> Tensors:
    """Sum of w_i * params_i / sum of w_i, accumulated in the given order (no stacking of all replies)."""
    fold = MeanFold()
    for params, weight in items:
        fold.add(params, weight)
    return fold.mean()
