"""The generic Flower ServerApp: fedpal's round driver, with the Flower executor over the Grid it is given, for any
registered algorithm. A deployment runs it on the SuperLink's host (``flwr run`` with ``fedpal-config``, the run's
TOML text, and ``fedpal-out``, its run directory there; ``fedpal-resume = true`` continues that run from its last
checkpoint); the simulation engine runs it in-process (``simulation.py``).

The server builds the run from its config as every node does, to know the federation's shape (clients, classes,
models): no sample and no client state reaches it, and the evaluation it reports is the clients' own.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpal import runner
from fedpal.config import ExperimentConfig, from_dict, read_toml, to_toml
from fedpal.data.client_data import FederatedData
from fedpal.engine.assembly import Assembly
from fedpal.engine.run_directory import RunDirectory
from fedpal.errors import UserError
from fedpal.flower import quiet_flower
from fedpal.flower.executor import FlowerExecutor

app = ServerApp()

STATE_DIRECTORY = "flower_states"  # in the run directory: where simulated nodes keep client states


def run_key(out: str | Path | None, config: ExperimentConfig) -> str:
    """Names the run on the nodes (their state directories): its run directory, or its config without one."""
    where = str(Path(out).resolve()) if out is not None else to_toml(config.to_dict())
    return hashlib.sha256(where.encode()).hexdigest()[:16]


def check_flower_config(config: ExperimentConfig) -> None:
    if config.run.checkpoint_every > 1:
        raise UserError(
            "the Flower engine needs run.checkpoint_every = 1 (or 0): nodes keep the client states back to the last "
            "round's, which is what a resumed server asks for"
        )


def executor_factory(
    grid: Grid, config: ExperimentConfig, out: str | Path | None, simulated: bool
) -> runner.ExecutorFactory:
    """Builds the Flower executor for the assembled run: the run's resolved config (pre-training applied) goes to
    the nodes; simulated nodes keep states under ``flower.state_dir`` or the run directory."""
    state_dir = ""
    if simulated:
        state_dir = config.flower.state_dir or (str(Path(out).resolve() / STATE_DIRECTORY) if out is not None else "")

    def build(assembly: Assembly) -> FlowerExecutor:
        header = {"config": to_toml(assembly.config.to_dict()), "run-key": run_key(out, config), "state-dir": state_dir}
        return FlowerExecutor(grid, assembly, header, assembly.config.flower)

    return build


def serve(
    grid: Grid,
    config: ExperimentConfig | None,
    out: str | None,
    resume: bool,
    simulated: bool,
    data: FederatedData | None = None,
) -> runner.Result:
    """Run (or resume) one fedpal run on ``grid`` (``data``: its federation, when this process built it already)."""
    quiet_flower()
    if resume:
        if out is None:
            raise UserError("resuming a Flower run needs its run directory (fedpal-out)")
        stored = from_dict(read_toml(Path(out) / RunDirectory.CONFIG))
        check_flower_config(stored)
        factory = executor_factory(grid, stored, out, simulated)
        return runner.resume_in_process(out, executor_factory=factory, data=data)
    assert config is not None
    check_flower_config(config)
    factory = executor_factory(grid, config, out, simulated)
    return runner.run_in_process(config, out, executor_factory=factory, data=data)


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = context.run_config
    text = str(settings.get("fedpal-config", ""))
    out = str(settings.get("fedpal-out", "")) or None
    resume = bool(settings.get("fedpal-resume", False))
    if not text and not resume:
        raise UserError("the fedpal ServerApp needs the run's config: --run-config with fedpal-config")
    config = from_dict(tomllib.loads(text)) if text else None
    serve(grid, config, out, resume, simulated=False)
