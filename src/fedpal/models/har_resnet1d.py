"""HAR family member 2 of 3: a small 1-D residual network on sensor windows [channels, time].

stem Conv1d(32, kernel 5) -> ReLU, then three basic blocks of widths 32, 64, 64 with strides 1, 2, 2 (each: two
kernel-5 convolutions with a ReLU between, plus the input or a strided 1x1 convolution of it, then ReLU), adaptive
average pooling to 8 time steps, Flatten (64 * 8 = 512) and the feature projection. No normalisation layers — no
batch norm, so train and eval modes compute the same function and the model has no buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpal.models.base import SplitModel
from fedpal.models.projection import check_input_rank, feature_projection, flat_dim, init_relu_convs

STEM = 32
BLOCKS = ((32, 1), (64, 2), (64, 2))  # (width, stride)
KERNEL = 5
POOLED_STEPS = 8


class BasicBlock1d(nn.Module):
    """Two 1-D convolutions with an identity (or 1x1 convolution) shortcut; output after the final ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        pad = KERNEL // 2
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size=KERNEL, stride=stride, padding=pad)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size=KERNEL, padding=pad)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv1d(in_channels, out_channels, kernel_size=1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))) + self.shortcut(x))


def build_har_resnet1d(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int, projection: str = "pool"
) -> SplitModel:
    check_input_rank("har_resnet1d", input_shape, 2)
    layers: list[nn.Module] = [nn.Conv1d(input_shape[0], STEM, kernel_size=KERNEL, padding=KERNEL // 2), nn.ReLU()]
    in_channels = STEM
    for width, stride in BLOCKS:
        layers.append(BasicBlock1d(in_channels, width, stride))
        in_channels = width
    trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool1d(POOLED_STEPS), nn.Flatten())
    init_relu_convs(trunk)
    backbone = nn.Sequential(trunk, feature_projection(flat_dim(trunk, input_shape), feature_dim, projection))
    return SplitModel(backbone, feature_dim, num_classes)
