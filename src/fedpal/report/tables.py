"""Markdown/CSV tables of run results, per run and aggregated across seeds.

Accuracy-type metrics are stored as fractions in the run files and shown as
percentages with two decimals, the convention of the papers we compare against.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedpal.report.run_reader import RunRecord, get_path

BLANK = "–"


@dataclass(frozen=True)
class Metric:
    """One reported number: where it lives in summary.json and how to show it."""

    key: str
    header: str
    path: tuple[str, ...]
    kind: str  # "pct" (fraction shown as %), "bytes", "seconds" or "round"


METRICS: tuple[Metric, ...] = (
    Metric("pers_acc", "Pers. acc (%)", ("personalized", "accuracy"), "pct"),
    Metric("pers_acc_unweighted", "Pers. unweighted (%)", ("personalized", "accuracy_unweighted"), "pct"),
    Metric("pers_acc_std", "Pers. std (%)", ("personalized", "accuracy_std"), "pct"),
    Metric("pers_acc_worst10", "Pers. worst-10% (%)", ("personalized", "accuracy_worst10"), "pct"),
    Metric("pers_macro_f1", "Pers. macro-F1 (%)", ("personalized", "macro_f1"), "pct"),
    Metric("gen_acc", "Gen. acc (%)", ("generalization", "accuracy"), "pct"),
    Metric("gen_macro_f1", "Gen. macro-F1 (%)", ("generalization", "macro_f1"), "pct"),
    Metric("global_acc", "Global acc (%)", ("global", "accuracy"), "pct"),
    Metric("proto_acc", "Pers. acc, prototype (%)", ("inference", "prototype", "personalized_accuracy"), "pct"),
    Metric("head_acc", "Pers. acc, head (%)", ("inference", "head", "personalized_accuracy"), "pct"),
    Metric("stability", "Pers. round-to-round std (%)", ("stability", "personalized_accuracy_std"), "pct"),
    Metric("selected_round", "Sel. round", ("selected_round", "round"), "round"),
    Metric("selected_pers_acc", "Sel. pers. acc (%)", ("selected_round", "personalized", "accuracy"), "pct"),
    Metric("bytes_up", "Up", ("bytes", "up"), "bytes"),
    Metric("bytes_down", "Down", ("bytes", "down"), "bytes"),
    Metric("bytes_up_per_round", "Up / round", ("bytes_per_round", "up"), "bytes"),
    Metric("bytes_down_per_round", "Down / round", ("bytes_per_round", "down"), "bytes"),
    Metric("wall_seconds", "Wall (s)", ("wall_seconds",), "seconds"),
)
# Columns of the per-run table only when some run has them: held-out clients (data.unseen_clients) and FedProto's
# clients scored with PA prototypes (algorithm.inference_prototypes = "pa").
OPTIONAL_METRICS: tuple[Metric, ...] = (
    Metric("unseen_acc", "Unseen acc (%)", ("unseen", "personalized", "accuracy"), "pct"),
    Metric("unseen_zero_shot_acc", "Unseen zero-shot (%)", ("unseen", "zero_shot", "accuracy"), "pct"),
    Metric(
        "proto_pa_acc", "Pers. acc, PA prototypes (%)", ("inference", "prototype_pa", "personalized_accuracy"), "pct"
    ),
)


def _number(value: Any) -> float | None:
    """Numeric value or None; bools, strings and NaN count as missing."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def human_bytes(n: float | None) -> str:
    """Decimal units (1 KB = 1000 B), matching how link bandwidth is usually quoted."""
    if n is None:
        return BLANK
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _format_value(value: float | None, kind: str) -> str:
    if value is None:
        return BLANK
    if kind == "pct":
        return f"{100.0 * value:.2f}"
    if kind == "bytes":
        return human_bytes(value)
    if kind == "round":
        return f"{value:.0f}"
    return f"{value:.1f}"


def _format_mean_std(mean: float | None, std: float | None, kind: str) -> str:
    if mean is None or std is None:
        return BLANK
    if kind == "pct":
        return f"{100.0 * mean:.2f} ± {100.0 * std:.2f}"
    if kind == "bytes":
        # Show both numbers in the unit chosen for the mean so they read together.
        unit_text = human_bytes(mean)
        unit = unit_text.split()[-1]
        scale = {"GB": 1e9, "MB": 1e6, "KB": 1e3, "B": 1.0}[unit]
        return f"{mean / scale:.2f} ± {std / scale:.2f} {unit}"
    return f"{mean:.1f} ± {std:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_row(rec: RunRecord) -> dict[str, Any]:
    """Raw numbers of one run (fractions, bytes, seconds), keyed by Metric.key.

    Kept unformatted so the same rows feed both the per-run table and the seed
    aggregation; missing optional metrics are None.
    """
    row: dict[str, Any] = {
        "algorithm": rec.algorithm,
        "dataset": rec.summary.get("dataset"),
        "partition": rec.summary.get("partition"),
        "seed": rec.seed,
        "rounds": rec.summary.get("rounds"),
        "interrupted": rec.interrupted,
        "run": rec.path.name,
    }
    for metric in METRICS + OPTIONAL_METRICS:
        row[metric.key] = _number(get_path(rec.summary, *metric.path))
    return row


