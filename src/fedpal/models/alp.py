"""The ALP layer (ALignment with Prototypes) of FedAli (Ek et al., 2024; official code getalp/FedAli).

Each token embedding e (a LayerNorm output) is assigned to one prototype by an entropic optimal-transport plan
(Sinkhorn) between the tokens of the batch and a prototype bank, and the layer returns the L2-normalised mix
``lam * GLU(p) + (1 - lam) * e``. Because the plan spreads the tokens over all prototypes (every prototype column
sums to one), popular prototypes are down-weighted: the chosen prototype is not the plain cosine argmax.

Two non-trainable banks of K rows each: a local (personal) bank L and a global (shared) bank G.

* Training: the plan runs over [L; G]; a token mixes with its **global** prototype (a shared anchor against client
  drift) and L moves by EMA toward the tokens its columns take (once per forward pass).
* Inference: the plan runs over L only and a token mixes with its local prototype.

The banks are buffers: they get no gradient, the optimizer never sees them, and only FedAli's server k-means
rebuilds G. The assignment is an argmax, so the plan itself carries no gradient either; gradients reach the token
and the GLU only through the mix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

MatchMethod = Literal["ot", "cosine"]
BankUpdate = Literal["soft", "hard"]


def sinkhorn_plan(similarity: torch.Tensor, eps: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Transport plan between N tokens (rows) and M prototypes (columns), as in the official ``sinkhorn_matrix``.

    T = exp(S / eps), scaled to total mass one; then ``iterations`` times: divide each row by its sum and by N,
    divide each column by its sum and by M; finally multiply by M, so every column sums to one and the rows sum
    to about M / N. The maximum is subtracted before the exponential (the global normalisation cancels it), so
    eps = 0.05 cannot overflow.
    """
    n, m = similarity.shape
    plan = torch.exp((similarity - similarity.max()) / eps)
    plan = plan / plan.sum()
    for _ in range(iterations):
        plan = plan / plan.sum(dim=1, keepdim=True) / n
        plan = plan / plan.sum(dim=0, keepdim=True) / m
    return plan * m


