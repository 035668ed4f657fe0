"""A two-layer perceptron: the fast model for flattened images and unit tests."""

from __future__ import annotations

import math

from torch import nn

from fedpal.models.base import SplitModel
from fedpal.models.projection import feature_projection


def build_mlp(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int, projection: str = "linear"
) -> SplitModel:
    backbone = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden_dim),
        nn.ReLU(),
        *feature_projection(hidden_dim, feature_dim, projection),
    )
    return SplitModel(backbone, feature_dim, num_classes)
