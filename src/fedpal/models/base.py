"""The split every fedpal model follows, so prototype methods can read features and swap heads."""

from __future__ import annotations

from typing import Any

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

    def features(self, x: torch.Tensor, **options: Any) -> torch.Tensor:
        return self.backbone(x, **options)

    def forward(self, x: torch.Tensor, **options: Any) -> torch.Tensor:
        """``options``: per-call keyword arguments of the backbone (e.g. ``alp`` for HART with ALP layers)."""
        return self.head(self.backbone(x, **options))
