"""How many intra-op threads a run's process uses (``train.threads``; 0 = chosen here, and logged).

The models of PFL are small: their per-step ops are too short for a second thread to pay (measured on 2 cores:
0.5-1.6x with 2 threads), and on a machine that other jobs share, torch's default of one thread per core made a
round 40-70x slower. So a model under a million parameters gets one thread; a larger one gets the cores this process
may use, at most four. Worker processes always use one.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("fedpal")

SMALL_MODEL_PARAMETERS = 1_000_000
MAX_AUTO_THREADS = 4


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(requested: int, parameters: int, available: int) -> int:
    """``requested`` when set (> 0); otherwise 1 for a small model, else min(available cores, 4)."""
    if requested > 0:
        return requested
    if parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return max(1, min(available, MAX_AUTO_THREADS))


def apply_threads(requested: int, parameters: int) -> int:
    """Set torch's intra-op threads for this process and log the choice when it was automatic."""
    import torch

    threads = choose_threads(requested, parameters, cores())
    torch.set_num_threads(threads)
    if requested <= 0:
        log.info(
            "train.threads = 0: using %d intra-op thread(s) (model of %.2f M parameters, %d core(s))",
            threads,
            parameters / 1e6,
            cores(),
        )
    return threads
