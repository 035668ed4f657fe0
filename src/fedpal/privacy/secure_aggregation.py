"""Simulated secure aggregation: the server learns only the sum of the survivors' updates, and what that costs.

The arithmetic of the protocol is executed exactly; its cryptography (key agreement, Shamir sharing, encryption)
is not: pair and self-mask seeds are derived from (seed, round, ids), and the simulation checks that enough shares
would survive to reconstruct what the server must remove, and counts the messages and bytes they take.

Protocol (Bonawitz et al., CCS 2017, with SecAgg+'s neighbour graph, Bell et al. 2020; Flower's SecAgg+ defaults):
1. Quantization: each coordinate x is clipped to [−R, R] (R = 8) and mapped to an integer in [0, L] (L = 2²²
   levels): ⌊(x + R)·L/(2R) + u⌋ with u ~ U[0, 1) (stochastic rounding, unbiased) or u = ½ (nearest). Clipped
   DP updates satisfy |x| ≤ ‖Δ‖ ≤ C, so C ≤ R never touches the range. The sum of n quantized values is ≤ n·L and
   must stay below the modulus M = 2³² (n ≤ 1023 at the defaults); the dequantized sum is off from the plain sum
   by < n·2R/L per coordinate (stochastic) or ≤ n·R/L (nearest).
2. Masking: client i sends y_i = q_i + PRG(b_i) + Σ_{j∈N(i), j>i} PRG(s_ij) − Σ_{j∈N(i), j<i} PRG(s_ij) mod M,
   with b_i its self-mask seed and s_ij the seed it agreed with neighbour j; the pair masks of i and j are
   opposite (mask_ij = −mask_ji mod M), so they cancel in the sum. N(i) is every other client (``num_shares``
   None: Bonawitz's complete graph) or, with ``num_shares`` = g (odd), the (g − 1)/2 clients on either side of i in
   the ring of sorted ids (SecAgg+).
3. Dropouts: a client that took part in the key exchange but sent no masked vector leaves its pair masks in its
   neighbours' vectors. At unmasking, each survivor sends the shares it holds: of b_o for surviving owners o, of
   the secret key of dropped owners. The server rebuilds b_o for every survivor and s_uv for every dropped u and
   surviving neighbour v, and removes those masks. Each secret is split into g shares (held by its owner and its
   g − 1 neighbours) with threshold t (``reconstruction_threshold``; default ⌊g/2⌋ + 1): every secret needs t
   shares from survivors, otherwise the round cannot be unmasked (``TooManyDropouts``). With the complete graph
   that allows up to n − t dropouts.

Byte model per round (n clients at key exchange, U survivors, D = n − U dropped, g share holders per secret, d
coordinates), with 32-byte public keys (X25519), 4-byte client ids, Shamir shares of 32-byte secrets sent as
36 bytes (4-byte index + value), and AES-GCM encryption adding 28 bytes (12 nonce + 16 tag):
- advertise keys: n·2·32 up; each client receives its g − 1 neighbours' id and two keys: n·(g − 1)·(4 + 64) down;
- share keys: each client sends g − 1 ciphertexts (two ids, a share of b_i and of its secret key, 8 + 2·36 + 28 =
  108 bytes) up, and receives the g − 1 addressed to it: n·(g − 1)·108 up and the same down;
- masked input: U·4·d up (integers mod 2³², 4 bytes per coordinate, as float32 would take);
- unmask: each survivor receives the status of its g − 1 neighbours by id, (g − 1)·4, and sends the g shares it
  holds, each with its owner's id, g·(4 + 36): U·(g − 1)·4 down, U·g·40 up.
The overhead is everything but the U·4·d a plain float32 upload takes. Messages: 2 per client per exchange stage
(up and down), 1 per survivor for the masked vector, 2 per survivor for unmasking.

Secure aggregation reveals only a sum, so it serves only sum-like reducers (``SUM_REDUCERS``); a median or Krum
needs each update in the clear and is refused, and norm bounding must run on the clients (``clipping``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from fedpal.common.seeding import generator_for
from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError, UserError

SUM_REDUCERS: tuple[str, ...] = ("sum", "mean")
KEY_BYTES = 32  # one X25519 public key
ID_BYTES = 4  # one client id
SHARE_BYTES = 36  # Shamir share of a 32-byte secret: 4-byte index + 32-byte value
ENCRYPTION_BYTES = 28  # AES-GCM: 12-byte nonce + 16-byte tag
COORDINATE_BYTES = 4  # a masked integer mod 2^32


class TooManyDropouts(UserError):
    """Too few survivors hold shares of a secret the server must rebuild: the round cannot be unmasked."""


def require_sum_reducer(reducer: str) -> None:
    """Refuse, in one line, a reducer that needs individual updates under secure aggregation."""
    if reducer not in SUM_REDUCERS:
        raise UserError(
            f"secure aggregation reveals only the sum of the updates, so it cannot run reducer {reducer!r}: use "
            f"{' or '.join(SUM_REDUCERS)} (norm bounding: clip on the clients)"
        )


@dataclass(frozen=True)
class SecAggConfig:
    """Flower's SecAgg+ defaults: clipping range ±8, 2²² quantization levels, modulus 2³²."""

    clipping_range: float = 8.0
    quantization_levels: int = 2**22
    modulus: int = 2**32
    num_shares: int | None = None  # share holders per secret (owner included); None: all clients (complete graph)
    reconstruction_threshold: int | None = None  # t shares rebuild a secret; None: a majority ⌊g/2⌋ + 1
    rounding: Literal["stochastic", "nearest"] = "stochastic"

    def __post_init__(self) -> None:
        if not (self.clipping_range > 0 and math.isfinite(self.clipping_range)):
            raise ConfigError("secure aggregation: clipping_range must be a positive finite number")
        if self.quantization_levels < 1 or self.modulus <= self.quantization_levels or self.modulus > 2**62:
            raise ConfigError("secure aggregation needs 1 ≤ quantization_levels < modulus ≤ 2^62")
        if self.num_shares is not None and (self.num_shares < 1 or self.num_shares % 2 == 0):
            raise ConfigError(f"num_shares must be odd (a symmetric ring of neighbours), got {self.num_shares}")
        if self.rounding not in ("stochastic", "nearest"):
            raise ConfigError(f"rounding must be stochastic or nearest, got {self.rounding!r}")

    @property
    def step(self) -> float:
        """The value of one quantization level, 2R/L."""
        return 2 * self.clipping_range / self.quantization_levels


