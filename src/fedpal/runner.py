"""One fedpal run in this process: build the data, pre-train when the config asks, assemble the simulator and run
or resume it, writing the run directory. The Python API (``fedpal.api``) resolves configs and picks the engine; the
Flower ServerApp runs the same function with its own executor.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpal.config import ExperimentConfig, from_dict, partition_title, read_toml, to_toml
from fedpal.data.client_data import FederatedData
from fedpal.data.federated import build_federated_data
from fedpal.data.partition_report import format_partition_table, save_partition_heatmap
from fedpal.engine.assembly import Assembly, build_algorithm
from fedpal.engine.device import run_device
from fedpal.engine.executor import Executor
from fedpal.engine.run_directory import RunDirectory, RunLogNotes, notes_to_run_log
from fedpal.engine.simulator import Simulator
from fedpal.errors import UserError
from fedpal.pretraining import check_fits_run, needs_pretraining, with_run_pretraining

log = logging.getLogger("fedpal")

# how client work runs, given the assembled run (the Flower ServerApp passes its Grid's executor)
ExecutorFactory = Callable[[Assembly], Executor]


@dataclass
class Result:
    """What a run produced: the summary (as in summary.json), every evaluation, and where it was written."""

    config: ExperimentConfig
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    run_dir: Path | None

    @property
    def personalized_accuracy(self) -> float:
        return float(self.summary["personalized"]["accuracy"])

    @property
    def generalization_accuracy(self) -> float:
        return float(self.summary["generalization"]["accuracy"])


def run_in_process(
    cfg: ExperimentConfig,
    out: str | Path | None = None,
    progress: bool = False,
    executor_factory: ExecutorFactory | None = None,
    data: FederatedData | None = None,
) -> Result:
    """Run one resolved config here; with ``out``, write a run directory there. ``executor_factory`` replaces the
    executor ``run.executor`` names; ``data``, the federation of ``cfg.data`` when the caller built it already."""
    with notes_to_run_log() as notes:
        return _run(cfg, out, progress, notes, executor_factory, data)


def _run(
    cfg: ExperimentConfig,
    out: str | Path | None,
    progress: bool,
    notes: RunLogNotes,
    executor_factory: ExecutorFactory | None = None,
    data: FederatedData | None = None,
) -> Result:
    if cfg.recommended_applied:
        settings = ", ".join(f"train.{k} = {v!r}" for k, v in cfg.recommended_applied.items())
        log.info("%s's recommended training settings, left unset by the config: %s", cfg.algorithm_name, settings)
    run_device(cfg.run)  # an unusable device fails before the data are built
    if data is None:
        data = build_federated_data(cfg.data, cfg.seed)
    with contextlib.ExitStack() as scratch:
        run_cfg = cfg
        if needs_pretraining(cfg):  # pre-train first; the file goes into the run directory (resume reuses it)
            # a bad model or algorithm fails before pre-training (no alignment: the pre-trained weights come later)
            _, trainers = build_algorithm(cfg, data, align_adapters=False)
            check_fits_run(cfg, data, [t.module for t in trainers.values()])
            if out is not None:
                RunDirectory(out).create()
            where = Path(out) if out is not None else Path(scratch.enter_context(tempfile.TemporaryDirectory()))
            run_cfg = with_run_pretraining(cfg, data, where, progress)
        # Build the model and algorithm before anything is written: a bad model name or input shape leaves no files.
        # loads the pre-trained tensors now
        simulator = Simulator(run_cfg, data, None, progress=progress, executor_factory=executor_factory)
    run_dir = None
    if out is not None:
        run_dir = RunDirectory(out)
        run_dir.create()
        run_dir.write_config(to_toml(cfg.to_dict()))
        run_dir.track(cfg.run.log_to, cfg.to_dict())
        notes.attach(run_dir)
        counts = data.label_counts()
        (run_dir.path / "partition.md").write_text(format_partition_table(counts, data.class_names))
        save_partition_heatmap(counts, run_dir.path / "partition.png", title=partition_title(cfg.data))
        simulator.run_dir = run_dir
    summary = simulator.run()
    return Result(cfg, summary, simulator.history, run_dir.path if run_dir else None)


def resume_in_process(
    path: str | Path,
    progress: bool = False,
    executor_factory: ExecutorFactory | None = None,
    data: FederatedData | None = None,
) -> Result:
    """Continue an interrupted run here from its last checkpoint; ends with the numbers of an uninterrupted run
    (``data``: the federation of its stored config, when the caller built it already)."""
    run_dir = RunDirectory(path)
    if not run_dir.path.is_dir():
        raise UserError(f"run directory not found: {run_dir.path}")
    cfg = from_dict(read_toml(run_dir.path / RunDirectory.CONFIG))
    checkpoint = run_dir.load_checkpoint(run_device(cfg.run))
    run_dir.truncate_log(int(checkpoint["round"]))
    if data is None:
        data = build_federated_data(cfg.data, cfg.seed)
    with notes_to_run_log() as notes:
        notes.attach(run_dir)
        # config.toml keeps pretrain.method = "mae" without a path: reuse the run directory's pretrained.pt.
        run_cfg = with_run_pretraining(cfg, data, run_dir.path, progress) if needs_pretraining(cfg) else cfg
        run_dir.track(cfg.run.log_to, cfg.to_dict())
        simulator = Simulator(run_cfg, data, run_dir, progress=progress, executor_factory=executor_factory)
        simulator.restore(checkpoint)
        run_dir.rewrite_metrics(simulator.history)  # drop evaluations written after the checkpoint
        summary = simulator.run()
    return Result(cfg, summary, simulator.history, run_dir.path)
