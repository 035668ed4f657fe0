"""The sequential executor (the default): every client's task in this process, one after another, on the run's
reusable modules."""

from __future__ import annotations

from fedpal.engine.assembly import Assembly
from fedpal.engine.executor import ClientResult, ClientTask, run_client_task


class SequentialExecutor:
    def __init__(self, assembly: Assembly) -> None:
        self.assembly = assembly

    def run(self, tasks: list[ClientTask]) -> dict[int, ClientResult]:
        return {task.client: run_client_task(self.assembly, task) for task in tasks}

    def close(self) -> None:
        """Nothing to release."""