@dataclass(frozen=True)
class SecAggCost:
    """Bytes and messages of one round of the simulated protocol (model in the module docstring)."""

    uplink_bytes: int
    downlink_bytes: int
    masked_input_bytes: int  # the survivors' masked vectors
    plain_bytes: int  # what the same survivors' float32 updates would take without secure aggregation
    overhead_bytes: int  # uplink + downlink − plain
    messages: int
    shares_for_dropped: int  # shares of dropped clients' keys the survivors send (extra, due to the dropouts)
    masks_rebuilt: int  # pair masks of (dropped, surviving neighbour) the server regenerates and removes


@dataclass(frozen=True)
class SecureSum:
    """The unmasked, dequantized sum over the survivors, and the round's bookkeeping."""

    total: Tensors
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    cost: SecAggCost
    range_clipped: int  # coordinates that fell outside ±clipping_range and were clipped to it


def neighbours(client_ids: Collection[int], config: SecAggConfig) -> dict[int, tuple[int, ...]]:
    """N(i) for each client: all others, or its (g − 1)/2 predecessors and successors in the ring of sorted ids."""
    ids = sorted(client_ids)
    n = len(ids)
    g = n if config.num_shares is None else min(config.num_shares, n)
    if g >= n:
        return {c: tuple(o for o in ids if o != c) for c in ids}
    half = (g - 1) // 2
    return {
        c: tuple(sorted({ids[(k + off) % n] for off in range(-half, half + 1) if off != 0})) for k, c in enumerate(ids)
    }


