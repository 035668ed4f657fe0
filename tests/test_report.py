"""Reporting layer: fake run directories in, PNGs and tables out."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import fedpal.report
from fedpal.errors import UserError
from fedpal.report import (
    aggregate_seeds,
    compare_tables,
    make_report,
    read_run,
    run_label,
    run_labels,
    run_row,
    runs_markdown_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pers(acc: float, per_client: list[float]) -> dict[str, Any]:
    return {
        "accuracy": acc,
        "accuracy_unweighted": acc - 0.01,
        "accuracy_std": 0.05,
        "accuracy_worst10": acc - 0.11,
        "macro_f1": acc - 0.06,
        "loss": 0.3,
        "per_client_accuracy": per_client,
        "per_client_samples": [100] * len(per_client),
    }


def _metrics_line(rnd: int, acc: float, with_global: bool) -> dict[str, Any]:
    return {
        "round": rnd,
        "wall_seconds": 1.5 * rnd,
        "local_steps": 160 * rnd,
        "bytes": {"up": 1000 * rnd, "down": 2000 * rnd},
        "personalized": _pers(acc, [acc - 0.05, acc, acc + 0.05]),
        "validation": {"loss": 1.0 - acc, "accuracy": acc},
        "generalization": {"accuracy": acc - 0.4, "macro_f1": acc - 0.5, "accuracy_std": 0.1},
        "global": {"accuracy": acc - 0.1, "macro_f1": acc - 0.12} if with_global else None,
        "rejected_replies": 0,
    }


def make_run(
    root: Path,
    name: str,
    algorithm: str,
    seed: int,
    final_acc: float,
    *,
    with_global: bool = True,
    with_summary: bool = True,
    rounds: int = 3,
    up_bytes: int = 2_500_000,
) -> Path:
    """Write a run directory shaped like the simulator's output."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text(f'algorithm = "{algorithm}"\nseed = {seed}\nrounds = {rounds}\n')
    accs = [final_acc - 0.1 * (rounds - r) for r in range(1, rounds + 1)]
    lines = [_metrics_line(r, a, with_global) for r, a in zip(range(1, rounds + 1), accs, strict=True)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if with_summary:
        last = lines[-1]
        summary = {
            "algorithm": algorithm,
            "dataset": "mnist",
            "seed": seed,
            "rounds": rounds,
            "model": "mlp",
            "partition": "dirichlet",
            "num_clients": 3,
            "personalized": last["personalized"],
            "generalization": last["generalization"],
            "global": last["global"],
            "selected_round": {
                "round": rounds - 1,
                "criterion": "validation_loss",
                "personalized": lines[-2]["personalized"],
                "generalization": lines[-2]["generalization"],
                "global": lines[-2]["global"],
            },
            "last_round": {
                "round": rounds,
                "personalized": last["personalized"],
                "generalization": last["generalization"],
                "global": last["global"],
            },
            "bytes": {"up": up_bytes, "down": 4_000, "up_by_key": {"params": up_bytes}, "down_by_key": {}},
            "wall_seconds": 41.2,
            "rejected_replies": 0,
        }
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _table_rows(markdown: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.strip().splitlines()]
    return [[c.strip() for c in row] for row in rows[2:]]


def _header(markdown: str) -> list[str]:
    return [c.strip() for c in markdown.strip().splitlines()[0].strip("|").split("|")]


def test_make_report_writes_pngs_and_table(tmp_path: Path) -> None:
    a = make_run(tmp_path / "runs", "a", "fedavg", 0, 0.9123)
    b = make_run(tmp_path / "runs", "b", "pfedme", 0, 0.85, with_global=False)
    out = tmp_path / "report"

    paths = make_report([a, str(b)], out)

    assert [p.name for p in paths] == ["accuracy_vs_round.png", "client_accuracy.png", "report.md"]
    for png in paths[:2]:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    md = paths[2].read_text()
    assert "](accuracy_vs_round.png)" in md and "](client_accuracy.png)" in md
    assert "91.23" in md  # weighted personalized accuracy of run a
    assert "| a | fedavg | mnist | dirichlet | 0 |" in md and "| b | pfedme | mnist | dirichlet | 0 |" in md
    assert "2.50 MB" in md and "4.00 KB" in md
    # One seed per algorithm: no aggregate section.
    assert "across seeds" not in md


def test_run_table_cells(tmp_path: Path) -> None:
    a = read_run(make_run(tmp_path, "a", "fedavg", 0, 0.9123))
    b = read_run(make_run(tmp_path, "b", "pfedme", 1, 0.85, with_global=False))
    table = runs_markdown_table([a, b])
    header = _header(table)
    rows = {r[1]: dict(zip(header, r, strict=True)) for r in _table_rows(table)}

    fa = rows["fedavg"]
    assert fa["Pers. acc (%)"] == "91.23"
    assert fa["Pers. unweighted (%)"] == "90.23"
    assert fa["Pers. std (%)"] == "5.00"
    assert fa["Pers. worst-10% (%)"] == "80.23"
    assert fa["Pers. macro-F1 (%)"] == "85.23"
    assert fa["Gen. acc (%)"] == "51.23"
    assert fa["Global acc (%)"] == "81.23"
    assert fa["Sel. round"] == "2"
    assert fa["Sel. pers. acc (%)"] == "81.23"
    assert fa["Up"] == "2.50 MB"
    assert fa["Wall (s)"] == "41.2"
    # No global model: blank cell rather than a crash or "None".
    assert rows["pfedme"]["Global acc (%)"] == "–"
    assert rows["pfedme"]["Seed"] == "1"


def test_pa_prototype_column_appears_only_when_a_run_scored_with_pa(tmp_path: Path) -> None:
    plain = read_run(make_run(tmp_path, "plain", "fedproto", 0, 0.8))
    assert "Pers. acc, PA prototypes (%)" not in _header(runs_markdown_table([plain]))
    with_pa = make_run(tmp_path, "pa", "fedproto", 1, 0.8)
    summary = json.loads((with_pa / "summary.json").read_text())
    summary["inference"] = {"prototype_pa": {"personalized_accuracy": 0.7654}}
    (with_pa / "summary.json").write_text(json.dumps(summary))
    table = runs_markdown_table([plain, read_run(with_pa)])
    header = _header(table)
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in _table_rows(table)}
    assert rows["pa"]["Pers. acc, PA prototypes (%)"] == "76.54"
    assert rows["plain"]["Pers. acc, PA prototypes (%)"] == "–"


