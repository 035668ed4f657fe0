"""FedMosaic's once-only A/B alignment of a larger model's Co-LoRA layers to the reference (smallest) model.

P and Q are averaged across architectures only if the same code (A x) means the same thing in every model.
Before any federated round, on public inputs that no client holds (specs/fedmosaic.md §3 step 0):

* **A**: train only the larger model's block-end A so that A_big h_big matches A_ref h_ref at the same block index
  and module on the same inputs (h: the frozen model's input to that layer, adapters off). Loss = the sum over the
  paired layers of the mean squared difference + 0.5 x the layer-average of the mean squared off-diagonal cosine
  between A's d_in columns (length r), as coded (``ortho="rows"``: between its r rows). AdamW, weight decay 0,
  cosine schedule with 10 % linear warm-up. Then A is replaced by the nearest row-orthonormal matrix U V^T.
* **B**: with P = I and Q = 0, collect both models' B outputs X over all tokens of a subset of those inputs (the
  larger model with its aligned A and its own initial B), centre them, S = X^T X + 1e-4 I (not divided by N),
  M = S_big^-1/2 S_big,ref S_ref^-1/2 = U S V^T and T = S_big^1/2 U V^T S_ref^-1/2 (d_big x d_ref), the official
  (S_ref^-1/2 V U^T (S_big^1/2)^T)^T; then B_big = T B_ref. P and Q of both models are reset to 0.

T is the canonical-correlation map: whiten the reference's outputs, rotate them onto the larger model's whitened
outputs (U V^T maximises tr(R^T M), the sum of canonical correlations, over semi-orthogonal R), colour them with the
larger model's covariance. The report gives, per layer pair, the A mismatch before and after, and the B mismatch
||(X_big - X_ref T^T) S_big^-1/2||_F^2 for the map implied before (B_big B_ref^+) and after (T).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.errors import UserError
from fedpal.models.adapters import DualAdapterLinear, adapters_disabled, co_lora_layers

Runner = Callable[[nn.Module, torch.Tensor], object]
PairKey = tuple[int, str]
EVAL_BATCH = 256  # inputs per forward pass when only measuring (no optimiser step)


@dataclass(frozen=True)
class AlignmentSettings:
    """The alignment pass. Sample counts are the spec's CPU scale (2,000 for A, 100 for B; the authors use
    5,000 / 100); batch 4 is the authors' effective batch. The learning rate is a CPU-scale choice: the
    authors' 5e-5 barely moves A in 500 steps. Measured on 2,000 random inputs, summed A error before / after:
    encoders of width 64 and 128, 23-fold with 1e-2 (3e-3: 21-fold, 3e-2: 20-fold); widths 16 and 32, 10-fold
    with 1e-2 (1e-3: 4-fold)."""

    samples_a: int = 2000
    samples_b: int = 100
    batch_size: int = 4
    epochs: int = 1
    lr: float = 1e-2
    warmup: float = 0.1
    ortho_weight: float = 0.5
    ortho: Literal["columns", "rows"] = "columns"
    ridge: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples_a < 1 or self.samples_b < 1 or self.batch_size < 1 or self.epochs < 0:
            raise UserError("alignment needs at least one sample for A and B, a batch size >= 1 and epochs >= 0")
        if self.ortho not in ("columns", "rows"):
            raise UserError(f"unknown orthogonality term '{self.ortho}'; choose columns or rows")


@dataclass(frozen=True)
class LayerAlignment:
    """One paired Co-LoRA layer (block index, name inside the block): the A mean squared error before training,
    after training and after the orthonormal projection; the orthogonality term before and after; the B mismatch
    before and after; and the mean of the r largest canonical correlations between the two models' B outputs."""

    block: int
    site: str
    a_mse_before: float
    a_mse_trained: float
    a_mse_after: float
    a_ortho_before: float
    a_ortho_after: float
    b_mismatch_before: float
    b_mismatch_after: float
    b_canonical_correlation: float