def threshold(group_size: int, config: SecAggConfig) -> int:
    t = group_size // 2 + 1 if config.reconstruction_threshold is None else config.reconstruction_threshold
    if not 1 <= t <= group_size:
        raise ConfigError(f"reconstruction_threshold must lie in [1, {group_size}] (share holders), got {t}")
    return t


def _prg(dim: int, modulus: int, *seed: int | str) -> torch.Tensor:
    return torch.randint(0, modulus, (dim,), generator=generator_for(*seed), dtype=torch.int64)


def pair_mask(
    i: int, j: int, dim: int, *, seed: int, round: int, config: SecAggConfig = SecAggConfig()
) -> torch.Tensor:
    """The mask client i adds for its neighbour j: +PRG(s_ij) if i < j, −PRG(s_ij) mod M otherwise."""
    low, high = min(i, j), max(i, j)
    mask = _prg(dim, config.modulus, seed, round, low, high, "secagg-pair")
    return mask if i < j else (config.modulus - mask) % config.modulus


def self_mask(i: int, dim: int, *, seed: int, round: int, config: SecAggConfig = SecAggConfig()) -> torch.Tensor:
    return _prg(dim, config.modulus, seed, round, i, "secagg-self")


def pairwise_masks(
    client_ids: Collection[int], dim: int, *, seed: int, round: int, config: SecAggConfig = SecAggConfig()
) -> dict[int, torch.Tensor]:
    """Each client's total pair mask Σ_{j∈N(i)} mask_ij mod M (no self-mask): they sum to 0 mod M."""
    graph = neighbours(client_ids, config)
    out: dict[int, torch.Tensor] = {}
    for i, peers in graph.items():
        total = torch.zeros(dim, dtype=torch.int64)
        for j in peers:
            total = (total + pair_mask(i, j, dim, seed=seed, round=round, config=config)) % config.modulus
        out[i] = total
    return out


def _flatten(update: Tensors) -> torch.Tensor:
    for key, value in update.items():
        if not value.is_floating_point():
            raise ValueError(f"secure aggregation sums floating-point tensors; {key!r} is {value.dtype}")
    return torch.cat([update[k].detach().reshape(-1).to(torch.float64).cpu() for k in sorted(update)])


def quantize(
    vector: torch.Tensor, config: SecAggConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int]:
    """Integers in [0, L] for a float64 vector, and how many coordinates the range clipped."""
    bound = config.clipping_range
    outside = int((vector.abs() > bound).sum())
    scaled = (vector.clamp(-bound, bound) + bound) / config.step
    if config.rounding == "stochastic":
        if generator is None:
            raise ValueError("stochastic rounding needs a seeded generator")
        offset = torch.rand(vector.shape, generator=generator, dtype=torch.float64)
    else:
        offset = torch.full_like(scaled, 0.5)
    levels = torch.floor(scaled + offset).clamp(0, config.quantization_levels).to(torch.int64)
    return levels, outside


def dequantize_sum(levels_sum: torch.Tensor, count: int, config: SecAggConfig) -> torch.Tensor:
    """Σ q_i · 2R/L − count·R: the sum of ``count`` dequantized vectors."""
    return levels_sum.to(torch.float64) * config.step - count * config.clipping_range


def round_cost(
    num_clients: int, survivors: int, dim: int, group_size: int, shares_for_dropped: int, masks_rebuilt: int
) -> SecAggCost:
    """Bytes and messages of one round under the module's byte model."""
    n, u, g, d = num_clients, survivors, group_size, dim
    share_message = 2 * ID_BYTES + 2 * SHARE_BYTES + ENCRYPTION_BYTES
    masked = u * COORDINATE_BYTES * d
    up = n * 2 * KEY_BYTES + n * (g - 1) * share_message + masked + u * g * (ID_BYTES + SHARE_BYTES)
    down = n * (g - 1) * (ID_BYTES + 2 * KEY_BYTES) + n * (g - 1) * share_message + u * (g - 1) * ID_BYTES
    plain = u * 4 * d
    messages = 2 * n + 2 * n + u + 2 * u
    return SecAggCost(up, down, masked, plain, up + down - plain, messages, shares_for_dropped, masks_rebuilt)


