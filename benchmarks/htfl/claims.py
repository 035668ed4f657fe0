"""Test ProtoNorm's claim where it should matter: crowded classes, tuned rivals, paired seeds. Tunes every method on
validation data per setting, runs the tuned methods over paired seeds, then writes tables, paired intervals, curves
and chosen.json under benchmarks/htfl/results/claims/.

    python benchmarks/htfl/claims.py --plan          # the runs and the estimated CPU hours
    python benchmarks/htfl/claims.py                 # everything (finished runs are kept), then the report
    python benchmarks/htfl/claims.py --report-only   # only rebuild the results from existing runs
    python benchmarks/htfl/claims.py --tiny --runs /tmp/pc --out /tmp/pc_out --seeds 0 --settings c20_a0.1_d64

Question (spec protonorm.md §9, and the issue): does ProtoNorm beat tuned FedTGP and FedProto across heterogeneous
architectures, and where: with crowded classes (MNIST ∪ Fashion-MNIST as 20 classes), at which feature size D and
under which label skew α? Is it Prototype Alignment (PA) that helps: FedProto's own trained clients are scored a
second time with PA prototypes in place of the averaged ones (inference only, the same runs).

Protocol (DESIGN §8). Tuning per setting on seed 100 (never reported), at half the horizon (50 rounds), scored by
validation accuracy (`protocol.validation_score`). Stage 1 at SGD lr 0.01 (HtFLlib's): λ ∈ {0.1, 1, 10} for every
prototype method, and s ∈ {4, 8, 16, 28} for ProtoNorm (12 points); Local, which has no other knob, tries the
learning rates {0.005, 0.01, 0.02}. Stage 2: the learning rates 0.005 and 0.02 at each prototype method's stage-1
choice. Ties go to the earlier point. Gradient-norm clipping (10) is on for every method alike. A run with any
rejected reply or a non-finite validation loss counts as diverged: shown, counted, not averaged in; each method's
diverged clients (distinct clients with a refused reply) are counted over its seeds.

Unseen clients (`c20_a0.1_d64_unseen`): the first setting's 20 partitions with 4 held out of training, every method
at the values tuned for that setting; after the last round each held-out client adapts by the method's own rule and
is scored on its test split.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from statistics import mean, pstdev
from typing import cast

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedpal.report.run_reader import RunRecord, get_path, read_run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from protocol import (  # noqa: E402
    Candidate,
    best_candidate,
    diverged,
    format_interval,
    grid,
    paired_interval,
    validation_score,
)
from sweep import Job, benchmark_parser, finished_runs, keep_finished, mean_curve, pct, run_config, run_jobs  # noqa: E402

CONFIG = HERE / "claims.toml"
# name -> overrides; the first three run by default, in this order (the budget's last priority is more settings)
SETTINGS: dict[str, tuple[str, ...]] = {
    "c20_a0.1_d64": ("data.dataset=mnist_fashion", "data.alpha=0.1", "model.feature_dim=64"),
    "c20_a0.5_d64": ("data.dataset=mnist_fashion", "data.alpha=0.5", "model.feature_dim=64"),
    "c20_a0.1_d128": ("data.dataset=mnist_fashion", "data.alpha=0.1", "model.feature_dim=128"),
    "c30_a0.1_d64": ("data.dataset=mnist_fashion_animal", "data.alpha=0.1", "model.feature_dim=64"),
    "hapt_har3": ("data.dataset=hapt", "model.family=har3", "data.alpha=0.1", "model.feature_dim=64"),
}
# unseen clients (see the docstring): tuned in its base setting, no tuning runs of its own
SETTINGS["c20_a0.1_d64_unseen"] = (*SETTINGS["c20_a0.1_d64"], "data.unseen_clients=4")
TUNED_IN = {"c20_a0.1_d64_unseen": "c20_a0.1_d64"}
DEFAULT_SETTINGS = ("c20_a0.1_d64", "c20_a0.5_d64", "c20_a0.1_d128", "c20_a0.1_d64_unseen")
TITLES = {
    "c20_a0.1_d64": "MNIST ∪ Fashion-MNIST (20 classes), Dir(0.1), D = 64",
    "c20_a0.5_d64": "MNIST ∪ Fashion-MNIST (20 classes), Dir(0.5), D = 64",
    "c20_a0.1_d128": "MNIST ∪ Fashion-MNIST (20 classes), Dir(0.1), D = 128",
    "c30_a0.1_d64": "MNIST ∪ Fashion-MNIST ∪ Animal-MNIST (30 classes), Dir(0.1), D = 64",
    "hapt_har3": "HAPT, har3 family, Dir(0.1), D = 64",
    "c20_a0.1_d64_unseen": "MNIST ∪ Fashion-MNIST (20 classes), Dir(0.1), D = 64, 4 of the 20 clients unseen",
}
METHODS = ("protonorm", "fedtgp", "fedproto", "local")
RIVALS = ("fedtgp", "fedproto")
TUNE_SEED, TUNE_ROUNDS, BASE_LR = 100, 50, 0.01
LAMBDAS = (0.1, 1.0, 10.0)
SCALES = (4.0, 8.0, 16.0, 28.0)
LEARNING_RATES = (0.005, 0.01, 0.02)
PA_MODE = "prototype_pa"  # FedProto's score with PA prototypes in place of the averaged ones (inference only)
TINY = ("data.max_samples=1500", "train.rounds=2", "eval.every=1", "eval.generalization_samples=100")
TINY_TUNE_ROUNDS = 1
# --plan: CPU seconds of one 100-round run at 10,000 images (the earlier 5,000-image, 50-round runs x 4)
RUN_SECONDS = {"local": 235.0, "fedproto": 253.0, "fedtgp": 445.0, "protonorm": 315.0}
COLUMNS = (  # (header, path in summary.json)
    ("Pers. acc", ("last_round", "personalized", "accuracy")),
    ("Pers. acc (val. round)", ("selected_round", "personalized", "accuracy")),
    ("Pers. acc (unweighted)", ("last_round", "personalized", "accuracy_unweighted")),
    ("Gen. acc", ("last_round", "generalization", "accuracy")),
    ("Unseen acc (adapted)", ("unseen", "personalized", "accuracy")),
)
ACCURACY = COLUMNS[0][1]


def stage_one(method: str) -> list[Candidate]:
    if method == "local":
        return grid([("train.lr", LEARNING_RATES)])
    if method == "protonorm":
        return grid([("train.lr", (BASE_LR,)), ("algorithm.lam", LAMBDAS), ("algorithm.scale", SCALES)])
    return grid([("train.lr", (BASE_LR,)), ("algorithm.lam", LAMBDAS)])


def stage_two(method: str, pick: Candidate) -> list[Candidate]:
    """The other learning rates at a prototype method's stage-1 choice."""
    if method == "local":
        return []
    fixed = [o for o in pick.overrides if not o.startswith("train.lr=")]
    return [
        Candidate(pick.label.replace(f"lr={BASE_LR:g}", f"lr={lr:g}"), (f"train.lr={lr}", *fixed))
        for lr in LEARNING_RATES
        if lr != BASE_LR
    ]