@dataclass(frozen=True)
class AlignmentReport:
    layers: tuple[LayerAlignment, ...]
    steps: int
    ortho_weight: float

    @property
    def a_mse_before(self) -> float:
        return sum(layer.a_mse_before for layer in self.layers)

    @property
    def a_mse_after(self) -> float:
        return sum(layer.a_mse_after for layer in self.layers)

    @property
    def a_loss_before(self) -> float:
        """The A objective on the whole alignment set before training (`a_objective`)."""
        mse, ortho = ([getattr(layer, f"a_{kind}_before") for layer in self.layers] for kind in ("mse", "ortho"))
        return float(a_objective(torch.tensor(mse, device="cpu"), torch.tensor(ortho, device="cpu"), self.ortho_weight))

    @property
    def a_loss_after(self) -> float:
        mse, ortho = ([getattr(layer, f"a_{kind}_after") for layer in self.layers] for kind in ("mse", "ortho"))
        return float(a_objective(torch.tensor(mse, device="cpu"), torch.tensor(ortho, device="cpu"), self.ortho_weight))

    @property
    def b_mismatch_before(self) -> float:
        return sum(layer.b_mismatch_before for layer in self.layers)

    @property
    def b_mismatch_after(self) -> float:
        return sum(layer.b_mismatch_after for layer in self.layers)


def a_objective(mse: torch.Tensor, ortho: torch.Tensor, ortho_weight: float) -> torch.Tensor:
    """The A loss from per-layer terms: the sum of the layers' mean squared errors + weight x the layers' mean
    orthogonality term (the official loss; the training steps and the report both use it)."""
    return mse.sum() + ortho_weight * ortho.mean()


def closest_row_orthonormal(a: torch.Tensor) -> torch.Tensor:
    """U V^T of A's thin SVD: the row-orthonormal matrix nearest to A (r <= d_in) in Frobenius norm."""
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return (u @ vh).to(a.dtype)


def orthogonality_penalty(a: torch.Tensor, over: Literal["columns", "rows"] = "columns") -> torch.Tensor:
    """Mean squared off-diagonal cosine between A's columns (d_in vectors of length r, as the official code) or
    between its rows (the r rank directions)."""
    unit = F.normalize(a, dim=0) if over == "columns" else F.normalize(a, dim=1).T
    cosines = unit.T @ unit
    off_diagonal = ~torch.eye(cosines.shape[0], dtype=torch.bool, device=a.device)
    return cosines[off_diagonal].pow(2).mean()


