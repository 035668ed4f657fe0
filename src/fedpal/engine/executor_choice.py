"""Which executor a run uses (``run.executor``), including ``auto``'s choice, logged once."""

from __future__ import annotations

import logging
import os

from fedpal.engine.assembly import Assembly
from fedpal.engine.executor import Executor
from fedpal.engine.processes import ProcessExecutor
from fedpal.engine.sequential import SequentialExecutor

log = logging.getLogger("fedpal")

# Below this many training samples per round (summed over the sampled clients, times epochs), starting workers
# costs more than it saves.
MIN_SAMPLES_FOR_WORKERS = 20_000


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_executor(assembly: Assembly) -> Executor:
    run, train, data = assembly.config.run, assembly.config.train, assembly.data
    workers = run.workers or cores()
    name = run.executor
    if name == "auto":
        per_round = train.clients_per_round or max(1, round(train.client_fraction * data.num_clients))
        sizes = sorted((c.train_y.numel() for c in data.clients), reverse=True)
        samples = sum(sizes[:per_round]) * train.local_epochs
        if workers < 2 or per_round < 2:
            name, why = "sequential", f"{workers} core(s), {per_round} client(s) per round"
        elif samples < MIN_SAMPLES_FOR_WORKERS:
            name, why = "sequential", f"a tiny run ({samples} samples per round)"
        else:
            name, why = "processes", f"{workers} cores, {per_round} clients per round"
        log.info("run.executor = auto: %s (%s)", name, why)
    if name == "processes":
        return ProcessExecutor(assembly, workers)
    return SequentialExecutor(assembly)
