"""``run.executor = "auto"`` on a multi-core CPU: start sequential, measure the first training round, and move to
worker processes when the work per round pays for them.

Worker processes cost a start-up (about 2 s here) and a transfer per round; they halve a round's client work on two
cores. Whether that wins depends on the model, the batch size and the clients' sizes together, which the first
round measures better than any rule on the config. The switch changes no number: both executors are bit-identical
at one thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from fedpal.engine.assembly import Assembly
from fedpal.engine.executor import ClientResult, ClientTask, Executor
from fedpal.engine.processes import WorkerError
from fedpal.engine.sequential import SequentialExecutor

log = logging.getLogger("fedpal")

MIN_ROUND_SECONDS = 0.5  # below this, a round's fixed costs in workers (transfer, spreading) eat the gain
MIN_SAVING_SECONDS = 4.0  # the rounds left must save at least this much (about twice the workers' start-up)


class AutoExecutor:
    def __init__(self, assembly: Assembly, workers: int, start_workers: Callable[[], Executor]) -> None:
        self.assembly = assembly
        self.workers = workers
        self.start_workers = start_workers
        self.current: Executor = SequentialExecutor(assembly)
        self.decided = False

    def run(self, tasks: list[ClientTask]) -> dict[int, ClientResult]:
        return dict(self.stream(tasks))

    def stream(self, tasks: list[ClientTask]) -> Iterator[tuple[int, ClientResult]]:
        fits = [task for task in tasks if task.op == "fit"]
        if self.decided or not fits:
            yield from self.current.stream(tasks)
            return
        started = time.perf_counter()
        yield from self.current.stream(tasks)
        seconds = time.perf_counter() - started
        self.decided = True
        rounds_left = self.assembly.config.train.rounds - fits[0].round
        saving = rounds_left * seconds * (1 - 1 / self.workers)
        if seconds >= MIN_ROUND_SECONDS and saving >= MIN_SAVING_SECONDS:
            log.info(
                "run.executor = auto: round %d took %.2f s; moving to %d worker processes",
                fits[0].round,
                seconds,
                self.workers,
            )
            try:
                self.current = self.start_workers()
            except WorkerError as error:  # e.g. a method registered in this process only, unknown to a worker
                log.info("run.executor = auto: staying sequential, the workers did not start: %s", first_line(error))
        else:
            log.info("run.executor = auto: round %d took %.2f s; staying sequential", fits[0].round, seconds)

    def close(self) -> None:
        self.current.close()


def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