def slug(label: str) -> str:
    return label.replace(", ", "_").replace("=", "")


def run_path(root: Path, setting: str, method: str, label: str) -> Path:
    return root / setting / method / slug(label)


def best(root: Path, setting: str, method: str, points: Sequence[Candidate]) -> Candidate | None:
    """The point with the best validation score (None until all finished); ties go to the earlier point."""
    return best_candidate([(c, run_path(root, setting, method, f"tune_{c.label}")) for c in points])


def chosen(root: Path, setting: str, method: str) -> Candidate | None:
    setting = TUNED_IN.get(setting, setting)
    first = best(root, setting, method, stage_one(method))
    if first is None or method == "local":
        return first
    return best(root, setting, method, [first, *stage_two(method, first)])


def launch(root: Path, setting: str, method: str, label: str, overrides: Sequence[str], extra: Sequence[str]) -> float:
    items = [*SETTINGS[setting], f"algorithm.name={method}", *extra, *overrides]  # the run's own values win
    return run_config(CONFIG, run_path(root, setting, method, label), items)


def run_setting(
    root: Path, setting: str, methods: list[str], seeds: list[int], jobs: int, extra: list[str], tune_rounds: int
) -> list[str]:
    """For one setting (so its results are whole before the next): each method's stage 1, its stage 2 around the
    stage-1 choice, then its seeds, each as soon as the one before has finished; returns the failures."""
    tune = [f"seed={TUNE_SEED}", f"train.rounds={tune_rounds}"]

    def run(method: str, label: str, overrides: list[str], stage: tuple[int, str] | None = None) -> Job:
        return Job(f"{setting}/{method}/{label}", lambda: launch(root, setting, method, label, overrides, extra), stage)

    def unlocked(stage: Hashable) -> list[Job]:
        number, method = cast(tuple[int, str], stage)
        if number == 1:
            first = best(root, setting, method, stage_one(method))
            assert first is not None, f"{setting}/{method}: stage 1 finished but no point was chosen"
            points = stage_two(method, first)
            if points:
                return [run(method, f"tune_{c.label}", [*c.overrides, *tune], (2, method)) for c in points]
        pick = chosen(root, setting, method)
        assert pick is not None, f"{setting}/{method}: its tuning finished but no point was chosen"
        return [run(method, f"seed{seed}", [*pick.overrides, f"seed={seed}"]) for seed in seeds]

    if setting in TUNED_IN:  # the base setting's tuning must have finished
        picks = {m: pick for m in methods if (pick := chosen(root, setting, m)) is not None}
        if len(picks) < len(methods):
            untuned = ", ".join(m for m in methods if m not in picks)
            return [f"{setting}: {untuned} not tuned on {TUNED_IN[setting]} yet"]
        return run_jobs(
            [run(m, f"seed{seed}", [*p.overrides, f"seed={seed}"]) for m, p in picks.items() for seed in seeds], jobs
        )
    first = [run(m, f"tune_{c.label}", [*c.overrides, *tune], (1, m)) for m in methods for c in stage_one(m)]
    return run_jobs(first, jobs, unlocked)


