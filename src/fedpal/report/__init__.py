"""Reports (plots and tables) from fedpal run directories.

Reads only the JSON/TOML files a run leaves behind and never imports torch, so
results can be summarised anywhere matplotlib is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedpal.errors import UserError
from fedpal.report.plots import (
    has_diagnostics,
    has_matrices,
    plot_accuracy_vs_round,
    plot_client_accuracy_distribution,
    plot_diagnostics,
    plot_matrices,
)
from fedpal.report.run_reader import RunRecord, get_path, read_run, run_label, run_labels
from fedpal.report.tables import aggregate_seeds, compare_tables, run_row, runs_markdown_table

__all__ = [
    "RunRecord",
    "aggregate_seeds",
    "compare_tables",
    "make_report",
    "plot_accuracy_vs_round",
    "plot_client_accuracy_distribution",
    "plot_diagnostics",
    "read_run",
    "run_label",
    "run_labels",
    "run_row",
    "runs_markdown_table",
]

ACCURACY_PNG = "accuracy_vs_round.png"
CLIENT_PNG = "client_accuracy.png"
DIAGNOSTICS_PNG = "diagnostics_vs_round.png"
MATRICES_PNG = "client_matrices.png"
REPORT_MD = "report.md"


def comparison_key(rec: RunRecord) -> tuple[str, str, str]:
    """What must match for runs to share a table: the data, how it was cut, and what generalization measures."""
    own = get_path(rec.summary, "generalization", "include_own")
    pool = "?" if own is None else ("all clients' test data" if own else "other clients' test data")
    return str(rec.summary.get("dataset", "?")), str(rec.summary.get("partition", "?")), pool


def check_comparable(records: Sequence[RunRecord]) -> None:
    """One clear line instead of a table that puts different datasets, partitions or protocols side by side (a field
    a run does not record, e.g. an interrupted run's, matches anything)."""
    keys = [comparison_key(rec) for rec in records]
    fields = ("dataset", "partition", "generalization on")
    for i, name in enumerate(fields):
        known = sorted({key[i] for key in keys if key[i] != "?"})
        if len(known) > 1:
            groups = {
                value: [rec.path.name for rec, key in zip(records, keys, strict=True) if key[i] == value]
                for value in known
            }
            described = "; ".join(f"{name} {value}: {', '.join(runs)}" for value, runs in groups.items())
            raise UserError(f"these runs are not comparable, report each group on its own: {described}")


def make_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Read every run, write the two plots and report.md into out_dir; return their paths.

    All runs are read before anything is written, so a bad directory fails fast with
    a UserError instead of leaving a half-written report.
    """
    if not run_dirs:
        raise UserError("no run directories given to report on")
    records = [read_run(d) for d in run_dirs]
    check_comparable(records)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create report directory {out}: {exc}") from exc

    acc_png = plot_accuracy_vs_round(records, out / ACCURACY_PNG)
    client_png = plot_client_accuracy_distribution(records, out / CLIENT_PNG)

    parts = [
        "# fedpal report",
        "",
        "Accuracies are percentages; personalized accuracy is sample-weighted over clients, "
        "generalization on a sample of the clients' pooled test data; unseen clients (if any) were held out "
        'of training. "–" marks a metric the run did not log.',
        "",
        "## Runs",
        "",
        runs_markdown_table(records),
    ]
    by_algorithm: dict[str, list[RunRecord]] = {}
    for rec in records:
        by_algorithm.setdefault(rec.algorithm or rec.path.name, []).append(rec)
    # Only worth a separate table when at least one algorithm was run with several seeds.
    if any(len(group) > 1 for group in by_algorithm.values()):
        markdown, _ = compare_tables(by_algorithm)
        parts += ["## Mean ± std across seeds", "", markdown]
    parts += [
        "## Accuracy vs round",
        "",
        f"![accuracy vs round]({acc_png.name})",
        "",
        "## Per-client accuracy (last round)",
        "",
        f"![per-client accuracy]({client_png.name})",
        "",
    ]
    written = [acc_png, client_png]
    if has_diagnostics(records):
        diag_png = plot_diagnostics(records, out / DIAGNOSTICS_PNG)
        parts += ["## Method diagnostics", "", f"![diagnostics vs round]({diag_png.name})", ""]
        written.append(diag_png)
    if has_matrices(records):
        matrices_png = plot_matrices([r for r in records if has_matrices([r])], out / MATRICES_PNG)
        parts += ["## Client-by-client matrices (last evaluation)", "", f"![matrices]({matrices_png.name})", ""]
        written.append(matrices_png)
    report_md = out / REPORT_MD
    report_md.write_text("\n".join(parts), encoding="utf-8")
    return [*written, report_md]
