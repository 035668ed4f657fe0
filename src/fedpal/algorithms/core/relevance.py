"""FedMosaic's RELA (relevance-guided aggregation) as plain functions: task signatures, their similarity, the
relevance weights and each client's customised global adapter (specs/fedmosaic.md §3 steps 1 and 4, §4).

* A client's **task signature** is the gradient of the cross-entropy on its data with respect to the weight of the
  last block's MLP down-projection of a shared, frozen **reference** model (adapters off), so it depends on the
  data only, never on what the client has trained. `analytic_signature` computes it as the official code does,
  without backprop; `autograd_signature` is the exact gradient (the ``"autograd"`` option of spec §7).
* `sanitize` keeps the first 40 % of its rows and adds Gaussian noise; `running_signature` is the ½-EMA over rounds.
* The server compares signatures column by column (`relevance_similarity`), turns the similarities into softmax
  weights that exclude the client itself (`relevance_weights`), and builds client i's lora1 from the other clients'
  latest lora2 (`global_adapter_for`): Co-LoRA P, Q from every peer, ordinary LoRA A, B from same-architecture peers.

Nothing here knows the engine or holds state; the FedMosaic algorithm calls these functions. Server-side numbers
(similarities, weights, weighted sums) are computed in float64 and adapters come back in their own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.data.tagged_inputs import MODALITY_CODES, is_tagged, untag
from fedpal.errors import UserError
from fedpal.models.adapters import DualAdapterLinear, adapters_disabled, is_cross_architecture_key
from fedpal.models.base import SplitModel
from fedpal.models.mosaic_trunk import Block, MosaicBackbone, MosaicTrunk, trunks_in
from fedpal.models.projection import FlatAdaptiveAvgPool

SIGNATURE_RATIO = 0.4  # rows of the signature a client sends (official gradient_ratio)
SIGNATURE_NOISE_STD = 1e-4  # Gaussian noise on the sent signature (official gradient_noise_std)
RELEVANCE_TEMPERATURE = 0.5  # tau of the relevance softmax (official softmax_temp)


# ---------------------------------------------------------------------------------------------------- signatures
@dataclass(frozen=True)
class _SignatureSite:
    """Where the signature is read in a reference model."""

    trunk: MosaicTrunk
    projection: nn.Module
    head: nn.Linear
    down: nn.Module  # the last block's mlp.down: nn.Linear, or a DualAdapterLinear around one
    down_weight: torch.Tensor  # its frozen weight [width, 4 * width]
    down_weight_name: str  # that weight's name inside the whole model


def _signature_site(reference: SplitModel) -> _SignatureSite:
    backbone = getattr(reference, "backbone", None)
    trunks = trunks_in(reference)
    if not isinstance(backbone, MosaicBackbone) or len(trunks) != 1 or not isinstance(reference.head, nn.Linear):
        raise UserError("a RELA signature needs a mosaic SplitModel: one trunk, its projection and a linear head")
    trunk = backbone.trunk
    down: nn.Module = cast(Block, trunk.blocks[-1]).mlp.down
    if not isinstance(down, nn.Linear | DualAdapterLinear):
        raise UserError(f"the last block's mlp.down is a {type(down).__name__}, not a linear layer")
    down_name = next(name for name, module in reference.named_modules() if module is down)
    weight_name = f"{down_name}.base.weight" if isinstance(down, DualAdapterLinear) else f"{down_name}.weight"
    return _SignatureSite(trunk, backbone.projection, reference.head, down, down.weight, weight_name)


def _single_encode_batches(x: torch.Tensor) -> list[torch.Tensor]:
    """Index sets of ``x`` whose forward runs the trunk's blocks exactly once: task-tagged rows are split by
    modality (the trunk would otherwise run each modality's rows as a separate group), other inputs stay whole.
    Examples do not interact (attention and normalisation act within an example), so the pieces sum up exactly."""
    if not is_tagged(x):
        return [torch.arange(x.shape[0], device=x.device)]
    _, codes, _ = untag(x)
    groups = [(codes == code).nonzero().squeeze(1) for code in MODALITY_CODES.values()]
    return [index for index in groups if index.numel() > 0]


def _norm_jacobian_diagonal(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """d norm(h)_k / d h_k for every token and coordinate k (float64); the off-diagonal entries are dropped.

    LayerNorm, y = gamma (h - mu) / sigma + beta: gamma / sigma * (1 - 1/d - xhat_k^2 / d), i.e. the coupling of
    coordinate k to the others through the mean and the variance is ignored except for its own share.
    RMSNorm (the official model's norm): gamma / rms * (1 - h_k^2 / (d rms^2)), as the official code computes it."""
    eps_dtype = h.dtype  # RMSNorm's default eps is that of the dtype it runs in
    h = h.to(torch.float64)
    d = h.shape[-1]
    if isinstance(norm, nn.Identity):
        return torch.ones_like(h)
    if isinstance(norm, nn.LayerNorm):
        variance = h.var(dim=-1, unbiased=False, keepdim=True) + norm.eps
        centred_sq = (h - h.mean(dim=-1, keepdim=True)).square() / variance
        diagonal = variance.rsqrt() * (1.0 - 1.0 / d - centred_sq / d)
    elif isinstance(norm, nn.RMSNorm):
        eps = norm.eps if norm.eps is not None else torch.finfo(eps_dtype).eps
        mean_square = h.square().mean(dim=-1, keepdim=True) + eps
        diagonal = mean_square.rsqrt() * (1.0 - h.square() / (d * mean_square))
    else:
        raise UserError(f"a RELA signature reads through a LayerNorm, RMSNorm or Identity, not {type(norm).__name__}")
    if norm.weight is not None:
        diagonal = diagonal * norm.weight.to(torch.float64)
    return diagonal


def _back_through_projection(projection: nn.Module, feature: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient at the trunk feature from the gradient at the projection's output (float64): the projection's
    stages (Linear, ReLU, the parameter-free pool, Identity) are replayed forward to know each stage's input."""
    stages = list(projection) if isinstance(projection, nn.Sequential) else [projection]
    inputs = []
    value = feature
    for stage in stages:
        inputs.append(value)
        value = stage(value)
    grad = grad_out
    for stage, stage_input in zip(reversed(stages), reversed(inputs), strict=True):
        if isinstance(stage, nn.Linear):
            grad = grad @ stage.weight.to(torch.float64)
        elif isinstance(stage, nn.ReLU):
            grad = grad * (stage_input > 0)
        elif isinstance(stage, FlatAdaptiveAvgPool):
            # linear without parameters: its matrix is its response to the unit vectors
            width = stage_input.shape[-1]
            matrix = stage(torch.eye(width, dtype=stage_input.dtype, device=stage_input.device)).to(torch.float64)
            grad = grad @ matrix.T
        elif not isinstance(stage, nn.Identity):
            raise UserError(f"a RELA signature cannot read back through a {type(stage).__name__} projection")
    return grad


def analytic_signature(reference: SplitModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task signature as the official code computes it: the cross-entropy gradient w.r.t. the last block's
    ``mlp.down`` weight, [width, 4 * width], by hand and without backprop (specs/fedmosaic.md §3 step 4).

    delta = (softmax(logits) - onehot(y)) / N over the N examples of ``x`` -> back through the head and the
    feature projection -> 1 / T to each of the T tokens the feature averages -> through the final norm by the
    diagonal of its Jacobian only (the mean-centring and variance terms that couple coordinates are dropped, as the
    official code does for its RMSNorm; see `_norm_jacobian_diagonal`) -> outer product with the input of the last
    ``mlp.down``, summed over tokens and examples. The block's residual path makes the gradient at the down
    projection's output equal the gradient at the final norm's input, so with an identity norm this is exact.

    The reference's adapters are switched off for the call, so the signature is always the frozen model's."""
    site = _signature_site(reference)
    total = x.shape[0]
    signature = torch.zeros(site.down_weight.shape, dtype=torch.float64, device=x.device)
    norm_inputs: list[torch.Tensor] = []
    down_inputs: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    hooks = [
        site.trunk.norm.register_forward_hook(lambda _m, args, _o: norm_inputs.append(args[0])),
        site.down.register_forward_hook(lambda _m, args, _o: down_inputs.append(args[0])),
        site.projection.register_forward_hook(lambda _m, args, _o: features.append(args[0])),
    ]
    try:
        with torch.no_grad(), adapters_disabled(reference):
            for index in _single_encode_batches(x):
                for captured in (norm_inputs, down_inputs, features):
                    captured.clear()
                logits = reference(x[index]).to(torch.float64)
                if not len(norm_inputs) == len(down_inputs) == len(features) == 1:
                    raise UserError("a RELA signature needs one pass of the trunk's blocks per forward")
                delta = (logits.softmax(dim=-1) - F.one_hot(y[index], logits.shape[-1]).to(torch.float64)) / total
                grad_feature = _back_through_projection(
                    site.projection, features[0], delta @ site.head.weight.to(torch.float64)
                )
                h = norm_inputs[0]
                tokens = h.shape[1]
                grad_h = (grad_feature / tokens).unsqueeze(1) * _norm_jacobian_diagonal(site.trunk.norm, h)
                signature += torch.einsum("btw,btk->wk", grad_h, down_inputs[0].to(torch.float64))
    finally:
        for hook in hooks:
            hook.remove()
    return signature.to(site.down_weight.dtype)


def autograd_signature(reference: SplitModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact gradient of the mean cross-entropy w.r.t. the last block's ``mlp.down`` weight (the frozen base
    weight when the layer carries adapters), by autograd on a stand-in copy of that weight, so the model's own
    parameters and ``requires_grad`` flags stay untouched. Adapters are off for the call, as in
    `analytic_signature`."""
    site = _signature_site(reference)
    probe = site.down_weight.detach().clone().requires_grad_(True)
    with torch.enable_grad(), adapters_disabled(reference):
        logits = torch.func.functional_call(reference, {site.down_weight_name: probe}, (x,))
        (gradient,) = torch.autograd.grad(F.cross_entropy(logits, y), probe)
    return gradient


def sanitize(
    signature: torch.Tensor,
    generator: torch.Generator,
    *,
    ratio: float = SIGNATURE_RATIO,
    noise_std: float = SIGNATURE_NOISE_STD,
) -> torch.Tensor:
    """What a client sends: the first floor(ratio * rows) rows (output dimensions) plus N(0, noise_std^2) noise drawn
    from ``generator`` (on the generator's device, so a seed gives the same noise under every executor). Fewer rows
    shrink the upload and, with the noise, reveal less of the client's data."""
    if not 0.0 < ratio <= 1.0:
        raise UserError(f"the signature ratio must be in (0, 1], got {ratio}")
    if noise_std < 0.0:
        raise UserError(f"the signature noise std must be >= 0, got {noise_std}")
    rows = math.floor(ratio * signature.shape[0])
    if rows < 1:
        raise UserError(f"a ratio of {ratio} keeps no row of a {signature.shape[0]}-row signature")
    kept = signature[:rows]
    noise = torch.randn(kept.shape, generator=generator, dtype=kept.dtype, device=generator.device)
    return kept + noise_std * noise.to(kept.device)


def running_signature(previous: torch.Tensor | None, round_mean: torch.Tensor) -> torch.Tensor:
    """g_i after a round: ½ (this round's mean signature + the previous g_i), or the round's mean the first time,
    so older tasks fade but are not forgotten at once."""
    if previous is None:
        return round_mean.clone()
    if previous.shape != round_mean.shape:
        raise ValueError(f"signature shapes differ: {list(previous.shape)} and {list(round_mean.shape)}")
    return 0.5 * (round_mean + previous)


# ---------------------------------------------------------------------------------------------- server: weights
def relevance_similarity(signatures: Sequence[torch.Tensor]) -> torch.Tensor:
    """S [n, n] (float64): S_ij = the mean over columns k of cos(g_i[:, k], g_j[:, k]). A column is what one
    intermediate unit of the down projection contributes, so columns are compared unit by unit; a zero column
    counts as cosine 0 (not NaN)."""
    if not signatures:
        return torch.zeros(0, 0, dtype=torch.float64, device="cpu")
    shape = signatures[0].shape
    if signatures[0].dim() != 2 or any(g.shape != shape for g in signatures):
        raise ValueError(f"signatures must be matrices of one shape, got {[list(g.shape) for g in signatures]}")
    stacked = torch.stack([g.to(torch.float64) for g in signatures])  # [n, rows, columns]
    norms = stacked.norm(dim=1, keepdim=True)
    unit = stacked / torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.einsum("irk,jrk->ij", unit, unit) / shape[1]


def relevance_weights(
    similarity: torch.Tensor, tau: float = RELEVANCE_TEMPERATURE, architectures: Sequence[str] | None = None
) -> torch.Tensor:
    """omega [n, n] (float64): row i is softmax_j(S_ij / tau) over the allowed peers j, 0 elsewhere. The client
    itself is never allowed (its weight is exactly 0, as the official -1e9 logit gives); with ``architectures`` only
    same-architecture peers are (omega^homo). A row with no allowed peer is all zeros: the caller keeps the client's
    own lora2 there. Masking instead of -1e9 logits gives the same weights with exact zeros."""
    n = similarity.shape[0]
    if similarity.shape != (n, n):
        raise ValueError(f"the similarity matrix must be square, got {list(similarity.shape)}")
    if tau <= 0.0:
        raise UserError(f"the relevance temperature must be > 0, got {tau}")
    allowed = ~torch.eye(n, dtype=torch.bool, device=similarity.device)
    if architectures is not None:
        if len(architectures) != n:
            raise ValueError(f"{len(architectures)} architectures for {n} clients")
        same = torch.tensor([[a == b for b in architectures] for a in architectures], device=similarity.device)
        allowed &= same
    logits = (similarity.to(torch.float64) / tau).masked_fill(~allowed, -math.inf)
    weights = logits.softmax(dim=1)
    return torch.where(allowed.any(dim=1, keepdim=True), weights, torch.zeros_like(weights))


# ------------------------------------------------------------------------------------------- server: adapters
def first_round_global(own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Round 0 (no signatures yet): lora1 is a copy of the client's own lora2, so nothing is shared."""
    return {key: value.detach().clone() for key, value in own.items()}


def _weighted_sum(
    key: str, own: torch.Tensor, peers: Mapping[int, Mapping[str, torch.Tensor]], row: torch.Tensor
) -> torch.Tensor:
    """sum_j row[j] * lora2_j[key] / sum_j row[j] over the ``peers`` holding ``key`` (float64, in client order),
    or a copy of ``own`` when those peers carry no weight."""
    holders = [j for j in sorted(peers) if key in peers[j]]
    total = float(row[holders].sum()) if holders else 0.0
    if total <= 0.0:
        return own.detach().clone()
    mixed = torch.zeros(own.shape, dtype=torch.float64, device=own.device)
    for j in holders:
        tensor = peers[j][key]
        if tensor.shape != own.shape:
            raise ValueError(f"{key}: client {j} has shape {list(tensor.shape)}, the receiver {list(own.shape)}")
        mixed += (float(row[j]) / total) * tensor.detach().to(device=own.device, dtype=torch.float64)
    return mixed.to(own.dtype)


def global_adapter_for(
    i: int,
    lora2_states: Sequence[Mapping[str, torch.Tensor] | None],
    architectures: Sequence[str],
    omega: torch.Tensor,
    omega_homo: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Client i's lora1 for a round t > 0 (specs/fedmosaic.md §3 step 1), with the keys of its own lora2:

    * Co-LoRA keys (P, Q matched by block index): sum over every other client j holding that key, whatever its
      architecture, of omega_ij * lora2_j;
    * other keys (LoRA A, B): sum over the other clients of i's architecture of omega^homo_ij * lora2_j.

    ``lora2_states[j]`` is client j's latest lora2, or None for a client that has not trained yet: such clients are
    skipped and the weights renormalised over the peers that remain (the same rule skips a peer without the key).
    When no remaining peer carries weight (client i alone in its architecture, or every peer skipped), the key is
    client i's own lora2, as in the official code. ``lora2_states[i]`` must be given (a client that has not
    trained passes its initial lora2). Use `first_round_global` in round 0. Weighted sums are taken in float64 in
    client order and cast back to the tensor's dtype."""
    n = len(lora2_states)
    own = lora2_states[i]
    if own is None:
        raise ValueError(f"client {i}'s own lora2 is needed (its initial one if it has not trained yet)")
    if len(architectures) != n or omega.shape != (n, n) or omega_homo.shape != (n, n):
        raise ValueError(f"{n} states need {n} architectures and [{n}, {n}] weights")
    others = {j: state for j, state in enumerate(lora2_states) if j != i and state is not None}
    same_architecture = {j: state for j, state in others.items() if architectures[j] == architectures[i]}
    return {
        key: _weighted_sum(key, tensor, others, omega[i])
        if is_cross_architecture_key(key)
        else _weighted_sum(key, tensor, same_architecture, omega_homo[i])
        for key, tensor in own.items()
    }