def plan(settings: list[str], methods: list[str], seeds: list[int], jobs: int) -> list[str]:
    lines, total = [], 0.0
    for setting in settings:
        if setting in TUNED_IN:
            seeded_s = sum(RUN_SECONDS[m] for m in methods) * len(seeds)
            total += seeded_s
            lines.append(
                f"{setting}: tuned on {TUNED_IN[setting]}, {len(methods) * len(seeds)} seeded runs, "
                f"~{seeded_s / 3600:.1f} CPU h"
            )
            continue
        tuning = sum(len(stage_one(m)) + (2 if m != "local" else 0) for m in methods)
        tune_s = sum((len(stage_one(m)) + (2 if m != "local" else 0)) * RUN_SECONDS[m] / 2 for m in methods)
        seeded_s = sum(RUN_SECONDS[m] for m in methods) * len(seeds)
        total += tune_s + seeded_s
        lines.append(
            f"{setting}: {tuning} tuning runs ({TUNE_ROUNDS} rounds), {len(methods) * len(seeds)} seeded runs, "
            f"~{(tune_s + seeded_s) / 3600:.1f} CPU h"
        )
    lines.append(f"total ~{total / 3600:.1f} CPU h, ~{total / 3600 / jobs:.1f} h wall with --jobs {jobs}")
    return lines


# ------------------------------------------------------------------------------------------------- report


def value(rec: RunRecord, path: Sequence[str]) -> float | None:
    v = get_path(rec.summary, *path)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def cell(recs: list[RunRecord], path: Sequence[str]) -> str:
    values = [v for r in recs if not diverged(r) and (v := value(r, path)) is not None]
    return pct(mean(values), pstdev(values)) if values else "–"


def pa_path() -> tuple[str, ...]:
    return ("inference", PA_MODE, "personalized_accuracy")


