"""LEAF's character LSTM for next-character prediction (Shakespeare), in fedpal's backbone -> feature -> head form.

Character ids [B, T] (int64) are embedded in 8 dimensions, read by a 2-layer LSTM (batch-first, ``hidden_dim`` units;
LEAF uses 256), and the top layer's output at the last step summarises the window. The feature projection then maps
it to D and the linear head scores every symbol of the vocabulary. With ``model.projection = "pool"`` and
``feature_dim == hidden_dim`` the projection is the identity, and the network is exactly LEAF's (embedding, LSTM,
linear layer on the last output); the default "linear" projection adds Linear + ReLU, like every fedpal backbone.
The vocabulary is the label set (``num_classes``): input and output symbols are the same characters.
No buffers and no dropout, so FedAvg of the parameters is the whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpal.errors import UserError
from fedpal.models.base import SplitModel
from fedpal.models.projection import feature_projection

EMBEDDING_DIM = 8
LAYERS = 2


class CharLSTM(nn.Module):
    """[B, T] character ids -> the top LSTM layer's output at the last step, [B, hidden]."""

    def __init__(self, vocabulary: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, EMBEDDING_DIM)
        self.lstm = nn.LSTM(EMBEDDING_DIM, hidden, num_layers=LAYERS, batch_first=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(self.embedding(ids))
        return outputs[:, -1]


def build_char_lstm(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, hidden_dim: int, projection: str = "linear"
) -> SplitModel:
    if len(input_shape) != 1:
        raise UserError(f"model 'char_lstm' needs sequences of character ids [length], got shape {list(input_shape)}")
    trunk = CharLSTM(num_classes, hidden_dim)
    backbone = nn.Sequential(trunk, feature_projection(hidden_dim, feature_dim, projection))
    return SplitModel(backbone, feature_dim, num_classes)
