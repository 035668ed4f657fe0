"""The 4-layer image CNN that PFLlib calls FedAvgCNN (McMahan et al.'s MNIST CNN).

Two 5x5 convolutions with 32 and 64 channels, each followed by ReLU and 2x2 max-pooling, a dense layer to the
feature (512 units by default), then the linear head. Inputs smaller than 16 pixels (scikit-learn digits, 8x8)
get padding 2 on each convolution so the two pooling stages still fit; 28x28 inputs use none, as in PFLlib.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpal.errors import UserError
from fedpal.models.base import SplitModel
from fedpal.models.projection import feature_projection


def build_cnn(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int, projection: str = "linear"
) -> SplitModel:
    if len(input_shape) != 3:
        raise UserError(f"model 'cnn' needs image inputs [C, H, W], got shape {list(input_shape)}")
    channels, height, _ = input_shape
    padding = 2 if height < 16 else 0
    convs = nn.Sequential(
        nn.Conv2d(channels, 32, kernel_size=5, padding=padding),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=padding),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        flat = convs(torch.zeros(1, *input_shape)).shape[1]
    backbone = nn.Sequential(convs, *feature_projection(flat, feature_dim, projection))
    return SplitModel(backbone, feature_dim, num_classes)