def main_table(found: dict[str, list[RunRecord]]) -> list[str]:
    headers = ["Method", "Seeds (diverged)", "Diverged clients", *(h for h, _ in COLUMNS), "Min. angle (°)", "Wall"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for method, recs in found.items():
        failed = sum(diverged(r) for r in recs)
        clients = sum(len(r.summary.get("rejected_clients") or []) for r in recs)
        ok = [r for r in recs if not diverged(r)]
        angle = [v for r in ok if (v := value(r, ("last_round", "diagnostics", "global_angle_min_deg"))) is not None]
        wall = [v for r in ok if (v := value(r, ("wall_seconds",))) is not None]
        trained = sum(int(r.summary.get("num_clients", 20)) for r in recs)
        cells = [method, f"{len(recs)} ({f'**{failed}**' if failed else 0})", f"{clients} of {trained}"]
        cells += [cell(recs, p) for _, p in COLUMNS]
        cells += [f"{mean(angle):.1f}" if angle else "–", f"{mean(wall) / 60:.1f} min" if wall else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if "fedproto" in found:
        lines.append(
            f"| fedproto, PA prototypes at inference | (the same runs) | – | {cell(found['fedproto'], pa_path())} "
            "| – | – | – | – | – | – |"
        )
    return [*lines, ""]


def differences(a: list[RunRecord], b: list[RunRecord], path_a: Sequence[str], path_b: Sequence[str]) -> list[float]:
    left = {r.seed: value(r, path_a) for r in a if not diverged(r)}
    right = {r.seed: value(r, path_b) for r in b if not diverged(r)}
    return [x - y for s, x in left.items() if x is not None and (y := right.get(s)) is not None]


def paired(a: list[RunRecord], b: list[RunRecord], path_a: Sequence[str], path_b: Sequence[str] | None = None) -> str:
    diffs = differences(a, b, path_a, path_b or path_a)
    return f"{format_interval(*paired_interval(diffs))} (n = {len(diffs)})" if diffs else "–"


def comparison_table(found: dict[str, list[RunRecord]]) -> list[str]:
    if "protonorm" not in found:
        return []
    strongest = max(
        (m for m in RIVALS if m in found),
        key=lambda m: mean([v for r in found[m] if not diverged(r) and (v := value(r, ACCURACY)) is not None] or [0]),
        default=None,
    )
    lines = [
        "Paired by seed, mean [bootstrap 95 % interval] in points (last round unless said):",
        "",
        "| Comparison | Pers. acc | Pers. acc (val. round) | Gen. acc | Unseen acc (adapted) |",
        "|---|---|---|---|---|",
    ]
    pairs = [(f"ProtoNorm − {m}" + (" (strongest rival)" if m == strongest else ""), "protonorm", m) for m in RIVALS]
    pairs.append(("ProtoNorm − Local", "protonorm", "local"))
    for label, a, b in pairs:
        if a in found and b in found:
            cells = [paired(found[a], found[b], p) for _, p in (COLUMNS[0], COLUMNS[1], COLUMNS[3], COLUMNS[4])]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "fedproto" in found:
        swap = paired(
            found["fedproto"], found["fedproto"], pa_path(), ("inference", "prototype", "personalized_accuracy")
        )
        lines.append(
            f"| FedProto scored with PA prototypes − with its averaged ones (same runs) | {swap} | – | – | – |"
        )
    return [*lines, ""]


def plot_curves(found: dict[str, list[RunRecord]], path: Path, title: str) -> None:
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, (method, recs) in enumerate(found.items()):
        ok = [r for r in recs if not diverged(r)]
        if not ok:
            continue
        for ax, keys, panel in zip(
            axes,
            (("personalized", "accuracy"), ("generalization", "accuracy")),
            ("personalized accuracy", "generalization accuracy"),
            strict=True,
        ):
            rounds, means, stds = mean_curve(ok, *keys)
            ax.plot(rounds, [100 * m for m in means], color=f"C{i}", label=method)
            low = [100 * (m - s) for m, s in zip(means, stds, strict=True)]
            high = [100 * (m + s) for m, s in zip(means, stds, strict=True)]
            ax.fill_between(rounds, low, high, color=f"C{i}", alpha=0.12)
            ax.set_title(panel)
            ax.set_xlabel("round")
            ax.set_ylabel("accuracy (%)")
            ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def tuning_record(root: Path, setting: str, method: str) -> dict[str, object]:
    setting = TUNED_IN.get(setting, setting)
    first = best(root, setting, method, stage_one(method))
    points = [*stage_one(method), *(stage_two(method, first) if first else [])]
    scores: dict[str, float | str | None] = {}
    for candidate in points:
        path = run_path(root, setting, method, f"tune_{candidate.label}")
        score = validation_score(read_run(path)) if (path / "summary.json").exists() else None
        scores[candidate.label] = score if score is None or math.isfinite(score) else "diverged"
    pick = chosen(root, setting, method)
    return {"chosen": pick.label if pick else None, "validation_accuracy": scores}


def report(root: Path, settings: list[str], seeds: list[int], out: Path, elapsed: float | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    picks = {s: {m: tuning_record(root, s, m) for m in METHODS} for s in settings}
    parts = [
        "# ProtoNorm claims: results",
        "",
        "Generated by `python benchmarks/htfl/claims.py`. The question, the answer with its intervals and what would "
        "change it are in ../../README.md (Answers); the protocol there and in the script's docstring. "
        "Accuracy in percent, mean ± std over the seeds that did not diverge. *Pers.*: the method's prediction "
        "(nearest global prototype for the prototype methods) on each client's own test split, "
        "sample-weighted; *val. round*: the evaluation validation loss selects; *Gen.*: each client's model on a "
        "500-image sample of the other clients' test data. *Min. angle*: smallest pairwise angle of the global "
        "prototypes at the last round. *Unseen*: clients held out of training, after the method's own adaptation (one "
        "local update from the final server state, from a fresh model), on their own test split (only in the "
        "setting that holds clients out). Diverged runs are counted in bold; *Diverged clients* sums, over seeds, the "
        "clients that had a reply refused.",
        "",
    ]
    if elapsed is not None:
        parts += [f"Wall time of the last invocation: {elapsed / 3600:.2f} h.", ""]
    for setting in settings:
        found = {
            m: recs for m in METHODS if (recs := finished_runs(run_path(root, setting, m, f"seed{s}") for s in seeds))
        }
        parts += [f"## {TITLES[setting]}", ""]
        tuned = ", ".join(f"{m}: {picks[setting][m]['chosen'] or 'not tuned yet'}" for m in METHODS)
        where = f" on {TUNED_IN[setting]}" if setting in TUNED_IN else ""
        parts += [f"Chosen on validation{where} (seed {TUNE_SEED}, {TUNE_ROUNDS} rounds): {tuned}.", ""]
        if not found:
            parts += ["No finished seeded runs.", ""]
            continue
        parts += [*main_table(found), *comparison_table(found)]
        plot_curves(found, out / f"curves_{setting}.png", TITLES[setting])
        parts += [f"![curves, {setting}](curves_{setting}.png)", ""]
    (out / "README.md").write_text("\n".join(parts))
    (out / "chosen.json").write_text(json.dumps(picks, indent=1) + "\n")
    print("\n".join(parts))


def main() -> int:
    parser = benchmark_parser(__doc__, "runs/htfl-claims", HERE / "results" / "claims")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help=f"from {', '.join(SETTINGS)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes (2 rounds, 1,500 images)")
    parser.add_argument("--plan", action="store_true", help="print the runs and estimated hours, run nothing")
    parser.set_defaults(seeds="0,1,2,3,4")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings, methods = args.settings.split(","), args.methods.split(",")
    unknown = sorted(set(settings) - set(SETTINGS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown settings or methods: {', '.join(unknown)}")
    if args.plan:
        print("\n".join(plan(settings, methods, seeds, args.jobs)))
        return 0
    keep_finished(args)
    root = Path(args.runs)
    elapsed, failures = None, []
    if not args.report_only:
        started = time.perf_counter()
        extra = ["train.threads=1", *(TINY if args.tiny else ()), *args.set]
        tune_rounds = TINY_TUNE_ROUNDS if args.tiny else TUNE_ROUNDS
        for setting in settings:
            failures += run_setting(root, setting, methods, seeds, args.jobs, extra, tune_rounds)
        elapsed = time.perf_counter() - started
    report(root, settings, seeds, Path(args.out), elapsed)
    if failures:
        print(f"{len(failures)} runs failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
