"""Label-free MAE pre-training of the HART(+ALP) encoder (FedAli's pre-training stage; see docs/pretraining.md).

Each window [6, T] is cut into Z = T/16 frames. A seeded random subset of ``mask_ratio * Z`` frames per window
is hidden; the encoder (the backbone's ``embed`` then ``encode``) sees only the visible tokens, with their position
embeddings; a small decoder (Linear -> learned mask tokens at the hidden positions + decoder positions -> plain
HART blocks -> LayerNorm -> Linear) predicts the 96 raw values of every frame, and the loss is the MSE over the
hidden frames only.

The entry point takes windows only (``pretrain_mae(windows, ...)``), so it cannot read labels; the windows are the
pooled *training* windows of the training clients (``pretraining_windows``), never validation, test or held-out
clients' data. ALP layers run in training mode with G tied to L (L is copied into G after every step), so the
tokens mix with the bank as it currently is, and G := L at the end.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fedpal.algorithms.core.training import batch_indices, train_steps
from fedpal.common.seeding import derive_seed
from fedpal.config import ModelConfig, PretrainConfig
from fedpal.data.client_data import FederatedData
from fedpal.errors import UserError
from fedpal.models.alp import ALPSettings, alp_layers
from fedpal.models.hart import PATCH, HartBackbone, HartBlock
from fedpal.models.registry import build_model

log = logging.getLogger("fedpal")

DECODER_KERNEL = 3  # the official HART decoder's first liteFormer kernel; 8 tokens need no longer one
# Backbone parts the MAE never trains (the feature layer on top of the pooled tokens): left out of the checkpoint.
NOT_PRETRAINED = ("backbone.dense.",)


@dataclass
class PretrainResult:
    """The pre-trained encoder tensors (SplitModel names, "backbone.…") and how the pre-training went."""

    tensors: dict[str, torch.Tensor]
    losses: list[float]  # mean masked-frame MSE per epoch (over windows)
    windows: int
    seconds: float
    epoch_seconds: list[float] = field(default_factory=list)


def pretraining_windows(data: FederatedData) -> torch.Tensor:
    """The pooled training windows of the federation's training clients.

    Only ``train_x`` is read: never labels, never validation or test windows, and never the held-out clients
    (``data.unseen``), which must stay unseen until their own adaptation.
    """
    if not data.clients:
        raise UserError("MAE pre-training needs at least one training client")
    return torch.cat([c.train_x for c in data.clients]).float()


def window_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T] -> [B, Z, C * 16]: per frame, channel 0's 16 samples, then channel 1's, ... (the official
    ``PatchLayer`` order, so acc values come first and gyro values last)."""
    b, c, t = x.shape
    return x.reshape(b, c, t // PATCH, PATCH).permute(0, 2, 1, 3).reshape(b, t // PATCH, c * PATCH)


def masked_count(mask_ratio: float, tokens: int) -> int:
    """Frames hidden per window: floor(mask_ratio * Z) as in the official ``MaskEncoder``; one-line error if that
    hides none or all of them."""
    count = math.floor(mask_ratio * tokens + 1e-9)
    if not 0 < count < tokens:
        raise UserError(
            f"config key 'pretrain.mask_ratio' = {mask_ratio} hides {count} of the {tokens} frames per window; "
            "it must hide at least one and leave at least one visible"
        )
    return count


def random_masks(batch: int, tokens: int, hidden: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible [B, Z - M], hidden [B, M]) frame indices, a fresh seeded draw per window. Visible indices are
    sorted so the encoder's depthwise convolution still runs over frames in time order."""
    order = torch.rand(batch, tokens, generator=generator).argsort(dim=1)
    return order[:, hidden:].sort(dim=1).values, order[:, :hidden]


class MaskedAutoencoder(nn.Module):
    """A HART backbone's encoder plus a small throw-away decoder that reconstructs the hidden frames."""

    def __init__(self, backbone: nn.Module, channels: int, decoder_blocks: int) -> None:
        super().__init__()
        if not isinstance(backbone, HartBackbone):
            raise UserError(
                "MAE pre-training needs a token encoder (config key 'pretrain.model' = 'hart' or 'hart_alp')"
            )
        self.encoder: HartBackbone = backbone
        width, tokens = backbone.width, backbone.tokens
        self.decoder_embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.randn(width) * 0.02)
        self.decoder_position = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.decoder = nn.ModuleList(
            HartBlock(width, DECODER_KERNEL, 0.0, 0.0, 0, False) for _ in range(decoder_blocks)
        )
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.predict = nn.Linear(width, channels * PATCH)

    def forward(
        self, x: torch.Tensor, visible: torch.Tensor, hidden: torch.Tensor, alp: ALPSettings | None = None
    ) -> torch.Tensor:
        """Mean squared error over the hidden frames of the batch (every value of a hidden frame counts once);
        ``alp``: this call's ALP settings for the encoder."""
        tokens = self.encoder.embed(x)  # [B, Z, w], positions already added
        b, z, w = tokens.shape
        encoded = self.encoder.encode(tokens.gather(1, visible.unsqueeze(-1).expand(-1, -1, w)), alp)
        decoded = self.decoder_embed(encoded)
        full = self.mask_token.expand(b, z, w).scatter(1, visible.unsqueeze(-1).expand(-1, -1, w), decoded)
        full = full + self.decoder_position
        for block in self.decoder:
            full = block(full)
        prediction = self.predict(self.decoder_norm(full))  # [B, Z, C * 16]
        target = window_frames(x)
        index = hidden.unsqueeze(-1).expand(-1, -1, target.shape[-1])
        return (prediction.gather(1, index) - target.gather(1, index)).pow(2).mean()


