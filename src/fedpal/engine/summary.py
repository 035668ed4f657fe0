"""summary.json: the final figures of a run, with the round selected by validation loss and the last round."""

from __future__ import annotations

import itertools
from typing import Any

from fedpal.config import ExperimentConfig

SECTIONS = ("personalized", "generalization", "global", "validation", "inference", "diagnostics")


def _nan_to_inf(value: Any) -> float:
    return float("inf") if value is None or value != value else float(value)


def _round_view(entry: dict[str, Any]) -> dict[str, Any]:
    return {"round": entry["round"], **{k: entry.get(k) for k in SECTIONS}}


def stability(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Training stability (pFLAlign's measure, reported for every method), over the evaluations in the last half of
    the run (rounds > last round / 2): the standard deviation (population) of personalized accuracy, and its
    fluctuation, the root mean square of successive changes over sqrt(2) (von Neumann's estimate of the noise around
    a trend, which the plain std also counts while a method is still climbing). None with fewer than two."""
    last = history[-1]["round"]
    late = [e["personalized"]["accuracy"] for e in history if 2 * e["round"] > last]
    late = [float(a) for a in late if a is not None and a == a]
    std = fluctuation = None
    if len(late) >= 2:
        mean = sum(late) / len(late)
        std = (sum((a - mean) ** 2 for a in late) / len(late)) ** 0.5
        steps = [b - a for a, b in itertools.pairwise(late)]
        fluctuation = (sum(d * d for d in steps) / (2 * len(steps))) ** 0.5
    return {
        "personalized_accuracy_std": std,
        "personalized_accuracy_fluctuation": fluctuation,
        "evaluations": len(late),
        "after_round": last // 2,
    }


def build_summary(config: ExperimentConfig, history: list[dict[str, Any]], counters: Any) -> dict[str, Any]:
    last = history[-1]
    selected = min(history, key=lambda e: (_nan_to_inf(e["validation"]["loss"]), e["round"]))
    summary: dict[str, Any] = {
        "algorithm": config.algorithm_name,
        "dataset": config.data.dataset,
        "model": config.model.family or config.model.name,
        "partition": config.data.partition,
        "num_clients": len(last["personalized"]["per_client_accuracy"]),
        "seed": config.seed,
        "rounds": last["round"],
        "personalized": last["personalized"],
        "generalization": last["generalization"],
        "global": last.get("global"),
        "validation": last["validation"],
        "inference": last.get("inference"),
        "diagnostics": last.get("diagnostics"),
        "unseen": last.get("unseen"),  # held-out clients: evaluated at the last round only
        "last_round": _round_view(last),
        "selected_round": {**_round_view(selected), "criterion": "validation_loss"},
        "stability": stability(history),
        "bytes": counters.as_bytes(),
        "bytes_per_round": {
            direction: counters.as_bytes()[direction] / max(last["round"], 1) for direction in ("up", "down")
        },
        "local_steps": counters.local_steps,
        "rejected_replies": counters.rejected_replies,
        "rejected_clients": counters.rejected_clients,
        "client_failures": counters.client_failures,
        "wall_seconds": round(counters.wall_seconds, 3),
    }
    if config.availability.active:  # unreliable clients: what was lost, and the virtual time the rounds took
        summary["availability"] = {
            "lost_replies": counters.lost_replies,
            "late_replies": counters.late_replies,
            "virtual_seconds": counters.virtual_seconds,
        }
    if config.eval.report_best_by_test:
        best = max(history, key=lambda e: (e["personalized"]["accuracy"], -e["round"]))
        summary["best_by_test"] = {
            "round": best["round"],
            "personalized_accuracy": best["personalized"]["accuracy"],
            "note": "round chosen on test accuracy: optimistic, not a fair estimate",
        }
    return summary