def test_mean_std_across_seeds_matches_hand_computation(tmp_path: Path) -> None:
    fedavg = [
        read_run(make_run(tmp_path, "f0", "fedavg", 0, 0.90, up_bytes=1_000_000)),
        read_run(make_run(tmp_path, "f1", "fedavg", 1, 0.92, up_bytes=3_000_000)),
    ]
    single = [read_run(make_run(tmp_path, "d0", "ditto", 0, 0.8765, with_global=False))]
    markdown, csv_text = compare_tables({"fedavg": fedavg, "ditto": single})

    header = _header(markdown)
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in _table_rows(markdown)}
    # mean(0.90, 0.92) = 0.91; population std = 0.01.
    assert rows["fedavg"]["Pers. acc (%)"] == "91.00 ± 1.00"
    assert rows["fedavg"]["Seeds"] == "2"
    assert rows["fedavg"]["Up"] == "2.00 ± 1.00 MB"
    # A single seed has std 0 (ddof=0), not NaN.
    assert rows["ditto"]["Pers. acc (%)"] == "87.65 ± 0.00"
    assert rows["ditto"]["Global acc (%)"] == "–"

    parsed = {r["algorithm"]: r for r in csv.DictReader(io.StringIO(csv_text))}
    assert float(parsed["fedavg"]["pers_acc_pct_mean"]) == pytest.approx(91.0)
    assert float(parsed["fedavg"]["pers_acc_pct_std"]) == pytest.approx(1.0)
    assert float(parsed["fedavg"]["bytes_up_mean"]) == pytest.approx(2_000_000)
    assert parsed["ditto"]["global_acc_pct_mean"] == ""
    assert parsed["fedavg"]["seeds"] == "0 1"


def test_aggregate_seeds_on_plain_rows() -> None:
    rows = [
        {"algorithm": "x", "seed": 0, "pers_acc": 0.5, "global_acc": None},
        {"algorithm": "x", "seed": 1, "pers_acc": 0.7, "global_acc": 0.4},
        {"algorithm": "y", "seed": 0, "pers_acc": 0.6},
    ]
    agg = {a["algorithm"]: a for a in aggregate_seeds(rows)}
    assert agg["x"]["pers_acc_mean"] == pytest.approx(0.6)
    assert agg["x"]["pers_acc_std"] == pytest.approx(0.1)
    # Missing values are skipped, not treated as zero.
    assert agg["x"]["global_acc_mean"] == pytest.approx(0.4)
    assert agg["x"]["global_acc_std"] == 0.0
    assert agg["y"]["pers_acc_std"] == 0.0
    assert agg["y"]["global_acc_mean"] is None


