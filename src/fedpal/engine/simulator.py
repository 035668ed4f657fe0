"""The in-process simulator: a run assembled from a config and driven by the round driver with the sequential
executor. Kept as one name for scripts, tests and the API; the loop itself lives in ``driver.py``."""

from __future__ import annotations

from collections.abc import Callable

from fedpal.algorithms.core.contract import ClientView
from fedpal.algorithms.core.training import LocalTrainer
from fedpal.common.tensors import Tensors
from fedpal.config import ExperimentConfig
from fedpal.data.client_data import FederatedData
from fedpal.engine.assembly import Assembly, assemble
from fedpal.engine.driver import RoundDriver
from fedpal.engine.executor import Executor
from fedpal.engine.executor_choice import choose_executor
from fedpal.engine.run_directory import RunDirectory


class Simulator(RoundDriver):
    """``RoundDriver(assemble(config, data), executor)`` (the executor ``run.executor`` names unless one is given,
    or ``executor_factory`` builds one from the assembly), with the assembly's views and modules at hand."""

    def __init__(
        self,
        config: ExperimentConfig,
        data: FederatedData,
        run_dir: RunDirectory | None = None,
        progress: bool = True,
        executor: Executor | None = None,
        executor_factory: Callable[[Assembly], Executor] | None = None,
    ) -> None:
        assembly = assemble(config, data)
        if executor is None:
            executor = executor_factory(assembly) if executor_factory is not None else choose_executor(assembly)
        super().__init__(assembly, executor, run_dir, progress)

    @property
    def trainers(self) -> dict[str, LocalTrainer]:
        return self.assembly.trainers

    @property
    def trainer(self) -> LocalTrainer:
        """The first architecture's trainer (the only one in a homogeneous run)."""
        return self.assembly.trainers[self.architectures[0]]

    @property
    def architectures(self) -> tuple[str, ...]:
        return self.assembly.architectures

    @property
    def initial_params(self) -> dict[str, Tensors]:
        return self.assembly.initial_params

    def view(self, cid: int, round: int) -> ClientView:
        return self.assembly.view(cid, round)
