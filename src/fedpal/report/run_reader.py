"""Read a run directory written by the simulator, using only JSON/TOML files.

The reporting layer must work on a machine without torch (e.g. a laptop that only
received the results), so nothing here imports the training stack.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpal.errors import UserError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"
log = logging.getLogger("fedpal")


@dataclass
class RunRecord:
    """Everything the report needs from one run directory.

    ``summary`` is the parsed ``summary.json``; for an interrupted run (no summary yet)
    it is rebuilt from the last evaluation so tables and plots can treat both alike.
    """

    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def algorithm(self) -> str | None:
        value = self.summary.get("algorithm")
        return str(value) if value is not None else None

    @property
    def seed(self) -> Any:
        return self.summary.get("seed")

    @property
    def interrupted(self) -> bool:
        """True when the run stopped before writing ``summary.json``."""
        return bool(self.summary.get("interrupted", False))


def get_path(data: Any, *keys: str) -> Any:
    """Follow nested dict keys, returning None as soon as one is absent or null.

    Runs differ in which optional metrics they log (e.g. no global model), so every
    lookup in the report goes through this instead of raising KeyError.
    """
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
        if data is None:
            return None
    return data


def _read_json_lines(path: Path, tolerate_torn_tail: bool) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    rows: list[dict[str, Any]] = []
    for i, (lineno, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            # A crash mid-write can leave half a line at the end of an interrupted run;
            # dropping it keeps the earlier evaluations usable.
            if tolerate_torn_tail and i == len(lines) - 1:
                log.warning("skipping the torn last line %s:%d (%s at column %d)", path, lineno, exc.msg, exc.colno)
                break
            raise UserError(f"{path}:{lineno} is not valid JSON: {exc.msg} at column {exc.colno}") from exc
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno} is not a JSON object")
        rows.append(row)
    return rows


def _read_config_identity(path: Path) -> dict[str, Any]:
    """Best-effort algorithm/dataset/seed from config.toml, for runs without a summary."""
    cfg_path = path / CONFIG_FILE
    try:
        cfg = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    found: dict[str, Any] = {}
    for key in ("algorithm", "dataset", "model", "partition"):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("name")
        if isinstance(value, str):
            found[key] = value
    for key in ("seed", "rounds", "num_clients"):
        value = cfg.get(key)
        if value is None:
            # Commonly nested under a section such as [run] or [federation].
            value = next(
                (sec[key] for sec in cfg.values() if isinstance(sec, dict) and key in sec),
                None,
            )
        if isinstance(value, int) and not isinstance(value, bool):
            found[key] = value
    return found


def _summary_from_metrics(path: Path, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Stand-in summary for an interrupted run: the last evaluation is the result."""
    last = metrics[-1]
    summary: dict[str, Any] = _read_config_identity(path)
    last_round = last.get("round", len(metrics))
    summary.update(
        {
            "rounds": last_round,
            "personalized": last.get("personalized"),
            "generalization": last.get("generalization"),
            "global": last.get("global"),
            "last_round": {
                "round": last_round,
                "personalized": last.get("personalized"),
                "generalization": last.get("generalization"),
                "global": last.get("global"),
            },
            "bytes": last.get("bytes"),
            "wall_seconds": last.get("wall_seconds"),
            "rejected_replies": last.get("rejected_replies"),
            "interrupted": True,
        }
    )
    return summary


def read_run(path: str | Path) -> RunRecord:
    """Load one run directory; raise UserError (one line) if it cannot be used."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path} is missing; is {run_dir} a fedpal run directory?")

    summary_path = run_dir / SUMMARY_FILE
    has_summary = summary_path.is_file()
    metrics = _read_json_lines(metrics_path, tolerate_torn_tail=not has_summary)

    if has_summary:
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {summary_path}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise UserError(f"{summary_path} is not valid JSON: {exc.msg}") from exc
        if not isinstance(summary, dict):
            raise UserError(f"{summary_path} is not a JSON object")
    elif metrics:
        summary = _summary_from_metrics(run_dir, metrics)
    else:
        raise UserError(f"{run_dir} has no evaluations yet (empty {METRICS_FILE}, no {SUMMARY_FILE})")
    return RunRecord(path=run_dir, summary=summary, metrics=metrics)


def _base_label(rec: RunRecord) -> str:
    algo = rec.algorithm or rec.path.name
    return f"{algo} (seed {rec.seed})" if rec.seed is not None else algo


def run_label(rec: RunRecord, records: Sequence[RunRecord] = ()) -> str:
    """Human label such as "fedavg (seed 0)".

    Pass the other runs shown alongside ``rec`` so that runs sharing algorithm and seed
    (e.g. two hyper-parameter settings) get their directory name appended and stay
    distinguishable in legends and tables.
    """
    key = (rec.algorithm, rec.seed)
    clashes = sum(1 for other in records if (other.algorithm, other.seed) == key)
    if clashes <= 1 or rec.algorithm is None:
        return _base_label(rec)
    algo = rec.algorithm or rec.path.name
    seed = f"seed {rec.seed}, " if rec.seed is not None else ""
    return f"{algo} ({seed}{rec.path.name})"


def run_labels(records: Sequence[RunRecord]) -> list[str]:
    """Labels for a list of runs shown together (see run_label)."""
    return [run_label(r, records) for r in records]
