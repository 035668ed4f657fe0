"""The Python API: ``fedpal.run(config) -> Result`` for notebooks and scripts; ``fedpal.resume(run_dir)``. It
resolves any form of config and picks the engine: this process (``fedpal.runner``) or Flower's simulation runtime."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Literal

from fedpal.config import ExperimentConfig, Overrides, apply_overrides, from_dict, load_config
from fedpal.errors import UserError
from fedpal.runner import ExecutorFactory, Result, resume_in_process, run_in_process

__all__ = ["Engine", "ExecutorFactory", "Result", "default_run_dir", "resolve", "resume", "run"]

Engine = Literal["simulator", "flower"]


def resolve(
    config: ExperimentConfig | dict[str, Any] | str | Path, overrides: Overrides | None = None
) -> ExperimentConfig:
    """Any accepted form of config (object, nested dict, TOML path) plus overrides -> a validated config."""
    if isinstance(config, str | Path):
        return load_config(config, overrides)
    if isinstance(config, ExperimentConfig):
        if not overrides:
            return config
        raw = config.to_dict()  # dataclasses.asdict copies deeply
    else:
        raw = copy.deepcopy(config)
    return from_dict(apply_overrides(raw, overrides or []))


def default_run_dir(config: ExperimentConfig, root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{config.algorithm_name}-{config.data.dataset}-s{config.seed}-{stamp}"
    return Path(root) / name


def run(
    config: ExperimentConfig | dict[str, Any] | str | Path,
    out: str | Path | None = None,
    overrides: Overrides | None = None,
    progress: bool = False,
    engine: Engine = "simulator",
    executor_factory: ExecutorFactory | None = None,
) -> Result:
    """Run one experiment. With ``out``, write a run directory there. ``overrides`` are dotted keys with values,
    ``{"algorithm.mu": 0.1}`` (or the CLI's ``["algorithm.mu=0.1"]``). ``engine = "flower"`` runs it on Flower's
    simulation runtime (``pip install -e ".[flower]"``; see docs/flower.md); ``executor_factory`` replaces the
    executor ``run.executor`` names (the Flower ServerApp of a deployment passes its own)."""
    cfg = resolve(config, overrides)
    if engine == "flower":
        from fedpal.flower.simulation import run_on_flower_simulation

        return run_on_flower_simulation(cfg, out, progress)
    return run_in_process(cfg, out, progress, executor_factory)


def resume(
    path: str | Path,
    progress: bool = False,
    engine: Engine = "simulator",
    executor_factory: ExecutorFactory | None = None,
) -> Result:
    """Continue an interrupted run from its last checkpoint; ends with the numbers of an uninterrupted run. A run of
    the Flower engine resumes on it (``engine = "flower"``): its clients' states are on the nodes."""
    if engine == "flower":
        run_dir = Path(path)
        if not run_dir.is_dir():
            raise UserError(f"run directory not found: {run_dir}")
        from fedpal.flower.simulation import resume_on_flower_simulation

        return resume_on_flower_simulation(run_dir, progress)
    return resume_in_process(path, progress, executor_factory)
