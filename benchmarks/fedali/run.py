"""Regenerate the FedAli benchmark on UCI HAPT: MAE pre-training per seed, every (method, seed) run, then the
markdown table, the CSV and the learning curves under benchmarks/fedali/results/.

    python benchmarks/fedali/run.py                 # all runs (skips those already finished), then the report
    python benchmarks/fedali/run.py --report-only   # only rebuild table and plots from existing runs

Runs go to runs/fedali/ (not committed); each is a normal fedpal run directory that `fedpal report` can read.
As in FedAli's code, two encoders are pre-trained per seed without labels: one with ALP layers (for FedAli) and
one plain HART (for the baselines), each on the training clients' training windows.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedpal.report.run_reader import RunRecord, get_path, read_run
from fedpal.report.tables import human_bytes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sweep import benchmark_parser, keep_finished, mean_curve, pct, run_config  # noqa: E402

CONFIG = HERE / "config.toml"
# name -> (algorithm, model, pre-trained encoder: "alp" | "plain" | None)
VARIANTS: dict[str, tuple[str, str, str | None]] = {
    "fedali": ("fedali", "hart_alp", "alp"),
    "fedali (no pre-training)": ("fedali", "hart_alp", None),
    "fedavg": ("fedavg", "hart", "plain"),
    "fedprox": ("fedprox", "hart", "plain"),
    "moon": ("moon", "hart", "plain"),
    "fedproto": ("fedproto", "hart", "plain"),
    "fedper": ("fedper", "hart", "plain"),
    "local": ("local", "hart", "plain"),
}
COLUMNS = (  # (header, path in summary.json)
    ("Pers. macro-F1", ("last_round", "personalized", "macro_f1")),
    ("Pers. acc", ("last_round", "personalized", "accuracy")),
    ("Gen. macro-F1 (all)", ("last_round", "generalization", "all", "macro_f1")),
    ("Gen. macro-F1 (others)", ("last_round", "generalization", "others", "macro_f1")),
    ("Global macro-F1", ("last_round", "global", "macro_f1")),
    ("Unseen macro-F1 (adapted)", ("unseen", "personalized", "macro_f1")),
    ("Unseen macro-F1 (zero-shot)", ("unseen", "zero_shot", "macro_f1")),
)


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "").replace("-", "")


def encoder_path(root: Path, kind: str, seed: int) -> Path:
    return root / "pretrained" / f"{kind}-seed{seed}.pt"


def pretrain(root: Path, kind: str, seed: int) -> float:
    """`fedpal pretrain` of one encoder for one seed (labels never read); kept if already there."""
    path = encoder_path(root, kind, seed)
    if path.exists():
        return 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    model = "hart_alp" if kind == "alp" else "hart"
    command = [sys.executable, "-m", "fedpal", "pretrain", str(CONFIG), "--out", str(path), "--quiet"]
    for item in (f"seed={seed}", f"pretrain.model={model}", f"model.name={model}"):
        command += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pretrain {path}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - started


def run_variant(root: Path, name: str, seed: int, extra: list[str]) -> float:
    algorithm, model, encoder = VARIANTS[name]
    overrides = [f"algorithm.name={algorithm}", f"model.name={model}", f"seed={seed}", "pretrain.method=none"]
    if encoder is not None:
        overrides.append(f"model.pretrained={encoder_path(root, encoder, seed)}")
    return run_config(CONFIG, root / slug(name) / f"seed{seed}", overrides + extra)


# ------------------------------------------------------------------------------------------------- report


def seed_stats(recs: list[RunRecord], path: tuple[str, ...]) -> tuple[float | None, float | None]:
    values = [v for v in (get_path(r.summary, *path) for r in recs) if isinstance(v, int | float)]
    return (mean(values), pstdev(values)) if values else (None, None)


def table(records: dict[str, list[RunRecord]]) -> list[str]:
    headers = ["Method", "Seeds", *(h for h, _ in COLUMNS), "Up / round", "Wall (min)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, recs in records.items():
        cells = [name, str(len(recs))]
        cells += [pct(*seed_stats(recs, path)) for _, path in COLUMNS]
        up = seed_stats(recs, ("bytes_per_round", "up"))[0]
        wall = seed_stats(recs, ("wall_seconds",))[0]
        cells += [human_bytes(up), "–" if wall is None else f"{wall / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_curves(records: dict[str, list[RunRecord]], path: Path) -> None:
    panels = (
        (("personalized", "macro_f1"), "personalization macro-F1"),
        (("generalization", "all", "macro_f1"), "generalization macro-F1 (pooled test, all clients)"),
        (("generalization", "others", "macro_f1"), "generalization macro-F1 (other clients)"),
    )
    fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, (name, recs) in enumerate(records.items()):
        for ax, (keys, title) in zip(axes, panels, strict=True):
            rounds, means, stds = mean_curve(recs, *keys)
            style = "-" if name.startswith("fedali") else "--"
            ax.plot(rounds, [100 * m for m in means], style, color=f"C{i}", label=name)
            low = [100 * (m - s) for m, s in zip(means, stds, strict=True)]
            high = [100 * (m + s) for m, s in zip(means, stds, strict=True)]
            ax.fill_between(rounds, low, high, color=f"C{i}", alpha=0.12)
            ax.set_title(title)
            ax.set_xlabel("round")
            ax.set_ylabel("macro-F1 (%)")
            ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def csv_rows(records: dict[str, list[RunRecord]]) -> list[str]:
    lines = ["method,seed," + ",".join(slug(h).lower() for h, _ in COLUMNS) + ",bytes_up_per_round,wall_seconds"]
    for name, recs in records.items():
        for rec in recs:
            values = [get_path(rec.summary, *p) for _, p in COLUMNS]
            values += [get_path(rec.summary, "bytes_per_round", "up"), rec.summary.get("wall_seconds")]
            cells = ["" if not isinstance(v, int | float) else f"{v:.6g}" for v in values]
            lines.append(",".join([name, str(rec.summary.get("seed")), *cells]))
    return lines


def report(root: Path, out: Path, seeds: list[int], elapsed: float | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, list[RunRecord]] = {}
    for name in VARIANTS:
        for seed in seeds:
            path = root / slug(name) / f"seed{seed}"
            if (path / "summary.json").exists():
                records.setdefault(name, []).append(read_run(path))
    (out / "results.csv").write_text("\n".join(csv_rows(records)) + "\n")
    first = next(iter(records.values()))[0].summary if records else {}
    parts = [
        "# FedAli benchmark results (UCI HAPT)",
        "",
        "Generated by `python benchmarks/fedali/run.py` from runs in `runs/fedali/`; protocol in "
        "`benchmarks/fedali/config.toml` and `benchmarks/fedali/README.md`. Last round "
        f"({first.get('rounds', '?')}), mean ± std over seeds {', '.join(map(str, seeds))} of the per-seed value "
        "(itself a mean over clients). Personalization: each client's personalized model (for every method, the "
        "model right after its local training, as in FedAli's code) on its own test split. Generalization: the "
        "same model on the pooled test data of all training clients (FedAli's definition, 'all') or of the other "
        "clients ('others'). Global: the server model on the pooled test data. Unseen: 6 users never seen in "
        "training; 'adapted' = the method's own local update from the final server state on the user's training "
        "split, then its personalized model; 'zero-shot' = the global model as is. Up / round is the total over "
        "the 24 training clients.",
        "",
    ]
    previous = out / "README.md"
    if elapsed is not None:
        parts += [f"Wall time of the last regeneration: {elapsed / 60:.1f} min (2 runs in parallel).", ""]
    elif previous.exists():
        kept = [line for line in previous.read_text().splitlines() if line.startswith("Wall time")]
        parts += [*kept[:1], ""]
    parts += [*table(records), ""]
    if records:
        plot_curves(records, out / "learning_curves.png")
        parts += ["![learning curves](learning_curves.png)", ""]
    (out / "README.md").write_text("\n".join(parts))
    print("\n".join(parts))


def main() -> int:
    parser = benchmark_parser(__doc__, "runs/fedali", HERE / "results")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    args = parser.parse_args()
    keep_finished(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    root = Path(args.runs)
    elapsed = None
    if not args.report_only:
        started = time.perf_counter()
        encoders = sorted({VARIANTS[v][2] for v in variants} - {None})
        with ThreadPoolExecutor(args.jobs) as pool:
            pre = [(kind, seed) for seed in seeds for kind in encoders if kind is not None]
            for (kind, seed), seconds in zip(pre, pool.map(lambda job: pretrain(root, *job), pre), strict=True):
                print(f"pretrain {kind}/seed{seed}: {seconds:.1f} s", flush=True)
            jobs: list[tuple[str, int]] = [(v, s) for s in seeds for v in variants]
            futures: list[Any] = [pool.submit(run_variant, root, v, s, args.set) for v, s in jobs]
            for (v, s), future in zip(jobs, futures, strict=True):
                print(f"{v}/seed{s}: {future.result():.1f} s", flush=True)
        elapsed = time.perf_counter() - started
    report(root, Path(args.out), seeds, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
