"""A small 1-D CNN for inertial windows [channels, time] (HAR), without batch norm so FedAvg stays exact."""

from __future__ import annotations

from torch import nn

from fedpal.errors import UserError
from fedpal.models.base import SplitModel
from fedpal.models.projection import feature_projection


def build_har_cnn(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int, projection: str = "linear"
) -> SplitModel:
    if len(input_shape) != 2:
        raise UserError(f"model 'har_cnn' needs signal inputs [channels, time], got shape {list(input_shape)}")
    channels = input_shape[0]
    backbone = nn.Sequential(
        nn.Conv1d(channels, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(64, 96, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        *feature_projection(96, feature_dim, projection),
    )
    return SplitModel(backbone, feature_dim, num_classes)
