"""The one registry of model builders, keyed by the name used in `model.name`.

A builder is called as ``builder(input_shape, num_classes, feature_dim, hidden_dim, projection)`` where
``projection`` names the last backbone step (see `fedpal.models.projection`: "linear" or "pool"). Builders written
before that argument existed take only the first four; `build_model` still calls them that way when
``projection`` is "linear", which is what every four-argument builder in fedpal amounted to.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from fedpal.errors import UserError
from fedpal.models.base import SplitModel
from fedpal.models.char_lstm import build_char_lstm
from fedpal.models.cnn import build_cnn
from fedpal.models.har_cnn import build_har_cnn
from fedpal.models.har_cnn1d import build_har_cnn1d
from fedpal.models.har_gru import build_har_gru
from fedpal.models.har_resnet1d import build_har_resnet1d
from fedpal.models.hart import build_hart, build_hart_alp
from fedpal.models.img_cnn4 import build_img_cnn4
from fedpal.models.img_cnn_deep import build_img_cnn_deep
from fedpal.models.img_dsconv import build_img_dsconv
from fedpal.models.img_mlp import build_img_mlp
from fedpal.models.img_resnet import build_img_resnet
from fedpal.models.mlp import build_mlp
from fedpal.models.mosaic_trunk import build_mosaic_large, build_mosaic_small
from fedpal.models.projection import check_projection

# (input_shape, num_classes, feature_dim, hidden_dim[, projection]) -> SplitModel
ModelBuilder = Callable[..., SplitModel]

MODELS: dict[str, tuple[ModelBuilder, str]] = {
    "mlp": (build_mlp, "two-layer perceptron on flattened inputs (hidden_dim, feature_dim)"),
    "cnn": (build_cnn, "FedAvgCNN: 2x conv5x5 (32, 64) + max-pool, dense feature (512), linear head"),
    "har_cnn": (build_har_cnn, "1-D CNN for [channels, time] sensor windows (3 conv layers, global pooling)"),
    "img_mlp": (build_img_mlp, "image perceptron: flatten, dense 256, dense 128, projection"),
    "img_cnn4": (build_img_cnn4, "thin FedAvgCNN: 2x conv5x5 (16, 32) + max-pool, dense 256, projection"),
    "img_cnn_deep": (
        build_img_cnn_deep,
        "plain CNN: 4x conv3x3 (16, 16, 32, 32), max-pool after 1, 2 and 4, projection",
    ),
    "img_resnet": (
        build_img_resnet,
        "small ResNet: stem 8 + max-pool, 3 basic blocks (8, 16, 32), pool 2x2, projection",
    ),
    "img_dsconv": (
        build_img_dsconv,
        "MobileNet-style: stride-2 stem 16, 3 depthwise-separable blocks (24, 48, 64), projection",
    ),
    "har_cnn1d": (build_har_cnn1d, "1-D CNN for [channels, time]: 3x conv k5 (32, 64, 64) + max-pool, projection"),
    "har_resnet1d": (build_har_resnet1d, "1-D ResNet: stem 32, 3 basic blocks (32, 64, 64), pool 8 steps, projection"),
    "har_gru": (build_har_gru, "GRU(64) over time for [channels, time]: last + mean hidden state, projection"),
    "hart": (
        build_hart,
        "HART transformer for [6, T] IMU windows: sensor-wise patches, per-sensor attention + liteFormer conv "
        "(model.width, model.blocks)",
    ),
    "hart_alp": (
        build_hart_alp,
        "HART with an ALP prototype layer after each block's first LayerNorm (FedAli; model.bank_sizes)",
    ),
    "char_lstm": (
        build_char_lstm,
        "LEAF's character LSTM for [length] character ids: embedding 8, 2-layer LSTM (model.hidden_dim), last step, "
        "projection",
    ),
    "mosaic_small": (
        build_mosaic_small,
        "FedMosaic's small trunk: pre-norm transformer, 2 blocks x width 64, tokenizer picked by the input shape "
        "(images, [6, T] IMU windows, character ids), pooled tokens, projection",
    ),
    "mosaic_large": (
        build_mosaic_large,
        "FedMosaic's large trunk: pre-norm transformer, 4 blocks x width 128, same tokenizers as mosaic_small, "
        "projection",
    ),
}


def register_model(name: str, builder: ModelBuilder, description: str) -> None:
    """Make a user-defined model available by name."""
    MODELS[name] = (builder, description)


def _takes_options(builder: ModelBuilder) -> bool:
    try:
        return "options" in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


def _takes_projection(builder: ModelBuilder) -> bool:
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: assume the current convention
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return True
    return sum(p.kind in positional for p in parameters) >= 5


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    feature_dim: int,
    hidden_dim: int,
    projection: str = "linear",
    options: Mapping[str, Any] | None = None,
) -> SplitModel:
    """Build a registered model; ``options`` (model-specific settings such as HART's width) reach only builders
    that declare an ``options`` keyword."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown model '{name}'; known: {', '.join(sorted(MODELS))}{hint}")
    check_projection(projection)
    builder, _ = MODELS[name]
    if _takes_options(builder):
        return builder(input_shape, num_classes, feature_dim, hidden_dim, projection, options=options)
    if _takes_projection(builder):
        return builder(input_shape, num_classes, feature_dim, hidden_dim, projection)
    if projection != "linear":
        raise UserError(f"model '{name}' takes no feature projection; only 'linear' (its own final layer) applies")
    return builder(input_shape, num_classes, feature_dim, hidden_dim)
