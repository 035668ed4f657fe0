"""Regenerate the heterogeneous-model (HtFL) benchmark: every (dataset, alpha, algorithm, seed) run, then the
markdown table, the CSV and the plots under benchmarks/htfl/results/.

    python benchmarks/htfl/run.py                 # all runs (skips those already finished), then the report
    python benchmarks/htfl/run.py --report-only   # only rebuild table and plots from existing runs

Runs go to runs/htfl/ (not committed); each is a normal fedpal run directory that `fedpal report` can read.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedpal.report.run_reader import RunRecord, read_run
from fedpal.report.tables import aggregate_seeds, human_bytes, run_row

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sweep import Job, benchmark_parser, keep_finished, mean_curve, pct, run_config, run_jobs  # noqa: E402

CONFIG = HERE / "config.toml"
SETTINGS = (("mnist", 0.1), ("mnist", 0.5), ("fashion_mnist", 0.1), ("fashion_mnist", 0.5))
ALGORITHMS = ("local", "fedproto", "fedtgp", "protonorm", "lg_fedavg", "feddistill", "fml", "fedkd", "fedgh")
PROTOTYPE_METHODS = ("fedproto", "fedtgp", "protonorm")


def run_dir(root: Path, dataset: str, alpha: float, algorithm: str, seed: int) -> Path:
    return root / f"{dataset}-a{alpha}" / algorithm / f"seed{seed}"


def run_one(path: Path, dataset: str, alpha: float, algorithm: str, seed: int, extra: list[str]) -> float:
    """One run of the grid in its own process (one torch thread); finished runs are kept."""
    overrides = [f"data.dataset={dataset}", f"data.alpha={alpha}", f"algorithm.name={algorithm}", f"seed={seed}"]
    return run_config(CONFIG, path, overrides + extra)


# ------------------------------------------------------------------------------------------------- report


def table(records: dict[str, list[RunRecord]]) -> tuple[list[str], list[dict[str, Any]]]:
    rows = []
    for algorithm in ALGORITHMS:
        recs = records.get(algorithm, [])
        if not recs:
            continue
        agg = aggregate_seeds([{**run_row(r), "algorithm": algorithm} for r in recs])[0]
        agg["rejected"] = [int(r.summary.get("rejected_replies") or 0) for r in recs]
        rows.append(agg)
    lines = [
        "| Algorithm | Seeds | Pers. acc (%) | Pers. unweighted (%) | Gen. acc (%) | Pers. acc, head (%) "
        "| Up / round | Down / round | Rejected replies |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for agg in rows:
        head = pct(agg["head_acc_mean"], agg["head_acc_std"]) if agg["algorithm"] in PROTOTYPE_METHODS else "="
        up, down = agg["bytes_up_per_round_mean"], agg["bytes_down_per_round_mean"]
        lines.append(
            f"| {agg['algorithm']} | {agg['n_runs']} | {pct(agg['pers_acc_mean'], agg['pers_acc_std'])} "
            f"| {pct(agg['pers_acc_unweighted_mean'], agg['pers_acc_unweighted_std'])} "
            f"| {pct(agg['gen_acc_mean'], agg['gen_acc_std'])} | {head} "
            f"| {human_bytes(up)} | {human_bytes(down)} | {' / '.join(map(str, agg['rejected']))} |"
        )
    return lines, rows


def plot_curves(all_records: dict[tuple[str, float], dict[str, list[RunRecord]]], path: Path) -> None:
    settings = list(all_records)
    fig = Figure(figsize=(5 * len(settings), 8), layout="constrained")
    axes = fig.subplots(2, len(settings), squeeze=False)
    for col, setting in enumerate(settings):
        for i, algorithm in enumerate(ALGORITHMS):
            recs = all_records[setting].get(algorithm)
            if not recs:
                continue
            for row, keys in enumerate((("personalized", "accuracy"), ("generalization", "accuracy"))):
                rounds, mean, std = mean_curve(recs, *keys)
                ax = axes[row][col]
                style = "-" if algorithm in PROTOTYPE_METHODS else "--"
                ax.plot(rounds, [100 * m for m in mean], style, color=f"C{i}", label=algorithm)
                low = [100 * (m - s) for m, s in zip(mean, std, strict=True)]
                high = [100 * (m + s) for m, s in zip(mean, std, strict=True)]
                ax.fill_between(rounds, low, high, color=f"C{i}", alpha=0.15)
        dataset, alpha = setting
        axes[0][col].set_title(f"{dataset}, Dir({alpha}): personalized")
        axes[1][col].set_title(f"{dataset}, Dir({alpha}): generalization")
        for row in (0, 1):
            axes[row][col].set_xlabel("round")
            axes[row][col].set_ylabel("accuracy (%)")
            axes[row][col].grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="small")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def plot_prototype_diagnostics(all_records: dict[tuple[str, float], dict[str, list[RunRecord]]], path: Path) -> None:
    panels = (
        ("global_angle_min_deg", "min pairwise angle of global prototypes (deg)"),
        ("global_norm_mean", "mean norm of global prototypes"),
        ("aggregated_norm", "mean norm of averaged client prototypes"),
        ("feature_target_distance", "mean ||r - s P_y|| (client train data)"),
    )
    settings = list(all_records)
    fig = Figure(figsize=(5 * len(settings), 3.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), len(settings), squeeze=False)
    for col, setting in enumerate(settings):
        for algorithm in PROTOTYPE_METHODS:
            recs = all_records[setting].get(algorithm)
            if not recs:
                continue
            for row, (key, title) in enumerate(panels):
                rounds, mean, _ = mean_curve(recs, "diagnostics", key)
                axes[row][col].plot(rounds, mean, color=f"C{ALGORITHMS.index(algorithm)}", label=algorithm)
                axes[row][col].set_title(f"{setting[0]}, Dir({setting[1]}): {title}", fontsize="small")
                axes[row][col].grid(True, alpha=0.3)
                if key in ("global_norm_mean", "aggregated_norm", "feature_target_distance"):
                    axes[row][col].set_yscale("log")
    axes[0][0].legend(fontsize="small")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def report(root: Path, out: Path, seeds: list[int], elapsed: float | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    all_records: dict[tuple[str, float], dict[str, list[RunRecord]]] = {}
    csv_lines = [
        "dataset,alpha,algorithm,seed,pers_acc,pers_acc_unweighted,gen_acc,head_acc,proto_acc,"
        "bytes_up_per_round,bytes_down_per_round,rounds,wall_seconds"
    ]
    for dataset, alpha in SETTINGS:
        by_algorithm: dict[str, list[RunRecord]] = {}
        for algorithm in ALGORITHMS:
            for seed in seeds:
                path = run_dir(root, dataset, alpha, algorithm, seed)
                if (path / "summary.json").exists():
                    rec = read_run(path)
                    by_algorithm.setdefault(algorithm, []).append(rec)
                    row = run_row(rec)
                    values = [
                        row[k]
                        for k in (
                            "pers_acc",
                            "pers_acc_unweighted",
                            "gen_acc",
                            "head_acc",
                            "proto_acc",
                            "bytes_up_per_round",
                            "bytes_down_per_round",
                        )
                    ]
                    cells = ["" if v is None else f"{v:.6g}" for v in values]
                    csv_lines.append(
                        ",".join(
                            [
                                dataset,
                                str(alpha),
                                algorithm,
                                str(seed),
                                *cells,
                                str(row["rounds"]),
                                f"{rec.summary['wall_seconds']:.1f}",
                            ]
                        )
                    )
        if by_algorithm:
            all_records[(dataset, alpha)] = by_algorithm
    (out / "results.csv").write_text("\n".join(csv_lines) + "\n")
    parts = [
        "# HtFL benchmark results",
        "",
        "Generated by `python benchmarks/htfl/run.py` from runs in `runs/htfl/`; protocol in "
        "`benchmarks/htfl/config.toml` and `benchmarks/htfl/README.md`. Last-round numbers, mean ± std over seeds "
        f"{', '.join(map(str, seeds))}. Personalized accuracy is the primary prediction (nearest global prototype "
        "for FedProto, FedTGP and ProtoNorm; the personal model otherwise), sample-weighted and unweighted over "
        "clients; generalization is each client's model on a class-stratified sample of the other clients' test "
        "data. 'Pers. acc, head' is the prototype methods' personal head on the same data ('=' where the head is "
        "the prediction). Bytes are totals over all 20 clients per round. 'Rejected replies' counts, per seed, the "
        "client replies the engine refused over the whole run because they held NaN/Inf (a client whose training "
        "diverged keeps its last finite model).",
        "",
    ]
    previous = out / "README.md"
    if elapsed is not None:
        parts += [f"Wall time of the last regeneration: {elapsed / 60:.1f} min (2 runs in parallel).", ""]
    elif previous.exists():  # a report-only rebuild keeps the time the runs took
        kept = [line for line in previous.read_text().splitlines() if line.startswith("Wall time")]
        parts += [*kept[:1], ""]
    for (dataset, alpha), by_algorithm in all_records.items():
        lines, _ = table(by_algorithm)
        rounds = by_algorithm[next(iter(by_algorithm))][0].summary.get("rounds")
        parts += [f"## {dataset}, Dirichlet alpha = {alpha}, {rounds} rounds", "", *lines, ""]
    if all_records:
        plot_curves(all_records, out / "accuracy_vs_round.png")
        plot_prototype_diagnostics(all_records, out / "prototype_diagnostics.png")
        parts += [
            "![accuracy vs round](accuracy_vs_round.png)",
            "",
            "![prototype diagnostics](prototype_diagnostics.png)",
            "",
        ]
    (out / "README.md").write_text("\n".join(parts))
    print("\n".join(parts))


def main() -> int:
    parser = benchmark_parser(__doc__, "runs/htfl", HERE / "results")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--settings", default="all", help="e.g. mnist:0.1,fashion_mnist:0.1 (default all four)")
    args = parser.parse_args()
    keep_finished(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    algorithms = args.algorithms.split(",")
    settings = (
        SETTINGS
        if args.settings == "all"
        else tuple((item.split(":")[0], float(item.split(":")[1])) for item in args.settings.split(","))
    )
    root = Path(args.runs)
    elapsed, failures = None, []
    if not args.report_only:
        jobs = [(d, a, alg, s) for d, a in settings for s in seeds for alg in algorithms]
        started = time.perf_counter()
        failures = run_jobs(
            [
                Job("/".join(map(str, job)), lambda job=job: run_one(run_dir(root, *job), *job, args.set))
                for job in jobs
            ],
            args.jobs,
        )
        elapsed = time.perf_counter() - started
    report(root, Path(args.out), seeds, elapsed)
    if failures:
        print(f"{len(failures)} runs failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
