"""The malicious clients of a run: a fixed, seeded set drawn once.

Identities stay fixed for the whole run, as a real adversary controls the same devices round after round (FedML
re-draws them every round, which spreads the attack over every client and is not a realistic threat model).
"""

from __future__ import annotations

import math

import numpy as np

from fedpal.common.seeding import derive_seed
from fedpal.errors import ConfigError


def malicious_count(num_clients: int, fraction: float) -> int:
    """round(fraction * num_clients), halves rounded up (0.25 of 10 clients is 3), so the count never depends on
    Python's round-half-to-even."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"the fraction of malicious clients must lie in [0, 1], got {fraction}")
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    return min(num_clients, math.floor(fraction * num_clients + 0.5))


def malicious_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The ids (0..num_clients-1) of the malicious clients, drawn once from ``derive_seed(seed, "malicious")``."""
    count = malicious_count(num_clients, fraction)
    rng = np.random.default_rng(derive_seed(seed, "malicious"))
    return frozenset(int(c) for c in rng.choice(num_clients, size=count, replace=False))
