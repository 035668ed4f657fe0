"""The benchmark protocol of DESIGN §8, shared by the benchmark scripts: an equal tuning grid for every method chosen
on validation data, paired seeds with bootstrap intervals, and divergence counted as failure.

A benchmark script imports this after putting ``benchmarks/`` on ``sys.path`` (the scripts run as files).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpal.report.run_reader import RunRecord, get_path, read_run

BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Candidate:
    """One point of a method's tuning grid: a label and the config overrides it sets."""

    label: str
    overrides: tuple[str, ...]


def grid(dimensions: Sequence[tuple[str, Sequence[object]]]) -> list[Candidate]:
    """Every combination of the given (config key, values) dimensions, e.g. [("train.lr", (0.03, 0.1)),
    ("algorithm.mu", (0.01, 0.1))]; labels name the short keys."""
    points: list[Candidate] = [Candidate("", ())]
    for key, values in dimensions:
        short = key.split(".")[-1]
        points = [
            Candidate(
                f"{p.label}, {short}={v:g}" if isinstance(v, float) else f"{p.label}, {short}={v}",
                (*p.overrides, f"{key}={v}"),
            )
            for p in points
            for v in values
        ]
    points = [Candidate(p.label.removeprefix(", "), p.overrides) for p in points]
    return points


def validation_score(record: RunRecord) -> float:
    """The tuning criterion: validation accuracy of the round selected by validation loss (NaN-safe: -inf when the
    run diverged or logged nothing)."""
    value = get_path(record.summary, "selected_round", "validation", "accuracy")
    if value is None:
        value = get_path(record.summary, "validation", "accuracy")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else -math.inf


def best_candidate(tuned: Sequence[tuple[Candidate, Path]]) -> Candidate | None:
    """The grid point whose tuning run (its directory beside it) has the best validation score; None until every one
    of those runs has finished. Ties go to the earlier point, so list the grid from the most conservative point."""
    scored = []
    for candidate, path in tuned:
        if not (path / "summary.json").exists():
            return None
        scored.append((validation_score(read_run(path)), candidate))
    if not scored:
        return None
    return max(scored, key=lambda pair: pair[0])[1]  # max keeps the first of equal scores


def diverged(record: RunRecord) -> bool:
    """A run that rejected any reply (NaN/Inf) or ended with a non-finite validation loss."""
    loss = get_path(record.summary, "validation", "loss")
    rejected = int(record.summary.get("rejected_replies") or 0)
    return rejected > 0 or not (isinstance(loss, int | float) and math.isfinite(loss))


def paired_interval(differences: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-seed paired differences and its bootstrap 95% interval (percentile, resampling seeds)."""
    values = np.asarray(differences, dtype=float)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    if values.size == 1:  # one seed has no spread to resample
        return float(values[0]), math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(BOOTSTRAP_RESAMPLES, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def format_interval(mean: float, low: float, high: float) -> str:
    """'+1.23 [+0.40, +2.10]' in percentage points; '–' when undefined."""
    if math.isnan(mean):
        return "–"
    if math.isnan(low):
        return f"{100 * mean:+.2f} [no interval from one seed]"
    return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"
