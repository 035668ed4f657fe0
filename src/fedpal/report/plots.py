"""PNG plots of run directories.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, not
pyplot: no global figure state, no GUI backend, safe to call from tests and threads.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from fedpal.report.run_reader import RunRecord, get_path, run_labels


def _pct(value: Any) -> float:
    """Fraction -> percent, NaN for missing so matplotlib leaves a gap."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return 100.0 * float(value)


def _series(rec: RunRecord, *keys: str) -> tuple[list[float], list[float]]:
    rounds = [float(m.get("round", i + 1)) for i, m in enumerate(rec.metrics)]
    values = [_pct(get_path(m, *keys)) for m in rec.metrics]
    return rounds, values


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=120)
    return out


def _mean_band(group: Sequence[RunRecord], *keys: str) -> tuple[list[float], list[float], list[float]]:
    """Per evaluation round: the mean and std over the group's runs (seeds) of one metric, in percent."""
    by_round: dict[float, list[float]] = {}
    for rec in group:
        for r, v in zip(*_series(rec, *keys), strict=True):
            if not math.isnan(v):
                by_round.setdefault(r, []).append(v)
    rounds = sorted(by_round)
    means = [float(np.mean(by_round[r])) for r in rounds]
    stds = [float(np.std(by_round[r])) for r in rounds]
    return rounds, means, stds


def plot_accuracy_vs_round(records: Sequence[RunRecord], path: str | Path) -> Path:
    """Learning curves: personalized accuracy (left) and generalization accuracy (right), one colour per algorithm,
    the mean over its runs (seeds) with a ± std band when there are several.

    The global model's accuracy is drawn dashed in the algorithm's colour on the left panel where it has one and it
    differs from the personalized accuracy (a method whose personalized model is the global one draws one line).
    """
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_pers, ax_gen = fig.subplots(1, 2, sharex=True)
    groups: dict[str, list[RunRecord]] = {}
    for rec, label in zip(records, run_labels(records), strict=True):
        groups.setdefault(rec.algorithm or label, []).append(rec)
    drew_any = False
    all_rounds: set[float] = set()
    for i, (name, group) in enumerate(groups.items()):
        color = f"C{i % 10}"
        label = name if len(group) == 1 else f"{name} ({len(group)} runs)"
        rounds, pers, pers_std = _mean_band(group, "personalized", "accuracy")
        all_rounds.update(rounds)
        if rounds:
            drew_any = True
            _draw(ax_pers, rounds, pers, pers_std, color, label, "-")
        g_rounds, glob, glob_std = _mean_band(group, "global", "accuracy")
        if g_rounds and not (g_rounds == rounds and np.allclose(glob, pers, atol=1e-9)):
            _draw(ax_pers, g_rounds, glob, glob_std, color, f"{label}, global model", "--")
        gen_rounds, gen, gen_std = _mean_band(group, "generalization", "accuracy")
        if gen_rounds:
            _draw(ax_gen, gen_rounds, gen, gen_std, color, label, "-")
    include_own = {get_path(rec.summary, "generalization", "include_own") for rec in records} - {None}
    pool = "all clients'" if include_own == {True} else "other clients'" if include_own == {False} else "pooled"
    ax_pers.set_title("Personalized accuracy (each client's own test data)")
    ax_gen.set_title(f"Generalization accuracy ({pool} test data)")
    for ax in (ax_pers, ax_gen):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(all_rounds) == 1:  # one evaluation: an integer range around it, not ticks at 1.9 ... 2.1
            only = next(iter(all_rounds))
            ax.set_xlim(only - 1, only + 1)
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if not drew_any:
        ax_pers.text(0.5, 0.5, "no evaluations logged", ha="center", va="center", transform=ax_pers.transAxes)
    return _save(fig, path)


def _draw(
    ax: Any, rounds: list[float], means: list[float], stds: list[float], color: str, label: str, style: str
) -> None:
    ax.plot(rounds, means, color=color, linestyle=style, marker=".", label=label)
    if any(s > 0 for s in stds):
        low = [m - s for m, s in zip(means, stds, strict=True)]
        high = [m + s for m, s in zip(means, stds, strict=True)]
        ax.fill_between(rounds, low, high, color=color, alpha=0.15, linewidth=0)


def last_round_client_accuracy(rec: RunRecord) -> list[float]:
    """Per-client personalized accuracy (fractions) at the last evaluated round.

    Prefers summary.json's last round, falling back to the last metrics line, so
    interrupted runs are plotted too.
    """
    candidates = (
        get_path(rec.summary, "last_round", "personalized", "per_client_accuracy"),
        get_path(rec.summary, "personalized", "per_client_accuracy"),
        get_path(rec.metrics[-1], "personalized", "per_client_accuracy") if rec.metrics else None,
    )
    for values in candidates:
        if isinstance(values, list) and values:
            nums = [_pct(v) / 100.0 for v in values]
            return [v for v in nums if not math.isnan(v)]
    return []