def tie_banks(module: nn.Module) -> None:
    """G := L in every ALP layer: during pre-training the tokens mix with the bank as it currently is."""
    with torch.no_grad():
        for layer in alp_layers(module):
            layer.global_bank.copy_(layer.local_bank)


def model_options(m: ModelConfig) -> dict[str, object]:
    """The [model] keys that shape a HART backbone, as the simulator passes them to ``build_model``."""
    return {"width": m.width, "blocks": m.blocks, "bank_sizes": m.bank_sizes, "hart_quirks": m.hart_quirks}


def encoder_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone tensors the MAE trained (ALP banks included), cloned, under their SplitModel names."""
    return {
        name: tensor.detach().clone()
        for name, tensor in module.state_dict().items()
        if name.startswith("backbone.") and not name.startswith(NOT_PRETRAINED)
    }


def pretrain_mae(
    windows: torch.Tensor,
    model: ModelConfig,
    p: PretrainConfig,
    seed: int,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> PretrainResult:
    """MAE pre-training on unlabelled windows [N, 6, T]; deterministic given (windows, configs, seed).

    ``on_epoch(epoch, loss, seconds)`` is called after every epoch (1-based). Randomness (initialisation, dropout
    and drop-path, shuffling, masks) is seeded from ``seed`` without touching the caller's global RNG.
    """
    if windows.dim() != 3 or windows.shape[0] == 0:
        raise UserError(f"MAE pre-training needs windows [N, channels, T], got shape {list(windows.shape)}")
    started = time.perf_counter()
    input_shape = tuple(int(s) for s in windows.shape[1:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "pretrain", "init"))
        module = build_model(
            p.model, input_shape, 2, model.feature_dim, model.hidden_dim, "linear", model_options(model)
        )
        mae = MaskedAutoencoder(getattr(module, "backbone", module), input_shape[0], p.decoder_blocks)
        tokens = mae.encoder.tokens
        hidden = masked_count(p.mask_ratio, tokens)
        torch.manual_seed(derive_seed(seed, "pretrain", "dropout"))
        shuffle = torch.Generator().manual_seed(derive_seed(seed, "pretrain", "shuffle"))
        masking = torch.Generator().manual_seed(derive_seed(seed, "pretrain", "mask"))
        optimizer = torch.optim.Adam([q for q in mae.parameters() if q.requires_grad], lr=p.lr)
        tie_banks(module)
        mae.train()
        n = windows.shape[0]
        losses: list[float] = []
        epoch_seconds: list[float] = []
        for epoch in range(p.epochs):
            epoch_started = time.perf_counter()
            settings = ALPSettings(lam=0.0 if epoch < p.warmup_epochs else p.alp_lambda, beta=p.bank_beta)
            batches = list(batch_indices(n, p.batch_size, shuffle, epochs=1))

            def loss_of(_: int, idx: torch.Tensor, settings: ALPSettings = settings) -> torch.Tensor:
                visible, masked = random_masks(idx.numel(), tokens, hidden, masking)
                return mae(windows[idx], visible, masked, settings)

            result = train_steps(batches, loss_of, [optimizer], after_step=lambda: tie_banks(module))
            total = 0.0
            for loss, (_, idx) in zip(result.losses, batches, strict=True):
                total += float(loss) * idx.numel()
            losses.append(total / n)
            epoch_seconds.append(time.perf_counter() - epoch_started)
            log.info("pretrain epoch %d/%d: masked-frame MSE %.5f", epoch + 1, p.epochs, losses[-1])
            if on_epoch is not None:
                on_epoch(epoch + 1, losses[-1], epoch_seconds[-1])
        tie_banks(module)  # the spec's "copy L into G at the end" (already true after every step)
    return PretrainResult(encoder_tensors(module), losses, n, time.perf_counter() - started, epoch_seconds)
