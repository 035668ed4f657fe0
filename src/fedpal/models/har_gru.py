"""HAR family member 3 of 3: a recurrent model on sensor windows [channels, time].

The window is transposed to [time, channels] and read by a one-layer GRU (hidden size 64, batch-first). The feature
is ReLU(concat(last hidden state, mean hidden state over time)) — 128 values — then the projection to D. The ReLU is
a choice made here, not part of a textbook GRU: GRU states lie in (-1, 1), and every other fedpal backbone hands the
projection non-negative activations, so with it the parameter-free "pool" projection gives non-negative features for
every architecture (prototypes of different clients then live in the same orthant). With "pool" and D > 128 the
pooling repeats values (see `fedpal.models.projection`). No batch norm, no buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpal.models.base import SplitModel
from fedpal.models.projection import check_input_rank, feature_projection

HIDDEN = 64


class GRUSummary(nn.Module):
    """[B, C, T] -> ReLU([h_T, mean_t h_t]) of shape [B, 2 * hidden]."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(channels, hidden, num_layers=1, batch_first=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, last = self.gru(x.transpose(1, 2))
        return self.relu(torch.cat([last[-1], states.mean(dim=1)], dim=1))


def build_har_gru(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int, projection: str = "pool"
) -> SplitModel:
    check_input_rank("har_gru", input_shape, 2)
    trunk = GRUSummary(input_shape[0], HIDDEN)
    backbone = nn.Sequential(trunk, feature_projection(2 * HIDDEN, feature_dim, projection))
    return SplitModel(backbone, feature_dim, num_classes)
