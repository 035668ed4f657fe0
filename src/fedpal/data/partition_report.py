"""Show what a partition looks like: class counts per client as an array, a markdown table, a heatmap.

Reports are how a reader checks that "alpha = 0.1" really produced the skew claimed, so the table keeps
exact counts and the heatmap stays legible from 2 up to 500 clients.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedpal.errors import UserError

__all__ = ["format_partition_table", "partition_table", "save_partition_heatmap"]

# Above this many cells the numbers would be unreadable, so only colours are drawn.
_MAX_ANNOTATED_CELLS = 300
_MAX_ANNOTATED_CLIENTS = 30


def integer_locator() -> MaxNLocator:
    """Matplotlib's default tick choice (AutoLocator's settings), restricted to integers."""
    return MaxNLocator(nbins="auto", steps=[1, 2, 2.5, 5, 10], integer=True)


def partition_table(client_labels: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Count the samples of each class held by each client: int64 array ``[clients, classes]``."""
    num_clients = len(client_labels)
    if num_clients == 0:
        return np.zeros((0, num_classes), dtype=np.int64)
    sizes = np.array([np.asarray(lab).size for lab in client_labels], dtype=np.int64)
    flat = np.concatenate([np.asarray(lab).ravel() for lab in client_labels]).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_classes):
        raise UserError(f"partition table: labels must lie in [0, {num_classes}), got {flat.min()}..{flat.max()}")
    owner = np.repeat(np.arange(num_clients), sizes)
    cells = np.bincount(owner * num_classes + flat, minlength=num_clients * num_classes)
    return cells.reshape(num_clients, num_classes).astype(np.int64)


def format_partition_table(counts: np.ndarray, class_names: Sequence[str] | None = None) -> str:
    """Markdown table: one row per client, one column per class plus a total, then a total row."""
    counts = np.asarray(counts, dtype=np.int64)
    num_classes = counts.shape[1]
    names = [str(c) for c in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    if len(names) != num_classes:
        raise UserError(f"partition table: {len(names)} class names for {num_classes} classes")

    def row(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    lines = [row(["client", *names, "total"]), row(["---"] + ["---:"] * (num_classes + 1))]
    lines += [row([k, *counts[k].tolist(), int(counts[k].sum())]) for k in range(counts.shape[0])]
    lines.append(row(["**total**", *counts.sum(axis=0).tolist(), int(counts.sum())]))
    return "\n".join(lines)


def save_partition_heatmap(counts: np.ndarray, path: str | os.PathLike, title: str = "") -> None:
    """Write a PNG heatmap (clients across, classes down, colour = samples).

    Uses a bare ``Figure`` so no pyplot global state or backend switch is involved. Cell numbers are
    drawn only for small tables; for many clients the ticks thin out automatically.
    """
    counts = np.asarray(counts)
    num_clients, num_classes = counts.shape
    width = float(np.clip(2.5 + 0.22 * num_clients, 5.0, 20.0))
    height = float(np.clip(1.8 + 0.32 * num_classes, 3.0, 12.0))
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(counts.T, aspect="auto", interpolation="nearest", cmap="viridis", origin="upper")
    fig.colorbar(image, ax=ax, label="samples", pad=0.01)
    ax.set_xlabel("client")
    ax.set_ylabel("class")
    if title:
        ax.set_title(title)
    if num_clients <= 40:
        ax.set_xticks(np.arange(num_clients))
    else:
        ax.xaxis.set_major_locator(integer_locator())
    if num_classes <= 40:
        ax.set_yticks(np.arange(num_classes))
    else:
        ax.yaxis.set_major_locator(integer_locator())
    if num_clients * num_classes <= _MAX_ANNOTATED_CELLS and num_clients <= _MAX_ANNOTATED_CLIENTS:
        threshold = counts.max() / 2 if counts.size else 0
        for k, c in np.ndindex(num_clients, num_classes):
            ax.text(
                k,
                c,
                str(int(counts[k, c])),
                ha="center",
                va="center",
                fontsize=7,
                color="black" if counts[k, c] > threshold else "white",
            )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
