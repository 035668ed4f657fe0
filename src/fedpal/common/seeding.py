"""Seeds derived from (seed, round, client id, purpose, ...), so no random draw depends on call order.

Every layer (data partitioning, model initialisation, local training, evaluation samples, pre-training) takes its
randomness from here; that is what makes a run identical whatever the order, batching or engine of its clients.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, round, client id, purpose, ...), independent of call order."""
    words = [p if isinstance(p, int) else int.from_bytes(p.encode()[:8].ljust(8, b"\0"), "little") for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator_for(*parts: int | str) -> torch.Generator:
    """A fresh CPU generator seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
