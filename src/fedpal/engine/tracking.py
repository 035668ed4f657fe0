"""Metrics also sent to the experiment trackers people already use (``run.log_to``); ``metrics.jsonl`` stays the
source of truth. TensorBoard event files go to ``<run dir>/tensorboard`` (the ``tensorboard`` package, an extra:
``pip install 'fedpal[tensorboard]'``), one scalar per number of each evaluation, at its round."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from fedpal.errors import UserError


class Tracker(Protocol):
    def log(self, entry: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(entry: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of a metrics entry by its slash-joined path (lists and non-numbers left out)."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(scalars(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "round":
            out[name] = float(value)
    return out


class TensorBoardTracker:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UserError(
                "run.log_to = ['tensorboard'] needs the tensorboard package: pip install 'fedpal[tensorboard]'"
            ) from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, entry: dict[str, Any]) -> None:
        step = int(entry.get("round", 0))
        for name, value in scalars(entry).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_trackers(names: list[str], run_path: Path) -> list[Tracker]:
    """The trackers ``run.log_to`` names, writing beside the run directory's own files."""
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_path / "tensorboard"))
    return trackers
