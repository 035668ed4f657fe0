"""Which executor a run uses (``run.executor``); ``auto`` measures its first round (``auto_executor.py``) on a CPU
and takes the batched executor on a GPU, where a round's clients trained together cost one kernel launch a step."""

from __future__ import annotations

import logging

import torch

from fedpal.engine.assembly import Assembly
from fedpal.engine.auto_executor import AutoExecutor
from fedpal.engine.batched import BatchedExecutor
from fedpal.engine.executor import Executor
from fedpal.engine.processes import ProcessExecutor
from fedpal.engine.sequential import SequentialExecutor
from fedpal.engine.threads import cores

log = logging.getLogger("fedpal")


def choose_executor(assembly: Assembly) -> Executor:
    run, train, data = assembly.config.run, assembly.config.train, assembly.data
    workers = run.workers or cores()
    name = run.executor
    if name == "auto" and run.device != "cpu":
        log.info("run.executor = auto: batched (run.device = %s: a round's clients train together)", run.device)
        return BatchedExecutor(assembly)
    if name == "auto":
        per_round = train.clients_per_round or max(1, round(train.client_fraction * data.num_clients))
        if workers < 2 or per_round < 2:
            log.info("run.executor = auto: sequential (%d core(s), %d client(s) per round)", workers, per_round)
            return SequentialExecutor(assembly)
        if (threads := torch.get_num_threads()) > 1:  # set by the assembly (train.threads or its own choice)
            log.info(
                "run.executor = auto: sequential (%d intra-op threads; single-threaded workers would round "
                "differently)",
                threads,
            )
            return SequentialExecutor(assembly)
        return AutoExecutor(assembly, workers, lambda: ProcessExecutor(assembly, workers))
    if name == "processes":
        return ProcessExecutor(assembly, workers)
    if name == "batched":
        return BatchedExecutor(assembly)
    return SequentialExecutor(assembly)
