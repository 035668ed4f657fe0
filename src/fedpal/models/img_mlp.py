"""Image family member 1 of 5: a plain perceptron on the flattened image.

Flatten -> Linear(C*H*W, 256) -> ReLU -> Linear(256, 128) -> ReLU -> feature projection (128 -> D). The widths are
fixed (``hidden_dim`` is ignored) so that every client holding this architecture builds the same network. No batch
norm, so train and eval modes compute the same function and the model has no buffers.
"""

from __future__ import annotations

import math

from torch import nn

from fedpal.models.base import SplitModel
from fedpal.models.projection import check_input_rank, feature_projection

WIDTHS = (256, 128)


def build_img_mlp(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int, projection: str = "pool"
) -> SplitModel:
    check_input_rank("img_mlp", input_shape, 3)
    first, second = WIDTHS
    trunk = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), first),
        nn.ReLU(),
        nn.Linear(first, second),
        nn.ReLU(),
    )
    backbone = nn.Sequential(trunk, feature_projection(second, feature_dim, projection))
    return SplitModel(backbone, feature_dim, num_classes)
