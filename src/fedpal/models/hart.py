"""HART (Ek et al., "Lightweight transformers for human activity recognition on mobile devices"), the backbone
FedAli uses, for [6, T] inertial windows (acc x/y/z then gyro x/y/z), with optional ALP layers (`hart_alp`).

Layout, after the official Keras model (getalp/FedAli ``model.py``/``alp_model.py``):

* sensor-wise patches: frames of 16 samples, one Conv1d(3 -> w/2, kernel 16, stride 16) per sensor (a Dense on
  each flattened frame), concatenated to width w, plus a learned position embedding -> Z = T/16 tokens;
* each block: h = LN(x) -> [ALP(h)] -> three branches on channel slices: accelerometer self-attention on
  [0, w/4), a "liteFormer" depthwise convolution with 4 softmax-normalised kernels on [w/4, 3w/4), gyroscope
  self-attention on [3w/4, w) -> concatenated and added to **x** (the pre-norm input, not the ALP output) ->
  LN -> MLP w -> 2w (swish) -> w, with dropout and drop-path;
* head: LN -> mean over tokens -> Dense(feature_dim, swish) -> dropout 0.5 = the feature; a linear classifier.

The attention branches follow Keras' MultiHeadAttention: 3 heads, each of key size w/4 (heads do not split the
width). Kernel lengths are the first ``blocks`` entries of the paper's 3, 7, 15, 31, 31, 31.

``hart_quirks=True`` reproduces two oddities of the official liteFormer literally: in every training call it
overwrites its kernels by their softmax and convolves with the stored values (inference uses them as stored),
and it reshapes its (B, Z, C) input row-major to (-1, 4, Z) and its stacked per-head outputs back to (B, Z, C),
so the "convolution" runs over runs of Z consecutive channels and the output rows of one window are built from
other windows of the batch. The default (False) applies the softmax functionally and convolves along time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.errors import UserError
from fedpal.models.alp import ALPLayer, ALPSettings
from fedpal.models.base import SplitModel

PATCH = 16
KERNELS = (3, 7, 15, 31, 31, 31)
ATTENTION_HEADS = 3
CONV_HEADS = 4


class DropPath(nn.Module):
    """Drops a whole residual branch per sample in training (stochastic depth), rescaling the kept ones."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.floor(keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device))
        return x / keep * mask