def _sym_power(s: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(s)
    return (vectors * values.clamp_min(torch.finfo(s.dtype).tiny).pow(power)) @ vectors.T


def _covariances(x_big: torch.Tensor, x_ref: torch.Tensor, ridge: float) -> tuple[torch.Tensor, ...]:
    """Centred float64 outputs and S_big, S_ref (ridge added) and S_big,ref."""
    xb = x_big.double() - x_big.double().mean(dim=0, keepdim=True)
    xr = x_ref.double() - x_ref.double().mean(dim=0, keepdim=True)
    s_big = xb.T @ xb + ridge * torch.eye(xb.shape[1], dtype=torch.float64, device=xb.device)
    s_ref = xr.T @ xr + ridge * torch.eye(xr.shape[1], dtype=torch.float64, device=xr.device)
    return xb, xr, s_big, s_ref, xb.T @ xr


def cca_map(x_big: torch.Tensor, x_ref: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, canonical correlations): T = S_big^1/2 U V^T S_ref^-1/2 (d_big x d_ref) from M = U S V^T, computed in
    float64; rows of ``x_*`` are tokens."""
    _, _, s_big, s_ref, cross = _covariances(x_big, x_ref, ridge)
    ref_inv_sqrt = _sym_power(s_ref, -0.5)
    m = _sym_power(s_big, -0.5) @ cross @ ref_inv_sqrt
    u, sigma, vh = torch.linalg.svd(m, full_matrices=False)
    return _sym_power(s_big, 0.5) @ u @ vh @ ref_inv_sqrt, sigma


def whitened_mismatch(x_big: torch.Tensor, x_ref: torch.Tensor, t: torch.Tensor, ridge: float = 1e-4) -> float:
    """||(X_big - X_ref T^T) S_big^-1/2||_F^2 on centred outputs: how far the reference's outputs carried by T are
    from the larger model's, in the larger model's whitened coordinates (S is not divided by N, so whitened
    outputs have unit norm per direction). 0 for a perfect map, about 2r for unrelated rank-r outputs; the CCA
    map minimises it over the maps S_big^1/2 R S_ref^-1/2 with R semi-orthogonal, to 2 * sum(1 - correlation)
    when d_big >= d_ref."""
    xb, xr, s_big, _, _ = _covariances(x_big, x_ref, ridge)
    residual = (xb - xr @ t.double().T) @ _sym_power(s_big, -0.5)
    return float(residual.pow(2).sum())


def _pairs(big: nn.Module, reference: nn.Module) -> list[tuple[PairKey, DualAdapterLinear, DualAdapterLinear]]:
    """The Co-LoRA layers of both models paired by (block index, name inside the block)."""
    big_layers, ref_layers = co_lora_layers(big), co_lora_layers(reference)
    if not ref_layers or set(big_layers) != set(ref_layers):
        raise UserError(
            f"the models' Co-LoRA layers do not pair up: {sorted(big_layers)} vs reference {sorted(ref_layers)}"
        )
    pairs = [(key, big_layers[key], ref_layers[key]) for key in sorted(ref_layers)]
    for key, b, r in pairs:
        if b.rank != r.rank:
            raise UserError(f"Co-LoRA layer {key}: rank {b.rank} vs the reference's {r.rank}")
    return pairs


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode with adapters off (activations of the frozen model) for one block; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model), torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _layer_inputs(
    model: nn.Module, layers: list[DualAdapterLinear], x: torch.Tensor, run: Runner
) -> list[torch.Tensor]:
    """Each layer's input on ``x`` as [tokens, d_in], from the frozen model with adapters off. A model that calls
    a layer several times in one forward (a mosaic trunk groups task-tagged rows by modality) gives the calls'
    tokens in call order; both models of a pair group alike, so their token sequences stay paired."""
    seen: dict[int, list[torch.Tensor]] = {}

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.setdefault(id(module), []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handles = [layer.register_forward_pre_hook(keep) for layer in layers]
    try:
        with _frozen_eval(model):
            run(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(seen[id(layer)]) for layer in layers]


def _call(model: nn.Module, x: torch.Tensor) -> object:
    return model(x)


def _cosine_with_warmup(total: int, warmup: float) -> Callable[[int], float]:
    """The Hugging Face cosine schedule with ceil(warmup x total) linear warm-up steps (the authors' trainer)."""
    warm = math.ceil(total * warmup)

    def factor(step: int) -> float:
        if step < warm:
            return step / max(1, warm)
        progress = (step - warm) / max(1, total - warm)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


class _PairedInputs:
    """Layer inputs of both models on slices of the public inputs."""

    def __init__(
        self,
        big: nn.Module,
        reference: nn.Module,
        pairs: list[tuple[PairKey, DualAdapterLinear, DualAdapterLinear]],
        inputs: torch.Tensor,
        run_big: Runner,
        run_reference: Runner,
    ) -> None:
        self.big, self.reference, self.inputs = big, reference, inputs
        self.big_layers = [b for _, b, _ in pairs]
        self.ref_layers = [r for _, _, r in pairs]
        self.run_big, self.run_reference = run_big, run_reference

    def __call__(self, index: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = self.inputs[index]
        h_big = _layer_inputs(self.big, self.big_layers, x, self.run_big)
        h_ref = _layer_inputs(self.reference, self.ref_layers, x, self.run_reference)
        for (hb, hr), layer in zip(zip(h_big, h_ref, strict=True), self.big_layers, strict=True):
            if hb.shape[0] != hr.shape[0]:
                raise UserError(
                    f"Co-LoRA layer ({layer.block}, '{layer.site}'): {hb.shape[0]} tokens in the larger model vs "
                    f"{hr.shape[0]} in the reference; alignment compares the same token sequence"
                )
        return list(zip(h_big, h_ref, strict=True))


def _a_mse(activations: _PairedInputs, index: torch.Tensor, a_big: list[torch.Tensor]) -> list[float]:
    """Per layer, the mean squared difference of A_big h_big and A_ref h_ref over every element of the set."""
    sums = [0.0] * len(a_big)
    count = [0] * len(a_big)
    for start in range(0, index.numel(), EVAL_BATCH):
        for i, (hb, hr) in enumerate(activations(index[start : start + EVAL_BATCH])):
            target = F.linear(hr, activations.ref_layers[i].A)
            sums[i] += float((F.linear(hb, a_big[i]) - target).double().pow(2).sum())
            count[i] += target.numel()
    return [s / n for s, n in zip(sums, count, strict=True)]


def align_to_reference(
    big: nn.Module,
    reference: nn.Module,
    inputs: torch.Tensor,
    settings: AlignmentSettings | None = None,
    *,
    run_big: Runner | None = None,
    run_reference: Runner | None = None,
) -> AlignmentReport:
    """Align ``big``'s Co-LoRA A and B to ``reference``'s in place (both wrapped by `add_dual_adapters` with the same
    rank and number of blocks) on public ``inputs`` [N, ...]; the reference is not changed except that P and Q
    of both are reset to 0. ``run_*(model, batch)`` calls a model (default ``model(batch)``); both must see the same
    token sequence. The first ``samples_a`` inputs of a permutation seeded by ``settings.seed`` align A, the
    first ``samples_b`` of them B. Returns the per-layer report."""
    settings = settings or AlignmentSettings()
    pairs = _pairs(big, reference)
    order = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(settings.seed), device="cpu")
    a_index = order[: settings.samples_a].to(inputs.device)
    b_index = order[: settings.samples_b].to(inputs.device)
    activations = _PairedInputs(big, reference, pairs, inputs, run_big or _call, run_reference or _call)

    # --- A: train the larger model's block-end A on the paired projections
    start = [b.A.detach().clone() for _, b, _ in pairs]
    before = _a_mse(activations, a_index, start)
    trained = [a.clone().requires_grad_(True) for a in start]
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=0.0)
    batches = [a_index[i : i + settings.batch_size] for i in range(0, a_index.numel(), settings.batch_size)]
    total = settings.epochs * len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(total, settings.warmup))
    steps = 0
    for _ in range(settings.epochs):
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            mse = torch.stack(
                [
                    (F.linear(hb, a) - F.linear(hr, ref.A)).pow(2).mean()
                    for a, (hb, hr), ref in zip(trained, activations(batch), activations.ref_layers, strict=True)
                ]
            )
            ortho = torch.stack([orthogonality_penalty(a, settings.ortho) for a in trained])
            a_objective(mse, ortho, settings.ortho_weight).backward()
            optimizer.step()
            schedule.step()
            steps += 1
    fitted = [a.detach() for a in trained]
    after_training = _a_mse(activations, a_index, fitted)
    aligned = [closest_row_orthonormal(a) for a in fitted]
    after = _a_mse(activations, a_index, aligned)
    with torch.no_grad():
        for (_, b, _), a in zip(pairs, aligned, strict=True):
            b.A.copy_(a)

    # --- B: the CCA map from the reference's B outputs to the larger model's (P = I, Q = 0)
    outputs_big: list[list[torch.Tensor]] = [[] for _ in pairs]
    outputs_ref: list[list[torch.Tensor]] = [[] for _ in pairs]
    for i in range(0, b_index.numel(), EVAL_BATCH):
        for j, (hb, hr) in enumerate(activations(b_index[i : i + EVAL_BATCH])):
            _, b_layer, r_layer = pairs[j]
            outputs_big[j].append(F.linear(F.linear(hb, b_layer.A), b_layer.B))
            outputs_ref[j].append(F.linear(F.linear(hr, r_layer.A), r_layer.B))
    layers = []
    for j, ((block, site), b_layer, r_layer) in enumerate(pairs):
        x_big, x_ref = torch.cat(outputs_big[j]), torch.cat(outputs_ref[j])
        implied = b_layer.B.double() @ torch.linalg.pinv(r_layer.B.double())
        t, correlations = cca_map(x_big, x_ref, settings.ridge)
        mismatch_before = whitened_mismatch(x_big, x_ref, implied, settings.ridge)
        mismatch_after = whitened_mismatch(x_big, x_ref, t, settings.ridge)
        with torch.no_grad():
            b_layer.B.copy_((t @ r_layer.B.double()).to(b_layer.B.dtype))
        layers.append(
            LayerAlignment(
                block=block,
                site=site,
                a_mse_before=before[j],
                a_mse_trained=after_training[j],
                a_mse_after=after[j],
                a_ortho_before=float(orthogonality_penalty(start[j], settings.ortho)),
                a_ortho_after=float(orthogonality_penalty(aligned[j], settings.ortho)),
                b_mismatch_before=mismatch_before,
                b_mismatch_after=mismatch_after,
                b_canonical_correlation=float(correlations[: b_layer.rank].mean()),
            )
        )
    with torch.no_grad():
        for _, b_layer, r_layer in pairs:
            for layer in (b_layer, r_layer):
                for name in layer.adapter_names("lora1") + layer.adapter_names("lora2"):
                    getattr(layer, name).zero_()
    return AlignmentReport(tuple(layers), steps, settings.ortho_weight)