def sinkhorn_scalings(
    similarity: torch.Tensor, eps: float = 0.05, iterations: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same plan as `sinkhorn_plan`, kept factored: plan = M * u[:, None] * kernel * v[None, :].

    Each row or column normalisation of the plan only rescales u or v, so 3 iterations cost 6 matrix-vector
    products instead of 12 full-matrix divisions. Row-wise argmaxes need only kernel * v and column-wise top-k
    only u * kernel (the other factor is constant along the reduction), which is all the ALP layer reads.
    """
    n, m = similarity.shape
    kernel = torch.exp((similarity - similarity.max()) / eps)
    u = torch.ones(n, dtype=kernel.dtype, device=kernel.device)
    v = torch.ones(m, dtype=kernel.dtype, device=kernel.device)
    for _ in range(iterations):
        u = 1.0 / (n * (kernel @ v))
        v = 1.0 / (m * (kernel.T @ u))
    return kernel, u * m, v


def cosine_similarity_matrix(tokens: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """S_ij = cos(e_i, a_j) from one matrix product of row-normalised tokens and prototypes."""
    return F.normalize(tokens, dim=1) @ F.normalize(bank, dim=1).T


def soft_bank_update(
    bank: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, beta: float, batch_size: int
) -> None:
    """The official "bulk" update, in place: every prototype k moves toward the weighted mean of its s tokens.

    ``weights`` is the [N, K] block of the plan for this bank. Prototype k takes the s = max(1, B // K) tokens
    with the largest weight in its column (B = the batch size in windows, not tokens), renormalises those
    weights to sum to one, and L_k <- beta * L_k + (1 - beta) * c_k.
    """
    k = bank.shape[0]
    s = min(max(1, batch_size // k), tokens.shape[0])
    top_weights, top_index = weights.topk(s, dim=0)  # [s, K]
    top_weights = top_weights / top_weights.sum(dim=0, keepdim=True)
    centres = (tokens[top_index] * top_weights.unsqueeze(-1)).sum(dim=0)  # [K, d]
    bank.mul_(beta).add_(centres, alpha=1.0 - beta)


def hard_bank_update(bank: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, beta: float) -> None:
    """The official single update, in place: each token's argmax prototype moves toward it, from its old value.

    When several tokens pick one prototype the official scatter keeps one write; here the last token (highest
    index) wins, deterministically. Prototypes no token picked stay bit-identical.
    """
    assignment = weights.argmax(dim=1)
    positions = torch.arange(tokens.shape[0], device=tokens.device)
    last = torch.full((bank.shape[0],), -1, dtype=torch.long, device=tokens.device)
    last.scatter_reduce_(0, assignment, positions, reduce="amax")
    hit = last >= 0
    bank[hit] = beta * bank[hit] + (1.0 - beta) * tokens[last[hit]]


@dataclass(frozen=True)
class ALPSettings:
    """Run-time settings of every ALP layer of a model. A layer holds defaults; a forward call may pass its own
    (``model(x, alp=ALPSettings(...))``), which is how FedAli sets lambda per round without changing the module."""

    lam: float = 0.2  # influence factor: weight of the gated prototype in the mix
    beta: float = 0.999  # local-bank EMA decay
    eps: float = 0.05  # Sinkhorn entropy
    iterations: int = 3  # Sinkhorn iterations
    bank_update: BankUpdate = "soft"  # "soft" (bulk, official pre-trained path) | "hard" (single update)
    match_method: MatchMethod = "ot"  # "ot" (Sinkhorn plan) | "cosine" (plain cosine argmax)
    use_glu: bool = True
    update_banks: bool = True  # EMA the local bank in training passes (off for frozen evaluation passes)


class GatedLinearUnit(nn.Module):
    """q = (W_a p + b_a) * sigmoid(W_b p + b_b) from one Dense d -> 2d, as in the official GLU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear(x).chunk(2, dim=-1)
        return value * torch.sigmoid(gate)


class ALPLayer(nn.Module):
    """Token -> normalised mix of the token and its (gated) OT-assigned prototype; see the module docstring."""

    def __init__(self, width: int, bank_size: int) -> None:
        super().__init__()
        self.bank_size = bank_size
        self.register_buffer("local_bank", torch.randn(bank_size, width))
        self.register_buffer("global_bank", torch.randn(bank_size, width))
        self.glu = GatedLinearUnit(width)
        self.settings = ALPSettings()
        self.last_assignment: torch.Tensor | None = None  # indices into the active bank, for tests and diagnostics

    local_bank: torch.Tensor
    global_bank: torch.Tensor

    def plan(
        self, tokens: torch.Tensor, bank: torch.Tensor, settings: ALPSettings | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kernel, u, v) with plan = u * kernel * v; for cosine matching the similarities with unit scalings."""
        s = settings or self.settings
        similarity = cosine_similarity_matrix(tokens, bank)
        if s.match_method == "cosine":
            n, m = similarity.shape
            return similarity, similarity.new_ones(n), similarity.new_ones(m)
        return sinkhorn_scalings(similarity, s.eps, s.iterations)

    def forward(self, h: torch.Tensor, settings: ALPSettings | None = None) -> torch.Tensor:
        """``settings`` of this call (None: the layer's defaults)."""
        s = settings or self.settings
        batch, tokens_per_window, width = h.shape
        e = h.reshape(-1, width)
        with torch.no_grad():
            tokens = e.detach()
            k = self.bank_size
            if self.training:
                kernel, u, v = self.plan(tokens, torch.cat([self.local_bank, self.global_bank]), s)
                assignment = (kernel[:, k:] * v[k:]).argmax(dim=1)
                prototypes = self.global_bank[assignment]
                if s.update_banks:
                    # Column-wise reductions over the local block: v_j is constant along each column.
                    local_weights = u[:, None] * kernel[:, :k]
                    if s.bank_update == "hard":
                        hard_bank_update(self.local_bank, tokens, local_weights * v[:k], s.beta)
                    else:
                        soft_bank_update(self.local_bank, tokens, local_weights, s.beta, batch)
            else:
                kernel, _, v = self.plan(tokens, self.local_bank, s)
                assignment = (kernel * v).argmax(dim=1)
                prototypes = self.local_bank[assignment]
            self.last_assignment = assignment
        if s.lam == 0.0:
            mixed = e
        else:
            gated = self.glu(prototypes) if s.use_glu else prototypes
            mixed = s.lam * gated + (1.0 - s.lam) * e
        return F.normalize(mixed, dim=1).reshape(batch, tokens_per_window, width)


def alp_layers(module: nn.Module) -> Iterator[ALPLayer]:
    """Every ALP layer of a model, in block order."""
    for child in module.modules():
        if isinstance(child, ALPLayer):
            yield child
