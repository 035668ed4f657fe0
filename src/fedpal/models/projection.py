"""The last step of every backbone: map the flattened penultimate activations [B, in_dim] to the feature [B, D].

Heterogeneous-model FL (HtFL) needs every client's feature to have the same size D, whatever the architecture,
so prototypes and heads can be compared or shared. Two ways to get there:

* ``"pool"`` — the HtFLlib convention: the classifier ``fc`` is replaced by ``AdaptiveAvgPool1d(D)`` over the
  flattened activation vector. It has no learnable parameters. Each output is the mean of a contiguous slice of the
  input, so features that follow a ReLU stay non-negative. When ``in_dim < D`` the pooling windows overlap and
  input values are repeated (e.g. 128 -> 256 copies each value twice); that is allowed, the feature just carries no
  more information than the ``in_dim`` activations.
* ``"linear"`` — ``nn.Linear(in_dim, D)`` followed by ``nn.ReLU()``: learnable, and what fedpal's original models
  (mlp, cnn, har_cnn) always used.

`feature_projection` returns an ``nn.Sequential`` so a builder can either nest it as one module or splice its
layers into its own ``nn.Sequential`` (``nn.Sequential(*layers, *feature_projection(...))``); the original models
splice, which keeps their parameter names (``backbone.3.weight`` ...) exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpal.errors import UserError

PROJECTIONS: dict[str, str] = {
    "pool": "parameter-free AdaptiveAvgPool1d(D) over the flattened activations (HtFLlib)",
    "linear": "Linear(in_dim, D) + ReLU",
}


class FlatAdaptiveAvgPool(nn.Module):
    """``AdaptiveAvgPool1d(out_dim)`` applied to a [B, in_dim] tensor as if it were one channel of length in_dim."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.pool = nn.AdaptiveAvgPool1d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x.unsqueeze(1)).squeeze(1)

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}"


def check_projection(mode: str) -> None:
    """Raise a one-line UserError unless ``mode`` is a known projection."""
    if mode not in PROJECTIONS:
        raise UserError(f"unknown feature projection '{mode}'; choose one of: {', '.join(PROJECTIONS)}")


def feature_projection(in_dim: int, feature_dim: int, mode: str) -> nn.Sequential:
    """The module taking flattened activations [B, in_dim] to features [B, feature_dim] (see the module docstring)."""
    check_projection(mode)
    if mode == "pool":
        return nn.Sequential(FlatAdaptiveAvgPool(feature_dim))
    return nn.Sequential(nn.Linear(in_dim, feature_dim), nn.ReLU())


def flat_dim(trunk: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Width of ``trunk``'s flattened output for one input of ``input_shape`` (a dummy forward, no gradients)."""
    with torch.no_grad():
        return int(trunk(torch.zeros(1, *input_shape)).reshape(1, -1).shape[1])


def check_input_rank(model: str, input_shape: tuple[int, ...], rank: int) -> None:
    """One-line UserError unless inputs are images [C, H, W] (rank 3) or signals [channels, time] (rank 2)."""
    if len(input_shape) != rank:
        kind = "image inputs [C, H, W]" if rank == 3 else "signal inputs [channels, time]"
        raise UserError(f"model '{model}' needs {kind}, got shape {list(input_shape)}")


def init_relu_convs(module: nn.Module) -> None:
    """He (Kaiming) normal initialisation for every Conv1d/Conv2d in ``module``, with zero biases.

    PyTorch's default convolution initialisation shrinks the activation variance by about 6x per conv + ReLU layer;
    with batch norm that does not matter, but these backbones have none, so a stack of four to seven convolutions
    would start with near-constant features and barely train. He initialisation keeps the variance level instead.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv1d | nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