def plot_client_accuracy_distribution(records: Sequence[RunRecord], path: str | Path) -> Path:
    """Box plot plus every client as a point, one column per run.

    Averages hide clients the personalization fails; the spread and the low tail are
    what distinguishes personalized-FL methods, so each client is drawn.
    """
    labels = run_labels(records)
    fig = Figure(figsize=(max(6.0, 1.4 * len(records) + 2.0), 4.5), layout="constrained")
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # fixed jitter: identical inputs give identical images
    positions = list(range(1, len(records) + 1))
    for pos, rec in zip(positions, records, strict=True):
        acc = 100.0 * np.asarray(last_round_client_accuracy(rec), dtype=float)
        color = f"C{(pos - 1) % 10}"
        if acc.size == 0:
            ax.text(pos, 50.0, "no per-client\ndata", ha="center", va="center", fontsize="small")
            continue
        ax.boxplot(
            [acc],
            positions=[pos],
            widths=0.5,
            showfliers=False,  # every client is drawn as a point below anyway
            medianprops={"color": color},
        )
        jitter = rng.uniform(-0.15, 0.15, size=acc.size)
        ax.scatter(pos + jitter, acc, s=12, color=color, alpha=0.7, zorder=3)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, rotation=20 if len(records) > 3 else 0, ha="right" if len(records) > 3 else "center")
    ax.set_xlim(0.4, len(records) + 0.6)
    ax.set_ylabel("personalized accuracy per client (%)")
    ax.set_title("Per-client personalized accuracy, last round")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


# Diagnostics worth a panel each, in this order, when any run logged them: (key, title, y label).
DIAGNOSTIC_PANELS: tuple[tuple[str, str, str], ...] = (
    ("global_angle_min_deg", "Global prototypes: minimum pairwise angle", "degrees"),
    ("global_angle_mean_deg", "Global prototypes: mean pairwise angle", "degrees"),
    ("global_norm_mean", "Global prototypes: mean norm", "norm"),
    ("feature_target_distance", "Features to their targets: mean distance", "L2 distance"),
)


def has_diagnostics(records: Sequence[RunRecord]) -> bool:
    return any(isinstance(m.get("diagnostics"), dict) for rec in records for m in rec.metrics)


def diagnostic_panels(records: Sequence[RunRecord]) -> list[tuple[str, str, str]]:
    """(key, title, y label) of every diagnostic the runs logged: the prototype geometry panels first, then any
    other method's numbers (FedAli's k-means, FedFomo's affinities, ...) under their own names."""
    logged: dict[str, None] = {}
    for rec in records:
        for m in rec.metrics:
            if isinstance(m.get("diagnostics"), dict):
                logged.update(dict.fromkeys(k for k, v in m["diagnostics"].items() if isinstance(v, int | float)))
    known = [panel for panel in DIAGNOSTIC_PANELS if panel[0] in logged]
    named = {panel[0] for panel in DIAGNOSTIC_PANELS}
    return known + [(key, key.replace("_", " "), "") for key in logged if key not in named]


def plot_diagnostics(records: Sequence[RunRecord], path: str | Path) -> Path:
    """Every logged method diagnostic over rounds, one panel each (prototype geometry: minimum/mean pairwise angle,
    mean norm, feature-to-target distance; FedAli: k-means iterations, relocated centres, shift; ...)."""
    panels = diagnostic_panels(records) or list(DIAGNOSTIC_PANELS)
    rows = -(-len(panels) // 2)
    fig = Figure(figsize=(12, 4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, 2, sharex=True)).flatten()
    colors = [f"C{i % 10}" for i in range(len(records))]
    for ax, (key, title, ylabel) in zip(axes, panels, strict=False):
        for rec, label, color in zip(records, run_labels(records), colors, strict=True):
            rounds = [float(m.get("round", i + 1)) for i, m in enumerate(rec.metrics)]
            values = [get_path(m, "diagnostics", key) for m in rec.metrics]
            series = [float(v) if isinstance(v, int | float) else math.nan for v in values]
            if any(not math.isnan(v) for v in series):
                ax.plot(rounds, series, color=color, marker=".", label=label)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _save(fig, path)


def has_matrices(records: Sequence[RunRecord]) -> bool:
    return any(isinstance(m.get("matrices"), dict) for rec in records for m in rec.metrics)


def plot_matrices(records: Sequence[RunRecord], path: str | Path) -> Path:
    """The last recorded client-by-client matrix of each run (FedFomo's affinities) as a heatmap, clients ordered
    by their true group with the groups' blocks outlined when the data know them."""
    last = [(rec, next(m for m in reversed(rec.metrics) if isinstance(m.get("matrices"), dict))) for rec in records]
    panels = [(rec, m, name) for rec, m in last for name in sorted(m["matrices"])]
    fig = Figure(figsize=(5 * len(panels), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    labels = dict(zip([id(r) for r in records], run_labels(records), strict=True))
    for ax, (rec, entry, name) in zip(axes, panels, strict=True):
        matrix = np.asarray(entry["matrices"][name], dtype=float)
        groups = entry.get("client_groups") or []
        order = np.argsort(groups, kind="stable") if len(groups) == matrix.shape[0] else np.arange(matrix.shape[0])
        image = ax.imshow(matrix[np.ix_(order, order)], cmap="viridis")
        fig.colorbar(image, ax=ax, shrink=0.8)
        if len(groups) == matrix.shape[0]:
            ordered = np.asarray(groups)[order]
            edges = [0, *(np.flatnonzero(np.diff(ordered)) + 1).tolist(), len(ordered)]
            for start, stop in itertools.pairwise(edges):
                ax.add_patch(
                    Rectangle((start - 0.5, start - 0.5), stop - start, stop - start, fill=False, color="white", lw=1.5)
                )
            ax.set_xlabel("client (ordered by true group; white boxes: groups)")
        else:
            ax.set_xlabel("client")
        ax.set_ylabel("client")
        ax.set_title(f"{labels[id(rec)]}: {name}, round {entry.get('round', '?')}")
    return _save(fig, path)
