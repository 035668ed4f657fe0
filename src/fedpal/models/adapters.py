"""FedMosaic's dual adapters with a per-example gate, for the named ``nn.Linear`` layers of any PyTorch model.

`add_dual_adapters` replaces each targeted linear layer (chosen by name, as PEFT's ``target_modules``) by a
`DualAdapterLinear`:

    y = W0 x + b + w(x) * Ad1(x) + (1 - w(x)) * Ad2(x),    w(x) = sigmoid(mean over tokens of the gate logits)

with a frozen global adapter Ad1 (lora1, rebuilt from other clients' adapters by the algorithm) and a trainable
local adapter Ad2 (lora2). The gate logit of one token is x . w_gate + xi * (softplus(x . w_noise) + 1e-5), with
xi ~ N(0, 1) in training only; the noise scale is computed without gradient, so w_noise never trains (as in the
official code). In the K block-end layers (`block_end_indices`) both adapters are Co-LoRA,
Ad(x) = B ((A x) P + Q) * alpha / r, with A and B frozen and shared by lora1 and lora2 and only the r x r P and
1 x r Q per adapter, which have the same shape in every architecture; elsewhere they are ordinary LoRA,
Ad(x) = B A x * alpha / r.

Two other mixings serve the baselines (`set_adapter_mixing`): ``local``, W0 x + b + Ad2(x) (one adapter, no gate),
and ``mean``, W0 x + b + (Ad1(x) + Ad2(x)) / 2 (FedDPA's fixed even mix). With ``num_blocks = 0`` every layer is
ordinary LoRA (the baselines' layout: the official code gives them plain LoRA with trainable A, B everywhere).

Everything else in the model is frozen, so the trainable parameters are lora2 and the gate. Adapter tensors are
read and written as flat dicts (`read_adapters`, `write_adapters`) whose Co-LoRA keys name the block index k
(``coLoRA.block{k}.{site}.P``) instead of the module, so P and Q of two architectures meet under one key.

Nothing here knows fedpal's engine or algorithms: it is a library piece the FedMosaic method builds on.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.errors import UserError

AdapterPart = Literal["lora1", "lora2", "gate", "frozen"]
Mixing = Literal["gated", "local", "mean"]  # how a layer combines its two adapters (`DualAdapterLinear.mixing`)
ADAPTER_PARTS: tuple[AdapterPart, ...] = ("lora1", "lora2", "gate", "frozen")
COLORA_PREFIX = "coLoRA"
# The integer after a conventional block-container name: model.layers.3.mlp, encoder.layer.3, transformer.h.3,
# blocks.3.attn.qkv. A module outside such a container has no block and gets an ordinary LoRA adapter.
DEFAULT_BLOCK_PATTERN = r"(?:^|\.)(?:layers|layer|blocks|block|h)\.(\d+)(?:\.|$)"
GATE_NOISE_FLOOR = 1e-5

# name -> (layer index, the module's name inside its block) or None for a module in no block
BlockLocator = Callable[[str], tuple[int, str] | None]


@dataclass(frozen=True)
class AdapterSettings:
    """The adapter shape. Defaults are fedpal's CPU scale (specs/fedmosaic.md §5: r = 8, K = 2) with the
    authors' scale alpha / r = 2 (r 128, alpha 256) and dropout 0.05 (the CPU column keeps the authors' dropout).
    ``gate_noise=False`` is the deterministic gate, sensible when inputs are single tokens (spec §7)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    num_blocks: int = 2
    gate_noise: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"adapter rank must be at least 1, got {self.rank}")
        if self.num_blocks < 0:
            raise UserError(
                f"num_blocks counts Co-LoRA blocks (0: none, every layer ordinary LoRA), got {self.num_blocks}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"adapter dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def block_end_indices(num_layers: int, num_blocks: int) -> list[int]:
    """The Co-LoRA layers: with step = floor(L / K), {k * step - 1 : k = 1..K-1} and the last layer L - 1
    (16 layers, K = 4 -> 3, 7, 11, 15; 28 -> 6, 13, 20, 27). Position k in the list is the block index that
    P and Q are matched by across architectures."""
    if num_blocks < 1 or num_layers < num_blocks:
        raise UserError(f"cannot cut {num_layers} layers into {num_blocks} Co-LoRA blocks")
    step = num_layers // num_blocks
    return [k * step - 1 for k in range(1, num_blocks)] + [num_layers - 1]


def blocks_by_pattern(pattern: str) -> BlockLocator:
    """A locator from a regex whose first group is the layer index; the module's name inside its block is what
    follows the match (``layers.3.self_attn.q_proj`` -> (3, ``self_attn.q_proj``))."""
    compiled = re.compile(pattern)

    def locate(name: str) -> tuple[int, str] | None:
        found = compiled.search(name)
        if found is None:
            return None
        return int(found.group(1)), name[found.end() :]

    return locate


def orthonormal_init(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform draw, then the U or V factor of its SVD: orthonormal rows when the matrix is wide (A, r x d),
    orthonormal columns when it is tall (B, d x r), as the official orthonormal_kaiming_uniform_init."""
    draw = torch.empty(shape, device="cpu")  # seeded on the CPU generator; the run moves modules to its device
    nn.init.kaiming_uniform_(draw, a=math.sqrt(5), generator=generator)
    u, _, vh = torch.linalg.svd(draw, full_matrices=False)
    return (vh if shape[0] <= shape[1] else u).contiguous()


def _block_forward_stays_modular(module: nn.Module, args: tuple[object, ...]) -> None:
    """A no-op forward pre-hook. PyTorch's TransformerEncoderLayer takes a fused kernel in eval mode that reads
    ``linear1.weight`` directly and would skip the adapters; it declines that path when any submodule has a hook."""
    return None


class DualAdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a gated global (lora1) and local (lora2) adapter; see the module docstring.

    Parameters: ``base.weight``/``base.bias`` (frozen); Co-LoRA layers ``A`` (r x d_in), ``B`` (d_out x r) frozen
    and shared, ``lora{1,2}_P`` (r x r), ``lora{1,2}_Q`` (1 x r); other layers ``lora{1,2}_A``, ``lora{1,2}_B``;
    ``gate_weight`` and ``noise_weight`` (d_in each). Inputs are [B, d_in] (one token per example) or batch-first
    [B, T, ..., d_in]; the gate gives one weight per example from the mean over all middle axes.
    """

    def __init__(
        self,
        base: nn.Linear,
        settings: AdapterSettings,
        generator: torch.Generator,
        *,
        layer_index: int | None = None,
        block: int | None = None,
        site: str = "",
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale, self.gate_noise = settings.rank, settings.scale, settings.gate_noise
        self.layer_index, self.block, self.site = layer_index, block, site
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.enabled = True
        # "gated": W0 x + w(x) Ad1(x) + (1 - w(x)) Ad2(x); "local": W0 x + Ad2(x), one plain adapter (the
        # single-adapter baselines: local fine-tuning, FedAvg and Ditto of adapters); "mean": W0 x + (Ad1(x) +
        # Ad2(x)) / 2, the fixed even mix of FedDPA as the official code runs it
        self.mixing: Mixing = "gated"
        r, d_in, d_out = settings.rank, base.in_features, base.out_features
        if self.co_lora:
            # lora1 and lora2 share one frozen A, B; P = Q = 0 makes both adapters output exactly 0 at start
            self.A = nn.Parameter(orthonormal_init((r, d_in), generator), requires_grad=False)
            self.B = nn.Parameter(orthonormal_init((d_out, r), generator), requires_grad=False)
            for name in ("lora1_P", "lora2_P"):
                setattr(self, name, nn.Parameter(torch.zeros(r, r, device="cpu")))
            for name in ("lora1_Q", "lora2_Q"):
                setattr(self, name, nn.Parameter(torch.zeros(1, r, device="cpu")))
        else:
            # ordinary LoRA: A Kaiming (nn.Linear's default), B = 0, lora1 a copy of lora2
            start = torch.empty(r, d_in, device="cpu")
            nn.init.kaiming_uniform_(start, a=math.sqrt(5), generator=generator)
            self.lora1_A = nn.Parameter(start.clone())
            self.lora2_A = nn.Parameter(start.clone())
            self.lora1_B = nn.Parameter(torch.zeros(d_out, r, device="cpu"))
            self.lora2_B = nn.Parameter(torch.zeros(d_out, r, device="cpu"))
        self.gate_weight = nn.Parameter(torch.zeros(d_in, device="cpu"))
        self.noise_weight = nn.Parameter(torch.zeros(d_in, device="cpu"))
        # trainable: lora2 and the gate; frozen: the base layer, lora1 and the shared A, B
        self.requires_grad_(False)
        for part in ("lora2", "gate"):
            for attribute in self.adapter_names(part):
                getattr(self, attribute).requires_grad_(True)
        self.register_forward_pre_hook(_block_forward_stays_modular)

    @property
    def co_lora(self) -> bool:
        return self.block is not None

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, for code that reads ``layer.weight`` (it does not include the adapters)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def adapter_names(self, part: AdapterPart) -> tuple[str, ...]:
        """This layer's own parameter names that make up ``part``."""
        if part == "gate":
            return ("gate_weight", "noise_weight")
        if part == "frozen":
            return ("A", "B") if self.co_lora else ()
        suffixes = ("P", "Q") if self.co_lora else ("A", "B")
        return tuple(f"{part}_{s}" for s in suffixes)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """w(x) in (0, 1), one per example: sigmoid of the token mean of x . w_gate, plus in training (with
        ``gate_noise``) xi * (softplus(x . w_noise) + 1e-5) per token, the scale taken without gradient."""
        logits = x @ self.gate_weight
        if self.training and self.gate_noise:
            with torch.no_grad():
                noise_scale = F.softplus(x @ self.noise_weight) + GATE_NOISE_FLOOR
            logits = logits + torch.randn_like(logits) * noise_scale
        if logits.dim() > 1:
            logits = logits.flatten(1).mean(dim=1)
        return torch.sigmoid(logits)

    def adapter_output(self, which: Literal[1, 2], x: torch.Tensor) -> torch.Tensor:
        """Ad_j(x) * alpha / r of lora1 or lora2 (dropout on x drawn separately for each, as in the official code)."""
        x = self.dropout(x)
        if self.co_lora:
            code = F.linear(x, self.A) @ getattr(self, f"lora{which}_P") + getattr(self, f"lora{which}_Q")
            return F.linear(code, self.B) * self.scale
        return F.linear(F.linear(x, getattr(self, f"lora{which}_A")), getattr(self, f"lora{which}_B")) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        if self.mixing == "local":
            return out + self.adapter_output(2, x)
        if self.mixing == "mean":
            return out + 0.5 * (self.adapter_output(1, x) + self.adapter_output(2, x))
        if x.dim() < 2:
            raise ValueError(f"a gated adapter needs batched inputs [B, ..., {self.in_features}], got {list(x.shape)}")
        w = self.gate(x).reshape(-1, *([1] * (x.dim() - 1)))
        return out + w * self.adapter_output(1, x) + (1 - w) * self.adapter_output(2, x)

    def extra_repr(self) -> str:
        kind = f"Co-LoRA block {self.block}" if self.co_lora else "LoRA"
        return f"{kind}, layer={self.layer_index}, site={self.site!r}, rank={self.rank}, scale={self.scale}"


def _target_matcher(targets: str | Sequence[str]) -> Callable[[str], bool]:
    """PEFT's rule: one string is a regex the whole name must match; a list matches a name equal to an entry or
    ending in ``.entry``."""
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return lambda name: pattern.fullmatch(name) is not None
    suffixes = tuple(targets)
    return lambda name: any(name == s or name.endswith(f".{s}") for s in suffixes)


def _check_host(model: nn.Module, name: str) -> None:
    """Refuse layers whose parent would bypass or misread the wrapper."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        raise UserError(
            f"'{name}' is the output projection of nn.MultiheadAttention, which reads its weight directly and "
            "would never run an adapter there; target the other linear layers"
        )
    prefix = ""
    for part in name.split("."):
        prefix = f"{prefix}.{part}" if prefix else part
        host = model.get_submodule(prefix)
        if isinstance(host, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) and not host.self_attn.batch_first:
            raise UserError(
                f"'{name}' sits in a sequence-first transformer layer; the gate averages over tokens of batch-first "
                "inputs [B, T, d], so build the model with batch_first=True"
            )


def add_dual_adapters(
    model: nn.Module,
    targets: str | Sequence[str],
    settings: AdapterSettings | None = None,
    *,
    block_of: str | BlockLocator = DEFAULT_BLOCK_PATTERN,
    num_layers: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Wrap the targeted ``nn.Linear`` layers of ``model`` in place and freeze everything but lora2 and the gates.

    ``targets``: a regex the full module name must match, or a list of names / name suffixes (PEFT's
    ``target_modules``). ``block_of``: a regex whose first group is the layer index, or a callable
    name -> (layer index, name inside the block) or None. L = ``num_layers``, by default one more than the largest
    layer index among all the model's modules. Targeted layers in the `block_end_indices` (L, K) layers become
    Co-LoRA, the others ordinary LoRA. The adapters are drawn from a generator seeded by ``seed`` in module order,
    so every client of one architecture built with one seed starts identical. Returns the wrapped layers' names.
    """
    settings = settings or AdapterSettings()
    if any(isinstance(m, DualAdapterLinear) for m in model.modules()):
        raise UserError("the model already carries dual adapters")
    locate = blocks_by_pattern(block_of) if isinstance(block_of, str) else block_of
    matches = _target_matcher(targets)
    chosen: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if name and matches(name):
            if not isinstance(module, nn.Linear):
                raise UserError(f"adapter target '{name}' is a {type(module).__name__}, not nn.Linear")
            _check_host(model, name)
            chosen[name] = module
    if not chosen:
        raise UserError(f"no nn.Linear layer matches the adapter targets {targets!r}")
    located = {name: locate(name) for name, _ in model.named_modules() if name}
    layers = num_layers
    if layers is None:
        indices = [where[0] for where in located.values() if where is not None]
        layers = max(indices) + 1 if indices else 0
    ends = (
        {layer: k for k, layer in enumerate(block_end_indices(layers, settings.num_blocks))}
        if layers and settings.num_blocks
        else {}
    )

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, linear in chosen.items():
        where = located[name]
        layer_index, site = where if where is not None else (None, name)
        block = ends.get(layer_index) if layer_index is not None else None
        wrapper = DualAdapterLinear(linear, settings, generator, layer_index=layer_index, block=block, site=site)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    # the encoder's nested-tensor fast path (eval with a padding mask) would also bypass the adapters
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return list(chosen)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, DualAdapterLinear]]:
    """(name, layer) of every dual-adapter layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, DualAdapterLinear):
            yield name, module


def co_lora_layers(model: nn.Module) -> dict[tuple[int, str], DualAdapterLinear]:
    """The Co-LoRA layers by (block index k, name inside the block): the pairing key across architectures."""
    found: dict[tuple[int, str], DualAdapterLinear] = {}
    for name, layer in adapted_layers(model):
        if layer.block is not None:
            key = (layer.block, layer.site)
            if key in found:
                raise UserError(f"two Co-LoRA layers share block {layer.block} and name '{layer.site}' ('{name}')")
            found[key] = layer
    return found


def co_lora_key(block: int, site: str) -> str:
    """The flat-key prefix of a Co-LoRA layer: ``coLoRA.block{k}.{site}`` (``coLoRA.block{k}`` when the block is
    the layer itself)."""
    return f"{COLORA_PREFIX}.block{block}.{site}" if site else f"{COLORA_PREFIX}.block{block}"


def _entries(model: nn.Module, part: AdapterPart) -> Iterator[tuple[str, nn.Parameter]]:
    """(flat key, parameter) of one part: lora1/lora2 P and Q keyed by block index, the rest by module name."""
    if part not in ADAPTER_PARTS:
        raise UserError(f"unknown adapter part '{part}'; choose one of: {', '.join(ADAPTER_PARTS)}")
    for name, layer in adapted_layers(model):
        for attribute in layer.adapter_names(part):
            short = attribute.rpartition("_")[2] if part != "gate" else attribute.removesuffix("_weight")
            block = layer.block
            prefix = co_lora_key(block, layer.site) if block is not None and part in ("lora1", "lora2") else name
            yield f"{prefix}.{short}", getattr(layer, attribute)


def adapter_parameter_names(model: nn.Module, part: AdapterPart) -> dict[str, str]:
    """Flat key of one adapter part -> the parameter's name in ``model.named_parameters()``: how a method turns the
    adapters it keeps into the model's tensors (a personalized model for evaluation)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return {key: names[id(parameter)] for key, parameter in _entries(model, part)}


def read_adapters(model: nn.Module, part: AdapterPart) -> dict[str, torch.Tensor]:
    """A detached copy of one adapter part as a flat dict: ``lora2`` (what a client uploads), ``lora1`` (what it
    loads), ``gate`` (gate and noise weights, which stay on the client) or ``frozen`` (the Co-LoRA A, B, one per
    architecture). Keys: ``coLoRA.block{k}.{site}.P`` / ``.Q`` for Co-LoRA P, Q (comparable across
    architectures), ``{module}.A`` / ``.B`` / ``.gate`` / ``.noise`` for everything else."""
    return {key: parameter.detach().clone() for key, parameter in _entries(model, part)}


def write_adapters(
    model: nn.Module, part: AdapterPart, tensors: Mapping[str, torch.Tensor], *, strict: bool = True
) -> None:
    """Copy a flat dict into one adapter part in place. Unknown keys and wrong shapes are errors; with ``strict``
    every key of the part must be given (``strict=False`` writes a subset, e.g. only the Co-LoRA keys)."""
    slots = dict(_entries(model, part))
    unknown = sorted(set(tensors) - set(slots))
    if unknown:
        raise KeyError(f"keys not in the model's {part} adapters: {unknown[:5]}")
    missing = sorted(set(slots) - set(tensors))
    if strict and missing:
        raise KeyError(f"{part} adapters missing from the dict: {missing[:5]}")
    with torch.no_grad():
        for key, value in tensors.items():
            if value.shape != slots[key].shape:
                raise ValueError(f"{key}: shape {list(value.shape)}, the model has {list(slots[key].shape)}")
            slots[key].copy_(value)


def is_cross_architecture_key(key: str) -> bool:
    """True for Co-LoRA keys, which any architecture with the same blocks and rank can read."""
    return key.startswith(f"{COLORA_PREFIX}.")


def trainable_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters by learning-rate group: ``pq`` (lora2 P, Q of Co-LoRA layers), ``ab`` (lora2 A, B
    elsewhere) and ``gate`` (gate and noise weights; the noise weight never receives a gradient)."""
    groups: dict[str, list[nn.Parameter]] = {"pq": [], "ab": [], "gate": []}
    for _, layer in adapted_layers(model):
        groups["pq" if layer.co_lora else "ab"].extend(getattr(layer, a) for a in layer.adapter_names("lora2"))
        groups["gate"].extend(getattr(layer, a) for a in layer.adapter_names("gate"))
    return groups


def set_adapter_mixing(model: nn.Module, mixing: Mixing) -> None:
    """Every adapted layer mixes gated (both adapters), local (lora2 alone, no gate) or mean (both, halved)."""
    for _, layer in adapted_layers(model):
        layer.mixing = mixing


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every adapted layer computes only W0 x + b (the frozen model: the reference for RELA's
    signature, the activations for A/B alignment); the previous setting is restored afterwards."""
    layers = [layer for _, layer in adapted_layers(model)]
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous, strict=True):
            layer.enabled = enabled
