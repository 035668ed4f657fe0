"""The one registry of model builders, keyed by the name used in `model.name`."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from fedpal.errors import UserError
from fedpal.models.base import SplitModel
from fedpal.models.cnn import build_cnn
from fedpal.models.har_cnn import build_har_cnn
from fedpal.models.mlp import build_mlp

ModelBuilder = Callable[[tuple[int, ...], int, int, int], SplitModel]

MODELS: dict[str, tuple[ModelBuilder, str]] = {
    "mlp": (build_mlp, "two-layer perceptron on flattened inputs (hidden_dim, feature_dim)"),
    "cnn": (build_cnn, "FedAvgCNN: 2x conv5x5 (32, 64) + max-pool, dense feature (512), linear head"),
    "har_cnn": (build_har_cnn, "1-D CNN for [channels, time] sensor windows (3 conv layers, global pooling)"),
}


def register_model(name: str, builder: ModelBuilder, description: str) -> None:
    """Make a user-defined model available by name."""
    MODELS[name] = (builder, description)


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int
) -> SplitModel:
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown model '{name}'; known: {', '.join(sorted(MODELS))}{hint}")
    builder, _ = MODELS[name]
    return builder(input_shape, num_classes, feature_dim, hidden_dim)
