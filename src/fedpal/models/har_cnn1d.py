"""HAR family member 1 of 3: a plain 1-D CNN on sensor windows [channels, time].

Three Conv1d layers (32, 64, 64 channels, kernel 5, "same" padding), each followed by ReLU and max-pool 2
(``ceil_mode``, so short windows never pool to zero length; 128 steps -> 16), then the whole map is flattened
(64 * 16 = 1024 for 128 steps) and projected to D. Unlike ``har_cnn`` it keeps the time axis instead of global
pooling. No batch norm: train and eval modes compute the same function and the model has no buffers.
"""

from __future__ import annotations

from torch import nn

from fedpal.models.base import SplitModel
from fedpal.models.projection import check_input_rank, feature_projection, flat_dim, init_relu_convs

WIDTHS = (32, 64, 64)


def build_har_cnn1d(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int, projection: str = "pool"
) -> SplitModel:
    check_input_rank("har_cnn1d", input_shape, 2)
    layers: list[nn.Module] = []
    in_channels = input_shape[0]
    for width in WIDTHS:
        layers += [nn.Conv1d(in_channels, width, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True)]
        in_channels = width
    trunk = nn.Sequential(*layers, nn.Flatten())
    init_relu_convs(trunk)
    backbone = nn.Sequential(trunk, feature_projection(flat_dim(trunk, input_shape), feature_dim, projection))
    return SplitModel(backbone, feature_dim, num_classes)