def test_report_with_several_seeds_has_aggregate_section(tmp_path: Path) -> None:
    dirs = [make_run(tmp_path, f"s{s}", "fedavg", s, 0.90 + 0.02 * s) for s in range(2)]
    md = make_report(dirs, tmp_path / "out")[2].read_text()
    assert "Mean ± std across seeds" in md
    assert "91.00 ± 1.00" in md


def test_missing_directory_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        read_run(tmp_path / "nope")
    with pytest.raises(UserError):
        make_report([tmp_path / "nope"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_or_bad_metrics_is_user_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"metrics\.jsonl"):
        read_run(empty)

    run = make_run(tmp_path, "bad", "fedavg", 0, 0.9)
    (run / "metrics.jsonl").write_text('{"round": 1}\nnot json\n{"round": 3}\n')
    with pytest.raises(UserError, match="not valid JSON") as info:
        read_run(run)
    assert "\n" not in str(info.value)

    run2 = make_run(tmp_path, "badsummary", "fedavg", 0, 0.9)
    (run2 / "summary.json").write_text("{")
    with pytest.raises(UserError, match=r"summary\.json"):
        read_run(run2)


def test_interrupted_run_uses_last_metrics_line(tmp_path: Path, caplog) -> None:
    run = make_run(tmp_path, "cut", "fedavg", 3, 0.77, with_summary=False)
    # A crash mid-write leaves a torn final line; the earlier evaluations still count.
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 4, "personalized": {"accur')
    rec = read_run(run)
    assert "skipping the torn last line" in caplog.text and "metrics.jsonl:4" in caplog.text and "column" in caplog.text
    assert rec.interrupted
    assert rec.algorithm == "fedavg" and rec.seed == 3  # recovered from config.toml
    assert len(rec.metrics) == 3
    row = run_row(rec)
    assert row["pers_acc"] == pytest.approx(0.77)
    assert row["selected_round"] is None
    table = runs_markdown_table([rec])
    assert "77.00" in table and "3 (interrupted)" in table
    paths = make_report([run], tmp_path / "out")
    assert all(p.stat().st_size > 0 for p in paths)


def test_labels_disambiguate_same_algorithm_and_seed(tmp_path: Path) -> None:
    a = read_run(make_run(tmp_path, "lr0.1", "fedavg", 0, 0.9))
    b = read_run(make_run(tmp_path, "lr0.01", "fedavg", 0, 0.8))
    c = read_run(make_run(tmp_path, "other", "fedavg", 1, 0.8))
    assert run_label(a) == "fedavg (seed 0)"
    assert run_labels([a, b, c]) == ["fedavg (seed 0, lr0.1)", "fedavg (seed 0, lr0.01)", "fedavg (seed 1)"]


def test_report_does_not_import_torch() -> None:
    # Whatever the fedpal package itself loads is not ours to judge; fedpal.report must add no torch.
    src = Path(fedpal.report.__file__).resolve().parents[2]
    code = (
        "import sys, fedpal; before = 'torch' in sys.modules; import fedpal.report; "
        "sys.exit(1 if 'torch' in sys.modules and not before else 0)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


def test_report_refuses_runs_of_different_datasets_or_partitions(tmp_path: Path) -> None:
    import json as _json

    a = make_run(tmp_path, "a", "fedavg", 0, 0.9)
    b = make_run(tmp_path, "b", "fedavg", 1, 0.9)
    summary = _json.loads((b / "summary.json").read_text())
    (b / "summary.json").write_text(_json.dumps({**summary, "partition": "shards"}))
    with pytest.raises(UserError, match=r"not comparable.*partition dirichlet: a; partition shards: b"):
        make_report([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_diagnostic_panels_cover_every_logged_method_number(tmp_path: Path) -> None:
    from fedpal.report.plots import diagnostic_panels

    run = make_run(tmp_path, "ali", "fedali", 0, 0.8)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line["diagnostics"] = {"kmeans_iterations": 3.0, "kmeans_shift": 0.1, "global_norm_mean": 1.0}
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    panels = diagnostic_panels([read_run(run)])
    assert [p[0] for p in panels] == ["global_norm_mean", "kmeans_iterations", "kmeans_shift"]
    assert make_report([run], tmp_path / "out")  # draws them
    assert (tmp_path / "out" / "diagnostics_vs_round.png").exists()