def runs_markdown_table(records: Sequence[RunRecord]) -> str:
    """One row per run with every headline metric; absent metrics show as "–".

    The first column is the run's directory name, so a row can be traced back to files. The optional columns
    (unseen clients, PA prototypes) appear only when some run has them.
    """
    rows = [run_row(rec) for rec in records]
    shown = METRICS + tuple(m for m in OPTIONAL_METRICS if any(row[m.key] is not None for row in rows))
    headers = ["Run dir", "Algorithm", "Dataset", "Partition", "Seed", "Rounds", *(m.header for m in shown)]
    body: list[list[str]] = []
    for rec, row in zip(records, rows, strict=True):
        rounds = BLANK if row["rounds"] is None else str(row["rounds"])
        if row["interrupted"]:
            rounds += " (interrupted)"
        cells = [
            rec.path.name,
            row["algorithm"] or BLANK,
            row["dataset"] or BLANK,
            row["partition"] or BLANK,
            BLANK if row["seed"] is None else str(row["seed"]),
            rounds,
        ]
        cells += [_format_value(row[m.key], m.kind) for m in shown]
        body.append(cells)
    return _markdown(headers, body)


def aggregate_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and population std (ddof=0) of each metric per algorithm.

    ddof=0 keeps a single-seed entry defined (std 0.00) instead of NaN. Each output
    dict has ``algorithm``, ``n_runs``, ``seeds`` and ``<key>_mean``/``<key>_std``
    for every Metric key; a metric missing from all runs of an algorithm gives None,
    and runs missing it are left out of that metric's statistics.
    """
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get("algorithm"), []).append(row)
    out: list[dict[str, Any]] = []
    for algorithm, members in groups.items():
        agg: dict[str, Any] = {
            "algorithm": algorithm,
            "n_runs": len(members),
            "seeds": [m.get("seed") for m in members],
        }
        for metric in METRICS:
            values = [v for v in (_number(m.get(metric.key)) for m in members) if v is not None]
            if values:
                mean = math.fsum(values) / len(values)
                var = math.fsum((v - mean) ** 2 for v in values) / len(values)
                agg[f"{metric.key}_mean"], agg[f"{metric.key}_std"] = mean, math.sqrt(var)
            else:
                agg[f"{metric.key}_mean"] = agg[f"{metric.key}_std"] = None
        out.append(agg)
    return out


BRIEF_KEYS = ("pers_acc", "gen_acc", "global_acc", "bytes_up_per_round", "wall_seconds")


def brief_metrics() -> tuple[Metric, ...]:
    """The columns a reader needs first, for the terminal: personalized, generalization, global, bytes, time."""
    by_key = {m.key: m for m in METRICS}
    return tuple(by_key[k] for k in BRIEF_KEYS)


def brief_runs_table(records: Sequence[RunRecord]) -> str:
    """The terminal's table of runs: the first columns only (the files hold the full table)."""
    rows = [run_row(rec) for rec in records]
    shown = brief_metrics()
    headers = ["Run dir", "Algorithm", "Rounds", *(m.header for m in shown)]
    body = [
        [rec.path.name, row["algorithm"] or BLANK, BLANK if row["rounds"] is None else str(row["rounds"])]
        + [_format_value(row[m.key], m.kind) for m in shown]
        for rec, row in zip(records, rows, strict=True)
    ]
    return _markdown(headers, body)


def compare_tables(
    records_by_algorithm: dict[str, list[RunRecord]], metrics: Sequence[Metric] = METRICS
) -> tuple[str, str]:
    """(markdown, csv) comparing algorithms as mean ± std over their seeds; the markdown shows ``metrics`` (all by
    default), the CSV always every metric.

    The dict keys name the rows, so callers can group variants (e.g. "fedavg+ft")
    however they like. The CSV keeps numbers machine-readable: separate ``_mean`` and
    ``_std`` columns, in the units the markdown shows (percent for accuracies, bytes,
    seconds), with empty cells where a metric is missing.
    """
    rows: list[dict[str, Any]] = []
    for name, records in records_by_algorithm.items():
        for rec in records:
            row = run_row(rec)
            row["algorithm"] = name
            rows.append(row)
    aggregated = aggregate_seeds(rows)

    headers = ["Algorithm", "Seeds", *(m.header for m in metrics)]
    body = [
        [
            str(agg["algorithm"]),
            str(agg["n_runs"]),
            *(_format_mean_std(agg[f"{m.key}_mean"], agg[f"{m.key}_std"], m.kind) for m in metrics),
        ]
        for agg in aggregated
    ]
    markdown = _markdown(headers, body)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    csv_headers = ["algorithm", "n_runs", "seeds"]
    for m in METRICS:
        unit = "_pct" if m.kind == "pct" else ""
        csv_headers += [f"{m.key}{unit}_mean", f"{m.key}{unit}_std"]
    writer.writerow(csv_headers)
    for agg in aggregated:
        line: list[Any] = [agg["algorithm"], agg["n_runs"], " ".join(str(s) for s in agg["seeds"])]
        for m in METRICS:
            scale = 100.0 if m.kind == "pct" else 1.0
            for stat in ("mean", "std"):
                value = agg[f"{m.key}_{stat}"]
                line.append("" if value is None else round(value * scale, 6))
        writer.writerow(line)
    return markdown, buf.getvalue()
