"""FedMosaic's frozen multimodal trunks at CPU scale: one small transformer per size, shared by every modality.

The paper's clients adapt frozen multimodal LLMs of different sizes; fedpal's stand-ins (spec fedmosaic.md §5) are
two pre-norm transformer trunks that differ in width and depth:

* ``small``: 2 blocks of width 64, ``large``: 4 blocks of width 128 (4 heads, MLP 4x, GELU, no dropout);
* modality tokenizers in front, each adding its own learned position embedding:
  images [1, H, W] (resized to 28 x 28 when needed) -> 16 tokens of 7 x 7 patches; IMU windows [6, T] -> T/16
  tokens of 16-sample frames (all six channels of a frame in one token, channel-major as HART's frames); text
  [L] character ids (< 128, L <= 256) -> L tokens;
* a learned **modality token** prepended to the tokens of each modality (it lives in that modality's tokenizer),
  and optionally a learned **task token** from a table of ``tasks`` entries (``forward(x, task=ids)``);
* the blocks, a final LayerNorm, and the feature: the mean of all output tokens, of size ``width``.

Every linear layer of a block is a plain ``nn.Linear`` with a stable name, ``blocks.{i}.attn.qkv``,
``blocks.{i}.attn.out``, ``blocks.{i}.mlp.up``, ``blocks.{i}.mlp.down``, so an adapter wrapper can target them by
name and read each block's index from it.

**Task-tagged inputs** (``fedpal.data.tagged_inputs``: rows ``[task id, modality code, payload]``, FedMosaic's
task stream) mix modalities and tasks in one batch: the trunk then groups the rows by modality, runs each group
through its tokenizer with the rows' task tokens, and puts the features back in row order; `task_model` adds a
readout that answers only with the classes of each row's task.

Which tokenizer runs is decided by the input's shape (rank 4 with one channel: images; rank 3: IMU windows; rank 2
of integers: text), so a run needs no extra config key: ``model.name = "mosaic_small"`` on MNIST builds the image
path, on HAPT the IMU path. A run's model holds only the tokenizer its input shape needs (unused tokenizers would
only be shipped back and forth by weight-sharing methods); pre-training builds all of them, and loading a
checkpoint copies the tensors the model has slots for (names and shapes match by construction).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.data.tagged_inputs import MODALITY_CODES, WIDTH, is_tagged, payload_as, untag
from fedpal.errors import UserError
from fedpal.models.base import SplitModel
from fedpal.models.projection import feature_projection

IMAGE_SIDE = 28
IMAGE_PATCH = 7
IMU_CHANNELS = 6
IMU_FRAME = 16
IMU_MAX_FRAMES = 32
IMU_MAX_SAMPLES = IMU_FRAME * IMU_MAX_FRAMES
TEXT_VOCABULARY = 128  # character ids below 128 (Shakespeare's 81 LEAF symbols fit)
TEXT_MAX_LENGTH = 256  # Rotten Tomatoes snippets average about 150 characters
MLP_RATIO = 4
MODALITIES = ("image", "imu", "text")
MASKED_LOGIT = -1e9  # logits of classes outside a row's task (finite: no NaN in softmax or its gradient)


@dataclass(frozen=True)
class TrunkSize:
    width: int
    depth: int
    heads: int


SIZES: dict[str, TrunkSize] = {
    "small": TrunkSize(width=64, depth=2, heads=4),
    "large": TrunkSize(width=128, depth=4, heads=4),
}


class Tokenizer(nn.Module):
    """Inputs of one modality -> tokens [B, T, width]; holds that modality's learned token."""

    modality_token: torch.Tensor  # a Parameter; a plain tensor under torch.func.functional_call


