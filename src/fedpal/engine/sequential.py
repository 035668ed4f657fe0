"""The sequential executor (the default): every client's task in this process, one after another, on the run's
reusable modules."""

from __future__ import annotations

from collections.abc import Iterator

from fedpal.engine.assembly import Assembly
from fedpal.engine.executor import ClientResult, ClientTask, run_client_task


class SequentialExecutor:
    def __init__(self, assembly: Assembly) -> None:
        self.assembly = assembly

    def run(self, tasks: list[ClientTask]) -> dict[int, ClientResult]:
        return dict(self.stream(tasks))

    def stream(self, tasks: list[ClientTask]) -> Iterator[tuple[int, ClientResult]]:
        for task in tasks:
            yield task.client, run_client_task(self.assembly, task)

    def close(self) -> None:
        """Nothing to release."""
