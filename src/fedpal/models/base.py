"""The split every fedpal model follows, so prototype methods can read features and swap heads."""

from __future__ import annotations

import torch
from torch import nn


class SplitModel(nn.Module):
    """backbone(x) -> feature of size ``feature_dim`` -> head (a linear classifier)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
