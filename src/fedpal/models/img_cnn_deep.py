"""Image family member 3 of 5: a deeper, wider plain CNN (VGG-like, four 3x3 convolutions).

conv3x3(16) -> ReLU [-> max-pool 2] -> conv3x3(16) -> ReLU -> max-pool 2, conv3x3(32) -> ReLU -> conv3x3(32) -> ReLU
-> max-pool 2, then the spatial map is flattened (no global pooling) and projected to D. Convolutions are padded
("same"). Widths and the bracketed early pool are set by CPU cost: the 108-run HtFL benchmark must fit two cores,
so the pairs run at half and quarter resolution with 16 and 32 channels (about 1.2 MMACs per 28x28 image;
28x28 -> 14 -> 7 -> 4, flat 32 * 4 * 4 = 512). Images smaller than 16
pixels skip it (8x8 -> 4x4 -> 2x2). Pools use ``ceil_mode`` so tiny images never pool down to zero size. No batch
norm: train and eval modes compute the same function and the model has no buffers.
"""

from __future__ import annotations

from torch import nn

from fedpal.models.base import SplitModel
from fedpal.models.projection import check_input_rank, feature_projection, flat_dim, init_relu_convs

WIDTHS = (16, 16, 32, 32)


def build_img_cnn_deep(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int, projection: str = "pool"
) -> SplitModel:
    check_input_rank("img_cnn_deep", input_shape, 3)
    channels, height, _ = input_shape
    pool_after = (0, 1, 3) if height >= 16 else (1, 3)
    layers: list[nn.Module] = []
    in_channels = channels
    for index, width in enumerate(WIDTHS):
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU()]
        if index in pool_after:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        in_channels = width
    trunk = nn.Sequential(*layers, nn.Flatten())
    init_relu_convs(trunk)
    backbone = nn.Sequential(trunk, feature_projection(flat_dim(trunk, input_shape), feature_dim, projection))
    return SplitModel(backbone, feature_dim, num_classes)
