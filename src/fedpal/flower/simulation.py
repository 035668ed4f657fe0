"""``fedpal run CONFIG --engine flower``: the run on Flower's simulation runtime, on this machine.

Flower's ``run_simulation`` runs the ServerApp in a thread of this process (fedpal's round driver with the Flower
executor, writing the same run directory) and the ClientApp for each virtual SuperNode in Ray actors, one per
``flower.node_cpus`` CPUs. Client c lives on node c mod ``flower.nodes`` (one node per client by default); nodes keep
their clients' states in Flower's node state and under the run directory, so a resumed run finds them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpal import runner
from fedpal.config import ExperimentConfig, from_dict, read_toml
from fedpal.data.client_data import FederatedData
from fedpal.data.federated import build_federated_data
from fedpal.engine.run_directory import RunDirectory
from fedpal.errors import UserError
from fedpal.flower import quiet_flower, require_flower

if TYPE_CHECKING:
    from flwr.serverapp import Grid


def _simulate(serve: Callable[[Grid], runner.Result], nodes: int, node_cpus: float) -> runner.Result:
    """Run ``serve(grid)`` as the ServerApp of a simulation with ``nodes`` virtual SuperNodes; its result, or the
    exception it raised."""
    quiet_flower()
    from flwr.app import Context
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedpal.flower.client_app import app as client_app

    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    outcome: dict[str, object] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["result"] = serve(grid)
        except BaseException as exc:  # handed back to the caller below, whatever Flower does with it
            outcome["error"] = exc

    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": node_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": False},
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes, backend_config=backend)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if "result" not in outcome:
        raise RuntimeError("the Flower simulation ended without running the fedpal ServerApp")
    return outcome["result"]  # type: ignore[return-value]


def _nodes(config: ExperimentConfig) -> tuple[int, FederatedData | None]:
    """How many virtual SuperNodes (``flower.nodes``, or one per client), and the federation when counting its
    clients needed it built: the ServerApp runs in this process and takes it rather than building it again."""
    if config.flower.nodes:
        return config.flower.nodes, None
    data = build_federated_data(config.data, config.seed)
    return data.num_clients, data


def run_on_flower_simulation(config: ExperimentConfig, out: str | Path | None, progress: bool) -> runner.Result:
    require_flower()
    from fedpal.flower.server_app import serve

    nodes, data = _nodes(config)
    target = None if out is None else str(out)
    return _simulate(lambda grid: serve(grid, config, target, False, True, data), nodes, config.flower.node_cpus)


def resume_on_flower_simulation(path: Path, progress: bool) -> runner.Result:
    require_flower()
    from fedpal.flower.server_app import serve

    config = from_dict(read_toml(path / RunDirectory.CONFIG))
    if not (path / RunDirectory.CHECKPOINT).exists():
        raise UserError(f"no checkpoint in {path}: nothing to resume")
    nodes, data = _nodes(config)
    return _simulate(lambda grid: serve(grid, None, str(path), True, True, data), nodes, config.flower.node_cpus)