class ImageTokenizer(Tokenizer):
    """[B, 1, H, W] -> [B, 16, width]: non-overlapping 7 x 7 patches of the 28 x 28 image, projected, plus positions.
    Images of another size (the 8 x 8 digits) are resized bilinearly to 28 x 28 first."""

    def __init__(self, width: int) -> None:
        super().__init__()
        tokens = (IMAGE_SIDE // IMAGE_PATCH) ** 2
        self.patch = nn.Linear(IMAGE_PATCH * IMAGE_PATCH, width)
        self.position = nn.Parameter(torch.randn(tokens, width, device="cpu") * 0.02)
        self.modality_token = nn.Parameter(torch.randn(width, device="cpu") * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (IMAGE_SIDE, IMAGE_SIDE):
            x = F.interpolate(x, size=(IMAGE_SIDE, IMAGE_SIDE), mode="bilinear", align_corners=False)
        b = x.shape[0]
        side = IMAGE_SIDE // IMAGE_PATCH
        patches = x.reshape(b, side, IMAGE_PATCH, side, IMAGE_PATCH).permute(0, 1, 3, 2, 4)
        return self.patch(patches.reshape(b, side * side, IMAGE_PATCH * IMAGE_PATCH)) + self.position


class ImuTokenizer(Tokenizer):
    """[B, 6, T] -> [B, T/16, width]: each 16-sample frame of all six channels (channel 0's samples first) is one
    token, projected, plus positions."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.frame = nn.Linear(IMU_CHANNELS * IMU_FRAME, width)
        self.position = nn.Parameter(torch.randn(IMU_MAX_FRAMES, width, device="cpu") * 0.02)
        self.modality_token = nn.Parameter(torch.randn(width, device="cpu") * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        z = t // IMU_FRAME
        frames = x.reshape(b, c, z, IMU_FRAME).permute(0, 2, 1, 3).reshape(b, z, c * IMU_FRAME)
        return self.frame(frames) + self.position[:z]


class TextTokenizer(Tokenizer):
    """[B, L] character ids -> [B, L, width]: an embedding per character plus positions."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(TEXT_VOCABULARY, width)
        self.position = nn.Parameter(torch.randn(TEXT_MAX_LENGTH, width, device="cpu") * 0.02)
        self.modality_token = nn.Parameter(torch.randn(width, device="cpu") * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids) + self.position[: ids.shape[1]]


TOKENIZERS: dict[str, type[Tokenizer]] = {"image": ImageTokenizer, "imu": ImuTokenizer, "text": TextTokenizer}


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection and an ``out`` projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than F.scaled_dot_product_attention, which has no vmap rule on the CPU (the
        # client-batched executor would fall back to a loop); for a few dozen tokens the cost is the same.
        scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        attended = scores.softmax(dim=-1) @ v
        return self.out(attended.transpose(1, 2).reshape(b, t, w))


class Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, MLP_RATIO * width)
        self.down = nn.Linear(MLP_RATIO * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def modality_of_shape(input_shape: tuple[int, ...]) -> str:
    """The tokenizer an input shape (one sample, no batch) needs; one-line UserError for shapes no tokenizer takes."""
    shape = list(input_shape)
    if len(shape) == 3 and shape[0] == 1:
        return "image"
    if len(shape) == 2 and shape[0] == IMU_CHANNELS and shape[1] % IMU_FRAME == 0 and shape[1] <= IMU_MAX_SAMPLES:
        return "imu"
    if len(shape) == 1 and 0 < shape[0] <= TEXT_MAX_LENGTH:
        return "text"
    raise UserError(
        f"mosaic trunks take images [1, H, W], IMU windows [6, T] (T a multiple of {IMU_FRAME}, at most "
        f"{IMU_MAX_SAMPLES}) or character ids [L] (L <= {TEXT_MAX_LENGTH}); got shape {shape}"
    )


class MosaicTrunk(nn.Module):
    """Modality tokenizers -> [task token] + modality token + tokens -> pre-norm blocks -> LayerNorm -> token mean."""

    def __init__(self, size: str, modalities: Iterable[str] = MODALITIES, tasks: int = 0) -> None:
        super().__init__()
        if size not in SIZES:
            raise UserError(f"unknown mosaic trunk size '{size}'; known: {', '.join(SIZES)}")
        chosen = list(dict.fromkeys(modalities))
        unknown = [m for m in chosen if m not in TOKENIZERS]
        if unknown or not chosen:
            raise UserError(f"mosaic trunk modalities must be some of {', '.join(MODALITIES)}, got {chosen}")
        spec = SIZES[size]
        self.size, self.width, self.depth = size, spec.width, spec.depth
        self.tokenizers = nn.ModuleDict({m: TOKENIZERS[m](spec.width) for m in chosen})
        self.task_tokens = nn.Embedding(tasks, spec.width) if tasks > 0 else None
        self.blocks = nn.ModuleList(Block(spec.width, spec.heads) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.width)

    def modality_of(self, x: torch.Tensor) -> str:
        """Images are rank 4, IMU windows rank 3, character ids rank 2 (integers)."""
        modality = {4: "image", 3: "imu", 2: "text"}.get(x.dim())
        if modality is None or (modality == "text") == x.is_floating_point():
            raise UserError(f"mosaic trunk cannot tell the modality of inputs of shape {list(x.shape)} ({x.dtype})")
        if modality not in self.tokenizers:
            raise UserError(f"this mosaic trunk has no {modality} tokenizer (it has {', '.join(self.tokenizers)})")
        return modality

    def tokens(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """The input sequence of the blocks: [task token,] modality token, then the tokenizer's tokens."""
        tokenizer = cast(Tokenizer, self.tokenizers[self.modality_of(x)])
        body = tokenizer(x)
        b = body.shape[0]
        prefix = [tokenizer.modality_token.expand(b, 1, -1)]
        if task is not None:
            if self.task_tokens is None:
                raise UserError("this mosaic trunk has no task tokens (built with tasks = 0)")
            prefix.insert(0, self.task_tokens(task).unsqueeze(1))
        return torch.cat([*prefix, body], dim=1)

    def encode(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens after the final LayerNorm, [B, T, width]."""
        h = self.tokens(x, task)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """The feature: the mean of the output tokens, [B, width]."""
        if is_tagged(x):
            return self.tagged_features(x)
        return self.encode(x, task).mean(dim=1)

    def tagged_features(self, rows: torch.Tensor) -> torch.Tensor:
        """Features of task-tagged rows: each modality's rows through its tokenizer (with their task tokens when the
        trunk has a task table), scattered back into row order. The grouping depends on the data, so a tagged
        batch cannot run under ``torch.func.vmap``."""
        tasks, codes, payload = untag(rows)
        features = rows.new_zeros(rows.shape[0], self.width)
        for modality, code in MODALITY_CODES.items():
            index = (codes == code).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            if modality not in self.tokenizers:
                raise UserError(f"this mosaic trunk has no {modality} tokenizer (it has {', '.join(self.tokenizers)})")
            task = tasks[index] if self.task_tokens is not None else None
            encoded = self.encode(payload_as(payload[index], modality), task).mean(dim=1)
            features = features.index_copy(0, index, encoded)
        return features


class MosaicBackbone(nn.Module):
    """A trunk and the feature projection to ``model.feature_dim`` (trainable, not part of the trunk)."""

    def __init__(self, trunk: MosaicTrunk, projection: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.projection = projection

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        return self.projection(self.trunk(x, task))


class TaskReadoutModel(SplitModel):
    """A SplitModel over the union of a task stream's classes whose logits outside each row's task are masked, so
    a row is answered with its own task's readout (the task id comes with the row, as an instruction does)."""

    label_tasks: torch.Tensor  # a non-persistent buffer: the task of each class

    def __init__(self, backbone: nn.Module, feature_dim: int, label_tasks: Sequence[int]) -> None:
        super().__init__(backbone, feature_dim, len(label_tasks))
        self.register_buffer(
            "label_tasks", torch.tensor(list(label_tasks), dtype=torch.long, device="cpu"), persistent=False
        )

    def forward(self, x: torch.Tensor, **options: Any) -> torch.Tensor:
        logits = self.head(self.backbone(x, **options))
        if not is_tagged(x):
            return logits
        tasks, _, _ = untag(x)
        return logits.masked_fill(self.label_tasks[None, :] != tasks[:, None], MASKED_LOGIT)


def trunks_in(module: nn.Module) -> list[MosaicTrunk]:
    return [m for m in module.modules() if isinstance(m, MosaicTrunk)]


def freeze_trunk(module: nn.Module) -> int:
    """Set ``requires_grad = False`` on every parameter of every mosaic trunk inside ``module`` (the trunk itself, a
    backbone or a whole SplitModel; the projection and head stay trainable) and return how many parameter values
    that froze. A module without a trunk is an error, so a wrong argument cannot silently freeze nothing."""
    trunks = trunks_in(module)
    if not trunks:
        raise UserError(f"{type(module).__name__} holds no mosaic trunk to freeze")
    frozen = 0
    for trunk in trunks:
        for parameter in trunk.parameters():
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen += parameter.numel()
    return frozen


def block_linear_names(trunk: MosaicTrunk) -> list[str]:
    """The names of the blocks' linear layers inside the trunk, in block order (targets for adapters)."""
    return [name for name, m in trunk.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")]


def mosaic_model(
    size: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    feature_dim: int,
    projection: str,
    options: Mapping[str, Any] | None = None,
) -> SplitModel:
    """A trunk of ``size`` with the tokenizer ``input_shape`` needs, its feature projection and a linear head.
    ``projection = "pool"`` with ``feature_dim`` = the trunk width makes the feature the pooled trunk output itself.
    Task-tagged inputs (shape ``(WIDTH,)``) build every tokenizer, a task-token table of ``options["tasks"]``
    entries and a `TaskReadoutModel` over ``options["label_tasks"]``."""
    label_tasks = list((options or {}).get("label_tasks") or [])
    if input_shape == (WIDTH,) and label_tasks:
        if len(label_tasks) != num_classes:
            raise UserError(f"label_tasks names {len(label_tasks)} classes, the data have {num_classes}")
        tasks = int((options or {}).get("tasks") or max(label_tasks) + 1)
        trunk = MosaicTrunk(size, MODALITIES, tasks=tasks)
        return TaskReadoutModel(
            MosaicBackbone(trunk, feature_projection(trunk.width, feature_dim, projection)), feature_dim, label_tasks
        )
    trunk = MosaicTrunk(size, [modality_of_shape(input_shape)])
    return SplitModel(
        MosaicBackbone(trunk, feature_projection(trunk.width, feature_dim, projection)), feature_dim, num_classes
    )


def build_mosaic_small(
    input_shape: tuple[int, ...],
    num_classes: int,
    feature_dim: int,
    hidden_dim: int,
    projection: str = "linear",
    options: Mapping[str, Any] | None = None,
) -> SplitModel:
    return mosaic_model("small", input_shape, num_classes, feature_dim, projection, options)


def build_mosaic_large(
    input_shape: tuple[int, ...],
    num_classes: int,
    feature_dim: int,
    hidden_dim: int,
    projection: str = "linear",
    options: Mapping[str, Any] | None = None,
) -> SplitModel:
    return mosaic_model("large", input_shape, num_classes, feature_dim, projection, options)


def trunk_state(tensors: Mapping[str, torch.Tensor], prefix: str = "backbone.trunk.") -> dict[str, torch.Tensor]:
    """The trunk's own tensors of a SplitModel-named dict, with the prefix removed (to load into a bare trunk)."""
    return {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
