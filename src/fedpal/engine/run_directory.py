"""The run directory any tool can read: config.toml, metrics.jsonl, summary.json, checkpoint.pt, log.txt.

Every file is written atomically (temporary file + rename) so an interrupted run never leaves a torn file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedpal.engine.tracking import Tracker, open_trackers
from fedpal.errors import UserError


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDirectory:
    CONFIG = "config.toml"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINT = "checkpoint.pt"
    LOG = "log.txt"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.trackers: list[Tracker] = []  # run.log_to: they receive every metrics entry too

    def track(self, names: list[str], config: dict[str, Any]) -> None:
        """Send the metrics to these trackers as well (``run.log_to``); ``config`` is the resolved config."""
        self.trackers = open_trackers(names, self.path, config)

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create run directory {self.path}: {exc.strerror}") from None
        # A run interrupted before its first evaluation has a config and a checkpoint but no metrics yet.
        if any((self.path / name).exists() for name in (self.CONFIG, self.METRICS, self.SUMMARY, self.CHECKPOINT)):
            raise UserError(f"run directory {self.path} already holds a run; choose another --out or resume it")

    def write_config(self, text: str) -> None:
        atomic_write_text(self.path / self.CONFIG, text)

    def append_metrics(self, entry: dict[str, Any]) -> None:
        with (self.path / self.METRICS).open("a") as fh:
            fh.write(json.dumps(_clean(entry)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for tracker in self.trackers:
            tracker.log(entry)

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / self.METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def rewrite_metrics(self, entries: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path / self.METRICS, "".join(json.dumps(_clean(e)) + "\n" for e in entries))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / self.SUMMARY, json.dumps(_clean(summary), indent=2) + "\n")
        for tracker in self.trackers:  # the run is over
            tracker.close()
        self.trackers = []

    def log(self, line: str) -> None:
        with (self.path / self.LOG).open("a") as fh:
            fh.write(line.rstrip() + "\n")

    def truncate_log(self, max_round: int) -> None:
        """Drop log lines of rounds after ``max_round`` (they are written again when a resumed run redoes them)."""
        path = self.path / self.LOG
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            head = line.split(":", 1)[0]
            if head.startswith("round ") and head[6:].isdigit() and int(head[6:]) > max_round:
                continue
            kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        path = self.path / self.CHECKPOINT
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """The last checkpoint, its tensors on ``device`` (the run's ``run.device``) wherever they were saved."""
        path = self.path / self.CHECKPOINT
        if not path.exists():
            raise UserError(f"no checkpoint in {self.path}; nothing to resume")
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:  # a torn or foreign file
            detail = " ".join(str(exc).split())[:200]
            raise UserError(
                f"checkpoint {path} cannot be read ({type(exc).__name__}: {detail}); the run cannot be resumed, start "
                f"it again from its config: fedpal run {self.path / self.CONFIG} --out NEW_DIR"
            ) from None


class RunLogNotes(logging.Handler):
    """Writes fedpal's INFO notes (the thread count it chose, the executor ``auto`` picked, the training settings an
    algorithm recommended) to the run's log.txt; notes logged before the run directory exists wait for it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.pending: list[str] = []
        self.run_dir: RunDirectory | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:  # warnings (rejected replies) are written to the log where they arise
            return
        line = f"note: {record.getMessage()}"
        if self.run_dir is None:
            self.pending.append(line)
        else:
            self.run_dir.log(line)

    def attach(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir
        for line in self.pending:
            run_dir.log(line)
        self.pending = []


@contextlib.contextmanager
def notes_to_run_log() -> Iterator[RunLogNotes]:
    """Collect the fedpal logger's notes for one run (``attach`` the run directory once it exists). The logger's
    own level opens to INFO for the run; the terminal keeps only what its handlers let through."""
    logger = logging.getLogger("fedpal")
    handler, level = RunLogNotes(), logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