def secure_sum(
    updates: Mapping[int, Tensors],
    *,
    seed: int,
    round: int,
    dropped: Collection[int] = (),
    config: SecAggConfig = SecAggConfig(),
    reducer: str = "sum",
) -> SecureSum:
    """The sum over the clients of ``updates`` not in ``dropped``, through the simulated protocol.

    ``updates`` holds every client that took part in the key exchange (the dropped ones' updates are never
    used). Returns each tensor's sum in its own dtype; raises TooManyDropouts when the round cannot be unmasked."""
    require_sum_reducer(reducer)
    ids = sorted(updates)
    if not ids:
        raise ValueError("nothing to aggregate")
    gone = set(dropped)
    if not gone <= set(ids):
        raise ValueError("dropped clients must be among the clients of the key exchange")
    alive = [c for c in ids if c not in gone]
    n = len(ids)
    if n * config.quantization_levels >= config.modulus:
        raise UserError(
            f"secure aggregation of {n} clients at {config.quantization_levels} levels would wrap modulo "
            f"{config.modulus}: at most {(config.modulus - 1) // config.quantization_levels} clients per round"
        )
    graph = neighbours(ids, config)
    group = 1 + len(graph[ids[0]])
    t = threshold(group, config)
    for owner in ids:
        holders = sum(1 for h in (owner, *graph[owner]) if h not in gone)
        if holders < t:
            raise TooManyDropouts(
                f"secure aggregation: {len(gone)} of {n} clients dropped and client {owner}'s secret has "
                f"{holders} surviving share holders, below the threshold {t}; the round cannot be unmasked"
            )

    shapes = {k: (v.shape, v.dtype, v.device) for k, v in updates[ids[0]].items()}
    dim = sum(int(math.prod(s)) for s, _, _ in shapes.values())
    modulus = config.modulus
    masked_sum = torch.zeros(dim, dtype=torch.int64)
    range_clipped = 0
    for i in alive:  # what each surviving client sends: its masked, quantized vector
        if updates[i].keys() != shapes.keys():
            raise ValueError("secure aggregation needs the same tensors from every client")
        levels, outside = quantize(_flatten(updates[i]), config, generator_for(seed, round, i, "secagg-rounding"))
        if levels.numel() != dim:
            raise ValueError("secure aggregation needs the same shapes from every client")
        range_clipped += outside
        masked = (levels + self_mask(i, dim, seed=seed, round=round, config=config)) % modulus
        for j in graph[i]:
            masked = (masked + pair_mask(i, j, dim, seed=seed, round=round, config=config)) % modulus
        masked_sum = (masked_sum + masked) % modulus

    # unmasking: the survivors' self-masks, and the pair masks survivors hold with dropped neighbours
    for i in alive:
        masked_sum = (masked_sum - self_mask(i, dim, seed=seed, round=round, config=config)) % modulus
    masks_rebuilt = 0
    for u in ids:
        if u not in gone:
            continue
        for v in graph[u]:
            if v not in gone:
                masked_sum = (masked_sum - pair_mask(v, u, dim, seed=seed, round=round, config=config)) % modulus
                masks_rebuilt += 1
    shares_for_dropped = sum(1 for v in alive for o in (v, *graph[v]) if o in gone)

    flat = dequantize_sum(masked_sum, len(alive), config)
    total: Tensors = {}
    offset = 0
    for key in sorted(shapes):
        shape, dtype, device = shapes[key]
        size = int(math.prod(shape))
        total[key] = flat[offset : offset + size].reshape(shape).to(dtype=dtype, device=device)
        offset += size
    cost = round_cost(n, len(alive), dim, group, shares_for_dropped, masks_rebuilt)
    return SecureSum(total, tuple(alive), tuple(sorted(gone)), cost, range_clipped)
