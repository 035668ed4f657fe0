"""Image family member 4 of 5: a small residual network.

stem conv3x3(8) -> ReLU [-> max-pool 2], then three basic blocks of widths 8, 16, 32 with strides 1, 2, 2 (each:
conv3x3 -> ReLU -> conv3x3, plus the input, or a strided 1x1 convolution of it when the shape changes, then ReLU),
adaptive average pooling to 2x2, Flatten (4 * 32 = 128) and the feature projection. There is no normalisation layer
at all — no batch norm, so train and eval modes compute the same function and the model has no buffers; at this depth
plain residual blocks train without one.

The bracketed stem pool (ResNet's own stem downsamples too) is applied to images of 16 pixels or more: it brings the
cost down (28 -> 14 -> 14 -> 7 -> 4); the widths are halved from (16, 32, 64) so that the 108-run HtFL benchmark
fits two cores (about 0.65 MMACs per 28x28 image). Smaller images skip the stem pool (8x8 -> 8 -> 4 -> 2).
"""

from __future__ import annotations

import torch
from torch import nn

from fedpal.models.base import SplitModel
from fedpal.models.projection import check_input_rank, feature_projection, flat_dim, init_relu_convs

STEM = 8
BLOCKS = ((8, 1), (16, 2), (32, 2))  # (width, stride)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 convolution) shortcut; output after the final ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))) + self.shortcut(x))


def build_img_resnet(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int, projection: str = "pool"
) -> SplitModel:
    check_input_rank("img_resnet", input_shape, 3)
    channels, height, _ = input_shape
    layers: list[nn.Module] = [nn.Conv2d(channels, STEM, kernel_size=3, padding=1), nn.ReLU()]
    if height >= 16:
        layers.append(nn.MaxPool2d(2))
    in_channels = STEM
    for width, stride in BLOCKS:
        layers.append(BasicBlock(in_channels, width, stride))
        in_channels = width
    trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
    init_relu_convs(trunk)
    backbone = nn.Sequential(trunk, feature_projection(flat_dim(trunk, input_shape), feature_dim, projection))
    return SplitModel(backbone, feature_dim, num_classes)
