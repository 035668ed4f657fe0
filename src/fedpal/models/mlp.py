"""A two-layer perceptron: the fast model for flattened images and unit tests."""

from __future__ import annotations

import math

from torch import nn

from fedpal.models.base import SplitModel


def build_mlp(input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int) -> SplitModel:
    backbone = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, feature_dim),
        nn.ReLU(),
    )
    return SplitModel(backbone, feature_dim, num_classes)
