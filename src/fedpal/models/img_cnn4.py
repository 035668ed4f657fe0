"""Image family member 2 of 5: the 4-layer FedAvgCNN shape, thinned for CPU.

conv5x5(16) -> ReLU -> max-pool 2, conv5x5(32) -> ReLU -> max-pool 2, Flatten, Linear(flat, 256) -> ReLU, then the
feature projection (256 -> D). fedpal's ``cnn`` uses 32/64 channels and a 512-unit dense layer; this one halves them.
Images smaller than 16 pixels get padding 2 on both convolutions so the two pooling stages still fit (8x8 -> 2x2).
No batch norm: train and eval modes compute the same function and the model has no buffers.
"""

from __future__ import annotations

from torch import nn

from fedpal.models.base import SplitModel
from fedpal.models.projection import check_input_rank, feature_projection, flat_dim, init_relu_convs

DENSE = 256


def build_img_cnn4(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int, projection: str = "pool"
) -> SplitModel:
    check_input_rank("img_cnn4", input_shape, 3)
    channels, height, _ = input_shape
    padding = 2 if height < 16 else 0
    convs = nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=5, padding=padding),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=5, padding=padding),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    trunk = nn.Sequential(convs, nn.Linear(flat_dim(convs, input_shape), DENSE), nn.ReLU())
    init_relu_convs(trunk)
    backbone = nn.Sequential(trunk, feature_projection(DENSE, feature_dim, projection))
    return SplitModel(backbone, feature_dim, num_classes)