class SensorAttention(nn.Module):
    """Self-attention over the tokens of one channel slice; each head has key size = the slice width (Keras)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.key_size = width
        self.qkv = nn.Linear(width, 3 * heads * width)
        self.out = nn.Linear(heads * width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, z, _ = x.shape
        q, k, v = self.qkv(x).view(b, z, 3, self.heads, self.key_size).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(attended.transpose(1, 2).reshape(b, z, self.heads * self.key_size))


class LiteConv(nn.Module):
    """liteFormer: depthwise convolution with ``heads`` softmax-normalised kernels shared by channel groups."""

    def __init__(self, channels: int, kernel: int, heads: int = CONV_HEADS, quirks: bool = False) -> None:
        super().__init__()
        if channels % heads:
            raise UserError(f"HART's convolution branch needs a width divisible by {heads}, got {channels}")
        self.channels, self.heads, self.kernel, self.quirks = channels, heads, kernel, quirks
        limit = (6.0 / (2 * kernel)) ** 0.5  # Keras glorot_uniform on a (kernel, 1, 1) weight
        self.weight = nn.Parameter(torch.empty(heads, 1, kernel).uniform_(-limit, limit))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, z, c = x.shape
        if self.quirks:
            if self.training:
                with torch.no_grad():
                    self.weight.copy_(torch.softmax(self.weight, dim=-1))
            rows = x.reshape(-1, self.heads, z)
            out = F.conv1d(rows, self.weight, padding=self.kernel // 2, groups=self.heads)
            return out.transpose(0, 1).reshape(b, z, c)
        # A "same" convolution along Z tokens is a product with a banded Z x Z (Toeplitz) matrix per head:
        # band[h, t, s] = w_h[s - t + k // 2]. For Z = 8 tokens that is far cheaper than a grouped conv1d.
        band = self.toeplitz(torch.softmax(self.weight[:, 0], dim=-1), z)  # [H, Z, Z]
        grouped = x.view(b, z, self.heads, c // self.heads)
        return torch.einsum("hts,bshc->bthc", band, grouped).reshape(b, z, c)

    def toeplitz(self, kernels: torch.Tensor, z: int) -> torch.Tensor:
        steps = torch.arange(z, device=kernels.device)
        offset = steps.view(1, z) - steps.view(z, 1) + self.kernel // 2  # s - t + k // 2
        inside = (offset >= 0) & (offset < self.kernel)
        return kernels[:, offset.clamp(0, self.kernel - 1)] * inside


class HartBlock(nn.Module):
    def __init__(self, width: int, kernel: int, drop_path: float, dropout: float, bank_size: int, quirks: bool) -> None:
        super().__init__()
        quarter = width // 4
        self.slices = (quarter, quarter + width // 2)
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.alp = ALPLayer(width, bank_size) if bank_size > 0 else None
        self.acc_attention = SensorAttention(quarter, ATTENTION_HEADS, dropout)
        self.lite_conv = LiteConv(width // 2, kernel, quirks=quirks)
        self.gyro_attention = SensorAttention(width - self.slices[1], ATTENTION_HEADS, dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor, alp: ALPSettings | None = None) -> torch.Tensor:
        h = self.norm1(x)
        if self.alp is not None:
            h = self.alp(h, alp)
        a, b = self.slices
        branches = torch.cat(
            [
                self.drop_path(self.acc_attention(h[..., :a])),
                self.drop_path(self.lite_conv(h[..., a:b])),
                self.drop_path(self.gyro_attention(h[..., b:])),
            ],
            dim=-1,
        )
        x = x + branches  # the residual takes the pre-norm input
        return x + self.drop_path(self.mlp(self.norm2(x)))


class HartBackbone(nn.Module):
    """Sensor-wise patch embedding -> HART blocks -> LN -> token mean -> Dense(feature_dim, swish) -> dropout."""

    def __init__(
        self,
        steps: int,
        width: int,
        feature_dim: int,
        bank_sizes: Sequence[int],
        quirks: bool = False,
        dropout: float = 0.1,
        head_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        blocks = len(bank_sizes)
        if blocks > len(KERNELS):
            raise UserError(f"HART has at most {len(KERNELS)} blocks, got {blocks}")
        self.tokens = steps // PATCH
        self.width = width
        # Conv1d(3 -> w/2, kernel 16, stride 16) per sensor, computed as a Linear on each flattened frame.
        self.acc_patch = nn.Linear(3 * PATCH, width // 2)
        self.gyro_patch = nn.Linear(3 * PATCH, width - width // 2)
        self.position = nn.Embedding(self.tokens, width)
        rates = torch.linspace(0.0, dropout, blocks).tolist() if blocks > 1 else [0.0]
        self.blocks = nn.ModuleList(
            HartBlock(width, KERNELS[i], rates[i], dropout, bank_sizes[i], quirks) for i in range(blocks)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.dense = nn.Linear(width, feature_dim)
        self.dropout = nn.Dropout(head_dropout)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 6, T] -> tokens [B, Z, w] (patch projections plus positions)."""
        b = x.shape[0]
        frames = x.reshape(b, 6, self.tokens, PATCH).transpose(1, 2)  # [B, Z, 6, 16]
        acc = self.acc_patch(frames[:, :, :3].reshape(b, self.tokens, 3 * PATCH))
        gyro = self.gyro_patch(frames[:, :, 3:].reshape(b, self.tokens, 3 * PATCH))
        return torch.cat([acc, gyro], dim=-1) + self.position.weight

    def encode(self, tokens: torch.Tensor, alp: ALPSettings | None = None) -> torch.Tensor:
        """Tokens through the blocks and the final LayerNorm (the MAE encoder's output); ``alp``: this call's ALP
        settings (None: each layer's defaults)."""
        for block in self.blocks:
            tokens = block(tokens, alp)
        return self.norm(tokens)

    def pooled(self, x: torch.Tensor, alp: ALPSettings | None = None) -> torch.Tensor:
        """The token mean of the encoder output, [B, w]: the official model's "pooling" layer, which FedAli's
        feature-based baselines read (its FedProto's prototypes)."""
        return self.encode(self.embed(x), alp).mean(dim=1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output -> the feature: Dense(feature_dim, swish) and dropout."""
        return self.dropout(F.silu(self.dense(pooled)))

    def forward(self, x: torch.Tensor, alp: ALPSettings | None = None) -> torch.Tensor:
        return self.project(self.pooled(x, alp))


def hart_settings(input_shape: tuple[int, ...], options: Mapping[str, Any] | None) -> tuple[int, int, bool, list[int]]:
    """(steps, width, quirks, bank sizes) from the model options, with one-line errors for shapes HART cannot take."""
    if len(input_shape) != 2 or input_shape[0] != 6 or input_shape[1] % PATCH:
        raise UserError(
            f"HART needs [6, T] inertial windows (acc xyz, gyro xyz) with T a multiple of {PATCH}, "
            f"got shape {list(input_shape)}"
        )
    opts = dict(options or {})
    width = int(opts.get("width", 64))
    if width % 8:
        raise UserError(f"config key 'model.width' must be a multiple of 8 for HART, got {width}")
    blocks = int(opts.get("blocks", 3))
    banks = [int(k) for k in opts.get("bank_sizes", ())] or [max(1, 256 >> i) for i in range(blocks)]
    if len(banks) != blocks:
        raise UserError(f"config key 'model.bank_sizes' needs one size per block ({blocks}), got {banks}")
    if min(banks) < 1:
        raise UserError(f"config key 'model.bank_sizes' must hold positive sizes, got {banks}")
    return input_shape[1], width, bool(opts.get("hart_quirks", False)), banks


def hart_model(
    input_shape: tuple[int, ...], num_classes: int, feature_dim: int, options: Mapping[str, Any] | None, alp: bool
) -> SplitModel:
    """HART, with an ALP layer in every block when ``alp`` (the bank sizes from the options)."""
    steps, width, quirks, banks = hart_settings(input_shape, options)
    backbone = HartBackbone(steps, width, feature_dim, banks if alp else [0] * len(banks), quirks)
    return SplitModel(backbone, feature_dim, num_classes)


def build_hart(
    input_shape: tuple[int, ...],
    num_classes: int,
    feature_dim: int,
    hidden_dim: int,
    projection: str = "linear",
    *,
    options: Mapping[str, Any] | None = None,
) -> SplitModel:
    return hart_model(input_shape, num_classes, feature_dim, options, alp=False)


def build_hart_alp(
    input_shape: tuple[int, ...],
    num_classes: int,
    feature_dim: int,
    hidden_dim: int,
    projection: str = "linear",
    *,
    options: Mapping[str, Any] | None = None,
) -> SplitModel:
    return hart_model(input_shape, num_classes, feature_dim, options, alp=True)
