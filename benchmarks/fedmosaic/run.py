"""Regenerate the FedMosaic benchmark: pre-train the two frozen trunks once on public data, tune every method on
validation data, run the tuned methods and the ablations over paired seeds in both regimes and both size scenarios,
then write the tables, the intervals and the plots to benchmarks/fedmosaic/results/.

    python benchmarks/fedmosaic/run.py                  # everything (finished runs are kept), then the report
    python benchmarks/fedmosaic/run.py --report-only    # only rebuild the results from existing runs
    python benchmarks/fedmosaic/run.py --plan           # the runs it would start, nothing else
    python benchmarks/fedmosaic/run.py --settings dynamic_mixed --methods fedmosaic,sft --seeds 0   # a part

Questions (the issue's): does FedMosaic beat the baselines on Others (other clients' tasks) while staying
competitive on Self (its own tasks met so far)? Does relevance recover the true task overlap? Does cross-architecture
sharing (Co-LoRA) help the mixed-size scenario?

Protocol (DESIGN §8): every method gets the same tuning grid, a learning-rate multiplier of 1 or 3 on both adapter
learning rates (spec CPU scale 2.5e-3 for P, Q and 1e-3 for A, B and the gate; the baselines, plain LoRA as in the
official code, use only the second), chosen by the validation accuracy of one run with a tuning seed (100) that the
reported seeds never use, on `dynamic_small`; the ablations run at FedMosaic's choice. Every method takes the same 40
AdamW steps a round from the same replay store (Ditto: two passes of 20; FedDPA: 20 steps of its global adapter, then
20 of its local one). A run that rejected a reply or ended with a non-finite validation loss counts as diverged. Runs
go to runs/fedmosaic/ (not committed); each is a normal fedpal run directory.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, pstdev

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from fedpal.config import load_config, read_toml
from fedpal.data.federated import build_federated_data
from fedpal.data.task_stream import CLIENT_TASKS, TASKS, task_overlap
from fedpal.evaluation.evaluator import Evaluator
from fedpal.report.run_reader import RunRecord, get_path, read_run
from fedpal.report.tables import human_bytes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from protocol import Candidate, best_candidate, diverged, format_interval, paired_interval  # noqa: E402
from sweep import (  # noqa: E402
    Job,
    benchmark_parser,
    finished_runs,
    keep_finished,
    pct,
    pretrain_config,
    run_config,
    run_jobs,
)

CONFIG = HERE / "config.toml"
TUNE_SEED = 100
TUNE_ON = "dynamic_small"  # the cheapest setting; the others reuse its choices
MIXED = ("model.family=mosaic",)
SETTINGS: dict[str, tuple[str, ...]] = {
    "dynamic_small": ("data.task_regime=dynamic",),
    "dynamic_mixed": ("data.task_regime=dynamic", *MIXED),
    "static_small": ("data.task_regime=static",),
    "static_mixed": ("data.task_regime=static", *MIXED),
}
BASELINES = ("sft", "fedavg_lora", "ditto_lora", "feddpa")
METHODS = ("fedmosaic", *BASELINES)
# ablations: FedMosaic at its tuned values with one part taken out; the last two only differ in mixed-size runs
ABLATIONS: dict[str, tuple[str, ...]] = {
    "fedmosaic_no_rela": ("algorithm.name=fedmosaic", "algorithm.relevance=uniform"),
    # not an ablation but a variant: every step's signature, each at unit norm (docs/methods/fedmosaic.md)
    "fedmosaic_unit_signature": (
        "algorithm.name=fedmosaic",
        "algorithm.signature_scale=unit",
        "algorithm.signature_every=1",
    ),
    # a control for RELA: at the official tau 0.5 the weights stay near uniform (0.08-0.16 for 9 peers), so the
    # unit signatures again, with a sharp softmax that puts most weight on the closest peers
    "fedmosaic_sharp_relevance": (
        "algorithm.name=fedmosaic",
        "algorithm.signature_scale=unit",
        "algorithm.signature_every=1",
        "algorithm.tau=0.1",
    ),
    # a control for fedpal's default uniform replay: the official count-based priority sampler (data.task_replay)
    "fedmosaic_priority_replay": ("algorithm.name=fedmosaic", "data.task_replay=priority"),
    "fedmosaic_no_colora": ("algorithm.name=fedmosaic", "algorithm.cross_architecture=false"),
    "fedmosaic_random_ab": ("algorithm.name=fedmosaic", "model.adapter_init=random"),
}
MIXED_ONLY = ("fedmosaic_no_colora", "fedmosaic_random_ab")
# the regime the claim is about; the budget leaves the static one
DYNAMIC_ONLY = ("fedmosaic_sharp_relevance", "fedmosaic_priority_replay")
LR_SCALES = (1.0, 3.0)
BASE_LR = {"algorithm.lr_pq": 2.5e-3, "algorithm.lr_ab": 1e-3}
PRETRAIN_EPOCHS = 10


def candidates() -> list[Candidate]:
    """The same two points for every method: both adapter learning rates times 1 or 3."""
    return [
        Candidate(f"lr x{scale:g}", tuple(f"{key}={value * scale:g}" for key, value in BASE_LR.items()))
        for scale in LR_SCALES
    ]


def methods_of(setting: str) -> list[str]:
    ablations = [
        a
        for a in ABLATIONS
        if (setting.endswith("_mixed") or a not in MIXED_ONLY)
        and (setting.startswith("dynamic") or a not in DYNAMIC_ONLY)
    ]
    return [*METHODS, *ablations]


def run_path(root: Path, setting: str, method: str, label: str) -> Path:
    return root / setting / method / label.replace(" ", "_")


def pretrained(root: Path) -> Path:
    return root / "pretrained" / "pretrained_{arch}.pt"


def pretrain(root: Path, epochs: int, extra: list[str]) -> None:
    """Both trunks, once, on the task stream's public data (seed 0): the frozen backbones every run shares
    (``extra``: the runs' own overrides, so the public blocks are the ones their data leave out)."""
    for arch in ("mosaic_small", "mosaic_large"):
        path = Path(str(pretrained(root)).replace("{arch}", arch))
        items = ["pretrain.method=multitask", f"pretrain.model={arch}", f"pretrain.epochs={epochs}", *extra]
        print(f"pre-training {arch}: {pretrain_config(CONFIG, path, items):.1f} s -> {path}", flush=True)


def launch(root: Path, setting: str, method: str, label: str, overrides: list[str]) -> float:
    name = ABLATIONS.get(method, (f"algorithm.name={method}",))
    pre = f"model.pretrained={pretrained(root)}"
    return run_config(CONFIG, run_path(root, setting, method, label), [*SETTINGS[setting], pre, *name, *overrides])


def chosen(root: Path, method: str) -> Candidate | None:
    """The grid point with the best validation score of the tuning runs (all finished), for a method or, for an
    ablation, FedMosaic's."""
    method = "fedmosaic" if method in ABLATIONS else method
    return best_candidate([(c, run_path(root, TUNE_ON, method, f"tune {c.label}")) for c in candidates()])


# ------------------------------------------------------------------------------------------------ the measures


def task_mean(
    row: list[float | None], tasks: list[int] | tuple[int, ...], counts: Sequence[float] | None = None
) -> float:
    """The mean accuracy over ``tasks`` (those scored): each task once, or weighted by its sample ``counts``."""
    scored = [k for k in tasks if row[k] is not None]
    weights = [1.0 if counts is None else float(counts[k]) for k in scored]
    if not scored or sum(weights) == 0:
        return math.nan
    return float(np.average([row[k] for k in scored], weights=weights))


@dataclass(frozen=True)
class TaskCounts:
    """Test samples per task: of each client's own test split (client x task) and of the generalization pool."""

    own: np.ndarray
    pool: np.ndarray


def task_counts(config_file: Path) -> TaskCounts:
    """The sample counts behind a run's per-task accuracies, rebuilt from its config (the federation and the
    evaluator's pool are functions of its data and eval sections and its seed), for the sample-weighted Self and
    Others (spec §6); once per distinct data."""
    raw = read_toml(config_file)
    key = json.dumps([raw.get("data"), raw.get("eval"), raw.get("seed")], sort_keys=True)
    if key not in COUNTS:
        COUNTS[key] = counts_of_data(config_file)
    return COUNTS[key]


COUNTS: dict[str, TaskCounts] = {}


def counts_of_data(config_file: Path) -> TaskCounts:
    cfg = load_config(config_file)
    data = build_federated_data(cfg.data, cfg.seed)
    tasks = np.asarray(data.label_tasks)
    size = len(TASKS)
    own = np.stack([np.bincount(tasks[c.test_y.numpy()], minlength=size) for c in data.clients])
    pool = np.bincount(tasks[Evaluator(data, cfg.eval, cfg.seed).gen_y], minlength=size)
    return TaskCounts(own, pool)


def self_and_others(entry: dict, counts: TaskCounts | None = None) -> tuple[float, float]:
    """Self: each client's mean accuracy over the tasks it has met so far (own test data); Others: over the tasks it
    does not hold (the generalization pool); each task counts once (or, given ``counts``, as many times as it has
    samples), then the mean over clients."""
    own, sample, seen = entry["tasks"]["own"], entry["tasks"]["sample"], entry["tasks_seen"]
    selfs = [task_mean(own[i], seen[i], None if counts is None else counts.own[i]) for i in range(len(own))]
    others = [
        task_mean(
            sample[i],
            [k for k in range(len(TASKS)) if k not in CLIENT_TASKS[i]],
            None if counts is None else counts.pool,
        )
        for i in range(len(sample))
    ]
    return float(np.nanmean(selfs)), float(np.nanmean(others))


def evaluations(record: RunRecord) -> list[dict]:
    return [m for m in record.metrics if isinstance(m.get("tasks"), dict) and m.get("tasks_seen")]


def measures(record: RunRecord) -> dict[str, float]:
    """Self and Others at the last evaluation and averaged over all evaluations (the anytime mean), and forgetting:
    for each client and each of its tasks but the last met, the best accuracy on it after it was met minus the last."""
    entries = evaluations(record)
    if not entries:
        return {}
    pairs = [self_and_others(e) for e in entries]
    weighted = self_and_others(entries[-1], task_counts(record.path / "config.toml"))
    drops = []
    for i, tasks in enumerate(CLIENT_TASKS):
        for k in tasks[:-1]:
            history = [e["tasks"]["own"][i][k] for e in entries if k in e["tasks_seen"][i]]
            history = [h for h in history if h is not None]
            if len(history) >= 2:
                drops.append(max(history[:-1]) - history[-1])
    return {
        "self_last": pairs[-1][0],
        "others_last": pairs[-1][1],
        "self_mean": float(np.mean([p[0] for p in pairs])),
        "others_mean": float(np.mean([p[1] for p in pairs])),
        "self_last_samples": weighted[0],
        "others_last_samples": weighted[1],
        "forgetting": float(np.mean(drops)) if drops else math.nan,
    }


def relevance_match(record: RunRecord) -> tuple[float, float, float, float]:
    """Spearman correlation of the last relevance matrix with the true task overlap over client pairs, the share of
    clients whose highest-weighted peer is their partner (the client sharing two tasks), and the mean over clients of
    the largest and the smallest weight given to a peer (how far the weighting is from uniform)."""
    entry = next((m for m in reversed(record.metrics) if isinstance(m.get("matrices"), dict)), None)
    if entry is None or "relevance" not in entry["matrices"]:
        return math.nan, math.nan, math.nan, math.nan
    relevance = np.asarray(entry["matrices"]["relevance"], dtype=float)
    weights = np.asarray(entry["matrices"]["weights"], dtype=float)
    n = relevance.shape[0]
    overlap = overlap_matrix(n)
    upper = np.triu_indices(n, k=1)
    rho = float(spearmanr(relevance[upper], overlap[upper]).statistic)
    partners = np.array([int(np.argmax(np.where(np.arange(n) == i, -np.inf, overlap[i]))) for i in range(n)])
    peers = np.where(np.eye(n, dtype=bool), np.nan, weights)
    largest, smallest = float(np.nanmean(np.nanmax(peers, axis=1))), float(np.nanmean(np.nanmin(peers, axis=1)))
    return rho, float(np.mean(weights.argmax(axis=1) == partners)), largest, smallest


def overlap_matrix(n: int) -> np.ndarray:
    """The stream's ground truth (shared tasks + 0.5 per shared source), from the scenario alone."""
    from types import SimpleNamespace

    stream = SimpleNamespace(
        dataset="task_stream",
        client_tasks=[list(t) for t in CLIENT_TASKS[:n]],
        task_sources=tuple(task.source for task in TASKS),
    )
    return task_overlap(stream)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ report

COLUMNS = (
    ("Self (last)", "self_last"),
    ("Others (last)", "others_last"),
    ("Self (anytime)", "self_mean"),
    ("Others (anytime)", "others_mean"),
    ("Self (last, per sample)", "self_last_samples"),
    ("Others (last, per sample)", "others_last_samples"),
    ("Forgetting", "forgetting"),
)


def records_of(root: Path, setting: str, method: str, seeds: list[int]) -> list[RunRecord]:
    return finished_runs(run_path(root, setting, method, f"seed{seed}") for seed in seeds)


def setting_report(root: Path, setting: str, seeds: list[int], out: Path) -> list[str]:
    lines = [f"### {setting}", ""]
    header = ["Method", "Tuned", "Seeds", *(h for h, _ in COLUMNS), "Up / round", "Down / round", "s / run", "Diverged"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    found: dict[str, list[RunRecord]] = {}
    scores: dict[str, dict[int, dict[str, float]]] = {}
    for method in methods_of(setting):
        recs = records_of(root, setting, method, seeds)
        if not recs:
            continue
        found[method] = recs
        healthy = [r for r in recs if not diverged(r)]
        scores[method] = {int(r.summary["seed"]): measures(r) for r in healthy}
        pick = chosen(root, method)
        cells = [method, pick.label if pick else "?", str(len(recs))]
        for _, key in COLUMNS:
            values = [s[key] for s in scores[method].values() if not math.isnan(s.get(key, math.nan))]
            cells.append(pct(mean(values), pstdev(values)) if values else "–")
        up = mean(float(get_path(r.summary, "bytes_per_round", "up") or 0) for r in recs)
        down = mean(float(get_path(r.summary, "bytes_per_round", "down") or 0) for r in recs)
        wall = mean(float(r.summary.get("wall_seconds") or 0) for r in recs)
        cells += [human_bytes(up), human_bytes(down), f"{wall:.0f}", str(len(recs) - len(healthy))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if "fedmosaic" in scores:
        lines += paired_lines(scores, seeds)
        lines += relevance_lines(found)
        relevance_plot(found["fedmosaic"][0], out / f"relevance_{setting}.png", setting)
        lines += [f"![relevance, {setting}](relevance_{setting}.png)", ""]
    curves(found, out / f"curves_{setting}.png", setting)
    lines += [f"![Self, Others and the first task over rounds, {setting}](curves_{setting}.png)", ""]
    return lines


def relevance_lines(found: dict[str, list[RunRecord]]) -> list[str]:
    """How well each relevance-weighted method's last relevance matrix matches the true task overlap, and how far
    its weights are from uniform."""
    n = len(CLIENT_TASKS)
    lines = [
        "Relevance against the true task overlap (last round; mean ± std over seeds; chance for the partner share "
        f"{100 / (n - 1):.0f} %, uniform weight {1 / (n - 1):.3f}):",
        "",
        "| Method | Spearman (client pairs) | Top peer = partner | Largest peer weight | Smallest peer weight |",
        "|---|---|---|---|---|",
    ]
    for method in ("fedmosaic", "fedmosaic_unit_signature", "fedmosaic_sharp_relevance"):
        if method not in found:
            continue
        rho, partner, largest, smallest = zip(*(relevance_match(r) for r in found[method]), strict=True)
        lines.append(
            f"| {method} | {mean(rho):.2f} ± {pstdev(rho):.2f} | {100 * mean(partner):.0f} ± "
            f"{100 * pstdev(partner):.0f} % | {mean(largest):.3f} | {mean(smallest):.3f} |"
        )
    return [*lines, ""]


def paired_lines(scores: dict[str, dict[int, dict[str, float]]], seeds: list[int]) -> list[str]:
    """FedMosaic minus each other method on Self and Others (last round), per seed, with bootstrap 95 % intervals."""
    lines = [
        "| FedMosaic − | Self (last) | Others (last) | seeds |",
        "|---|---|---|---|",
    ]
    mine = scores["fedmosaic"]
    for rival, theirs in scores.items():
        if rival == "fedmosaic":
            continue
        common = [s for s in seeds if s in mine and s in theirs]
        cells = []
        for key in ("self_last", "others_last"):
            diffs = [mine[s][key] - theirs[s][key] for s in common]
            cells.append(format_interval(*paired_interval(diffs)))
        lines.append(f"| {rival} | {cells[0]} | {cells[1]} | {len(common)} |")
    return [*lines, ""]


def relevance_plot(record: RunRecord, path: Path, setting: str) -> None:
    entry = next(m for m in reversed(record.metrics) if isinstance(m.get("matrices"), dict))
    relevance = np.asarray(entry["matrices"]["relevance"], dtype=float)
    overlap = overlap_matrix(relevance.shape[0])
    fig = Figure(figsize=(9, 4), layout="constrained")
    for ax, matrix, title in zip(
        fig.subplots(1, 2), (relevance, overlap), ("relevance S", "true overlap"), strict=True
    ):
        shown = matrix.copy()
        np.fill_diagonal(shown, np.nan)
        image = ax.imshow(shown, cmap="viridis")
        ax.set_title(f"{title} ({setting}, seed {record.summary.get('seed')})")
        ax.set_xlabel("client j")
        ax.set_ylabel("client i")
        fig.colorbar(image, ax=ax, shrink=0.8)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=90)


def curves(found: dict[str, list[RunRecord]], path: Path, setting: str) -> None:
    """Self, Others and the accuracy on each client's first task over rounds (forgetting shows as its decline)."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    for i, (method, recs) in enumerate(found.items()):
        series: dict[str, list[list[float]]] = {"self": [], "others": [], "first": []}
        rounds: list[int] = []
        for record in recs:
            entries = evaluations(record)
            rounds = [int(e["round"]) for e in entries]
            pairs = [self_and_others(e) for e in entries]
            series["self"].append([p[0] for p in pairs])
            series["others"].append([p[1] for p in pairs])
            series["first"].append(
                [
                    float(np.nanmean([task_mean(e["tasks"]["own"][c], t[:1]) for c, t in enumerate(CLIENT_TASKS)]))
                    for e in entries
                ]
            )
        style = dict(color=f"C{i % 10}", lw=2.2 if method == "fedmosaic" else 1.1)
        for ax, key in zip(axes, ("self", "others", "first"), strict=True):
            ax.plot(rounds, 100 * np.nanmean(np.array(series[key]), axis=0), label=method, **style)
    for ax, title in zip(axes, ("Self (tasks met so far)", "Others", "each client's first task"), strict=True):
        ax.set_title(f"{title}, {setting}")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=90)


def report(root: Path, settings: list[str], seeds: list[int], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    total = sum(float(read_run(p.parent).summary.get("wall_seconds") or 0) for p in root.glob("*/*/*/summary.json"))
    parts = [
        "# FedMosaic benchmark results",
        "",
        "Generated by `python benchmarks/fedmosaic/run.py` (protocol in its docstring and README.md). Mean ± std over "
        "the seeds that finished. Self: each client's mean accuracy over the tasks it has met so far (its own test "
        "data); Others: over the tasks it does not hold (a 1,000-sample pool of all clients' test data); every task "
        "counts once, then the mean over clients; last round and the mean over all rounds (anytime); the per-sample "
        "columns weigh each task by its test samples instead (spec §6: the official scoring counts tasks). Forgetting: "
        "best accuracy on an earlier task after it was met minus the last (dynamic regime; in the static regime every "
        "task is met from the start). Bytes are totals over all clients per round.",
        "",
        f"All runs together, tuning included: {total / 3600:.1f} hours of one core.",
        "",
    ]
    for setting in settings:
        parts += setting_report(root, setting, seeds, out)
    (out / "README.md").write_text("\n".join(parts))
    picks = {m: (c.label if (c := chosen(root, m)) else None) for m in METHODS}
    (out / "chosen.json").write_text(json.dumps(picks, indent=1) + "\n")
    print("\n".join(parts))


def run_all(
    root: Path, tune_jobs: list[tuple[str, Candidate]], jobs: list[tuple[str, str, int]], workers: int, extra: list[str]
) -> list[str]:
    """The tuning runs, and each method's seeded runs as soon as its tuning finished (FedMosaic's tuning unlocks its
    ablations too); returns the failures."""

    def run(setting: str, method: str, label: str, overrides: list[str], stage: str | None = None) -> Job:
        return Job(f"{setting}/{method}/{label}", lambda: launch(root, setting, method, label, overrides), stage)

    def seeded(tuned: Hashable) -> list[Job]:
        found = []
        for s, m, seed in jobs:
            if m == tuned or (tuned == "fedmosaic" and m in ABLATIONS):
                pick = chosen(root, m)
                assert pick is not None, f"{m}: its tuning finished but no point was chosen"
                found.append(run(s, m, f"seed{seed}", [*pick.overrides, f"seed={seed}", *extra]))
        return found

    tuning = [run(TUNE_ON, m, f"tune {c.label}", [*c.overrides, f"seed={TUNE_SEED}", *extra], m) for m, c in tune_jobs]
    return run_jobs(tuning, workers, seeded)


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = benchmark_parser(__doc__, "runs/fedmosaic", HERE / "results")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join([*METHODS, *ABLATIONS]))
    parser.add_argument("--plan", action="store_true", help="list the runs, start nothing")
    parser.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS, help="of each trunk, once")
    args = parser.parse_args()
    keep_finished(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = args.settings.split(",")
    wanted = args.methods.split(",")
    unknown = sorted(set(settings) - set(SETTINGS)) + sorted(set(wanted) - set(METHODS) - set(ABLATIONS))
    if unknown:
        parser.error(f"unknown settings or methods: {', '.join(unknown)}")
    root = Path(args.runs)
    tuned = [m for m in METHODS if m in wanted or (m == "fedmosaic" and set(wanted) & set(ABLATIONS))]
    tune_jobs = [(m, c) for m in tuned for c in candidates()]
    jobs = [(s, m, seed) for s in settings for m in methods_of(s) if m in wanted for seed in seeds]
    if args.plan:
        print(f"{len(tune_jobs)} tuning runs on {TUNE_ON}, {len(jobs)} seeded runs, 2 pre-trainings")
        return 0
    failures: list[str] = []
    if not args.report_only:
        started = time.perf_counter()
        pretrain(root, args.pretrain_epochs, args.set)
        failures = run_all(root, tune_jobs, jobs, args.jobs, args.set)
        print(f"wall time of this invocation: {(time.perf_counter() - started) / 3600:.2f} h", flush=True)
    report(root, settings, seeds, Path(args.out))
    if failures:
        print(f"{len(failures)} runs failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
