"""Regenerate the pFLAlign benchmark: tune every method's step size on validation data, run the tuned methods and
pFLAlign's ablation variants over paired seeds in three settings, then write the tables, the paired intervals, the
learning curves and chosen.json to benchmarks/pflalign/results/.

    python benchmarks/pflalign/run.py                 # everything (finished runs are kept), then the report
    python benchmarks/pflalign/run.py --report-only   # only rebuild the results from existing runs
    python benchmarks/pflalign/run.py --plan          # the number of runs and the estimated hours, nothing run
    python benchmarks/pflalign/run.py --settings mnist --methods pflalign,fedavg --seeds 0   # a part
    python benchmarks/pflalign/run.py --tiny --runs /tmp/pflsmoke --out /tmp/pflsmoke_results --seeds 0  # smoke

Questions (the paper's claims, shared/specs/pflalign.md §9): under label skew and with natural clients, does pFLAlign
beat FedAvg with local fine-tuning and Ditto on personalized accuracy, is its personalized accuracy steadier from
evaluation to evaluation (the paper's "training stability"), and which of its parts (the preconditioner P, the
personalised start Δ, the alignment correction γ) matter?

Protocol (DESIGN §8): every method gets three grid points of its step size, scored by validation accuracy of a run
with a tuning seed (100) that the reported seeds never use. The baselines' grid is three learning rates; pFLAlign's
is lr_scale in {1, 3, 10} at the learning rate FedAvg chose (its preconditioned steps are smaller than SGD's at equal
η, spec §5), so its tuning waits for FedAvg's. The ablation variants are not tuned: they reuse full pFLAlign's
values, so each differs from it in one mechanism only; the variant without the preconditioner, whose steps at those
values diverge, also runs tuned on pFLAlign's own grid (`pflalign_no_preconditioner_retuned`). A choice on the edge
of its grid gets one probe run beyond that edge (tuning seed), reported beside the tables, never used as the choice;
where the probe wins, the seeds also run at its point, as a sensitivity row.
A run that rejected a reply or ended with a non-finite validation loss counts as diverged and is shown, not averaged
in. Runs go to runs/pflalign/ (not committed); each is a normal fedpal run directory.
"""

from __future__ import annotations

import json
import math
import sys
import time
import tomllib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, pstdev
from typing import cast, get_args

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedpal.algorithms.weight_sharing.pflalign import Variant
from fedpal.engine.summary import stability
from fedpal.report.run_reader import RunRecord, get_path, read_run
from fedpal.report.tables import human_bytes

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

IMAGES = HERE / "images.toml"
SHAKESPEARE = HERE / "shakespeare.toml"
TUNE_SEED = 100
# setting -> (base config, its overrides)
SETTINGS: dict[str, tuple[Path, tuple[str, ...]]] = {
    "fashion_mnist": (IMAGES, ("data.dataset=fashion_mnist",)),
    "mnist": (IMAGES, ("data.dataset=mnist",)),
    "shakespeare": (SHAKESPEARE, ()),
}
# --tiny: the same pipeline at smoke-test size (4 rounds, so the stability measure has 2 evaluations); not a result
TINY_IMAGES = ("data.max_samples=2000", "train.rounds=4", "eval.every=1", "eval.generalization_samples=200")
TINY: dict[str, tuple[str, ...]] = {
    "fashion_mnist": TINY_IMAGES,
    "mnist": TINY_IMAGES,
    "shakespeare": (
        "data.num_clients=10",
        "data.max_samples=8000",
        "train.clients_per_round=5",
        "train.rounds=4",
        "eval.every=1",
        "eval.generalization_clients=3",
        "eval.generalization_samples=100",
    ),
}
# the baselines' grid: three learning rates per setting, the same for every baseline
LEARNING_RATES: dict[str, tuple[float, ...]] = {
    "fashion_mnist": (0.03, 0.1, 0.3),
    "mnist": (0.03, 0.1, 0.3),
    "shakespeare": (0.3, 1.0, 3.0),
}
LR_SCALES = (1.0, 3.0, 10.0)  # pFLAlign's grid: η = lr_scale x FedAvg's chosen learning rate (spec §5)
PFLALIGN = "pflalign"
VARIANTS = tuple(v for v in get_args(Variant) if v != "full")  # the ablations, as the method names them
ABLATIONS = tuple(f"{PFLALIGN}_{v}" for v in VARIANTS)
# Variants that also get pFLAlign's own grid: without P the full method's step diverges, so the ablation at fixed
# values says only that; tuned, it says whether P helps once each has its best step. (The `sgd` variant at
# lr_scale 1 is FedAvg, already tuned as a baseline.)
RETUNED = (f"{PFLALIGN}_no_preconditioner_retuned",)


def variant_of(retuned: str) -> str:
    return retuned.removeprefix(f"{PFLALIGN}_").removesuffix("_retuned")


BASELINES = ("fedavg", "fedavg_ft", "ditto", "apfl", "fedrep", "fedbabu", "fedala", "local")
METHODS = (PFLALIGN, *ABLATIONS, *RETUNED, *BASELINES)
FIXED: dict[str, tuple[str, ...]] = {
    **{f"{PFLALIGN}_{v}": (f"algorithm.name={PFLALIGN}", f"algorithm.variant={v}") for v in VARIANTS},
    **{m: (f"algorithm.name={PFLALIGN}", f"algorithm.variant={variant_of(m)}") for m in RETUNED},
}
RIVALS = ("fedavg_ft", "ditto")  # the question: pFLAlign against these two
COLUMNS = (  # (header, path in summary.json, lower is better)
    ("Pers. acc", ("last_round", "personalized", "accuracy"), False),
    ("Pers. acc (unweighted)", ("last_round", "personalized", "accuracy_unweighted"), False),
    ("Stability (std)", ("stability", "personalized_accuracy_std"), True),
    ("Fluctuation", ("stability", "personalized_accuracy_fluctuation"), True),
    ("Gen. acc (others)", ("last_round", "generalization", "others", "accuracy"), False),
)
ACCURACY, STABILITY, FLUCTUATION = COLUMNS[0], COLUMNS[2], COLUMNS[3]

# Cost model for --plan: CPU seconds of one run's process (startup, one round, one evaluation), measured with short
# runs of each method while another benchmark loaded both cores (CPU time, not wall time, so it approximates a
# quiet core; see README.md). The ablation variants cost what full pFLAlign costs.
MEASURED_CPU_S: dict[str, dict[str, tuple[float, float, float]]] = {
    "images": {  # Fashion-MNIST at train.lr 0.1
        "fedavg": (7.0, 0.74, 0.48),
        "local": (5.7, 1.33, 1.11),
        "fedavg_ft": (6.1, 1.32, 2.42),
        "ditto": (6.1, 2.49, 0.99),
        "apfl": (4.2, 3.48, 1.63),
        "fedrep": (5.9, 1.66, 1.23),
        "fedbabu": (5.2, 1.73, 2.24),
        "fedala": (7.5, 2.18, 4.60),
        "pflalign": (5.8, 1.70, 1.19),
    },
    "shakespeare": {  # at train.lr 1.0
        "fedavg": (7.9, 2.92, 2.74),
        "local": (5.4, 3.74, 4.97),
        "fedavg_ft": (5.5, 3.22, 26.78),
        "ditto": (6.4, 9.12, 5.30),
        "apfl": (4.1, 7.68, 6.80),
        "fedrep": (4.6, 5.23, 3.97),
        "fedbabu": (1.6, 3.66, 26.68),
        # measured: startup 17.7, round 3.90, evaluation 62.3 in the first rounds, when most clients have not trained
        # yet and their evaluation runs the first, multi-pass ALA (about 1.3 s a client, once per client); modelled
        # here as those first ALAs once (+65 s) and the later one-pass evaluations (~10 s)
        "fedala": (83.0, 3.90, 17.0),
        "pflalign": (6.0, 4.70, 6.61),
    },
}


def tuned_as(method: str) -> str:
    """Whose tuning a method uses: the ablation variants reuse full pFLAlign's."""
    return PFLALIGN if method in ABLATIONS else method


def slug(label: str) -> str:
    return label.replace(", ", "_").replace("=", "")


def run_path(root: Path, setting: str, method: str, label: str) -> Path:
    return root / setting / method / slug(label)


def lr_of(candidate: Candidate) -> str:
    return next(o.split("=", 1)[1] for o in candidate.overrides if o.startswith("train.lr="))


def candidates(root: Path, setting: str, method: str) -> list[Candidate] | None:
    """A method's tuning grid (3 points); pFLAlign's (and its retuned variants') is known only once FedAvg's tuning
    has finished."""
    if method == PFLALIGN or method in RETUNED:
        base = chosen(root, setting, "fedavg")
        if base is None:
            return None
        return grid([("train.lr", (float(lr_of(base)),)), ("algorithm.lr_scale", LR_SCALES)])
    return grid([("train.lr", LEARNING_RATES[setting])])


def beyond(value: float, upward: bool) -> float:
    """The next value past ``value`` on the 1-3-10 ladder every grid here follows (0.3 -> 1, 10 -> 30, 0.03 -> 0.01)."""
    exponent = math.floor(math.log10(value) + 1e-9)
    leading = round(value / 10**exponent)
    if upward:
        return float(f"{3 if leading == 1 else 1}e{exponent if leading == 1 else exponent + 1}")
    return float(f"{1 if leading == 3 else 3}e{exponent if leading == 3 else exponent - 1}")


def edge_probe(root: Path, setting: str, method: str) -> Candidate | None:
    """When a method's choice lies on the edge of its grid, the one point just beyond that edge (the step key moved
    one rung of the ladder, the rest of the choice kept); None for a choice inside the grid or not made yet. Its run
    only says whether a wider grid would have chosen differently: it never replaces the choice, so every method keeps
    the same tuning budget (DESIGN §8)."""
    pick, points = chosen(root, setting, method), candidates(root, setting, method)
    if pick is None or not points or pick not in (points[0], points[-1]):
        return None
    key = "algorithm.lr_scale" if method == PFLALIGN or method in RETUNED else "train.lr"
    value = float(next(o.split("=", 1)[1] for o in pick.overrides if o.startswith(f"{key}=")))
    probe = beyond(value, upward=pick == points[-1])
    kept = [(o.split("=", 1)[0], (float(o.split("=", 1)[1]),)) for o in pick.overrides if not o.startswith(f"{key}=")]
    return grid([*kept, (key, (probe,))])[0]


def chosen(root: Path, setting: str, method: str) -> Candidate | None:
    """The grid point with the best validation score of the tuning runs (None until all of them have finished);
    ties go to the first point (the smallest step)."""
    method = tuned_as(method)
    points = candidates(root, setting, method)
    if points is None:
        return None
    return best_candidate([(c, run_path(root, setting, method, f"tune_{c.label}")) for c in points])


# ------------------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Run:
    setting: str
    method: str
    label: str
    overrides: tuple[str, ...]


def launch(root: Path, run: Run, tiny: bool, extra: Sequence[str]) -> float:
    config, setting_overrides = SETTINGS[run.setting]
    overrides = [
        *setting_overrides,
        *(TINY[run.setting] if tiny else ()),
        f"algorithm.name={run.method}",
        *FIXED.get(run.method, ()),
        *run.overrides,
        *extra,
    ]
    return run_config(config, run_path(root, run.setting, run.method, run.label), overrides)


def tuning_runs(root: Path, setting: str, method: str) -> list[Run]:
    points = candidates(root, setting, method) or []
    return [Run(setting, method, f"tune_{c.label}", (*c.overrides, f"seed={TUNE_SEED}")) for c in points]


def probe_runs(root: Path, setting: str, method: str) -> list[Run]:
    probe = edge_probe(root, setting, method)
    if probe is None:
        return []
    return [Run(setting, method, f"probe_{probe.label}", (*probe.overrides, f"seed={TUNE_SEED}"))]


def edge_scores(
    root: Path, setting: str, method: str
) -> tuple[Candidate, Candidate, float | None, float | None] | None:
    """(choice, probe, the choice's validation score, the probe's) for a choice on its grid's edge, else None."""
    pick, probe = chosen(root, setting, method), edge_probe(root, setting, method)
    if pick is None or probe is None:
        return None
    picked = tuning_score(root, setting, method, f"tune_{pick.label}")
    return pick, probe, picked, tuning_score(root, setting, method, f"probe_{probe.label}")


def probe_wins(root: Path, setting: str, method: str) -> bool:
    """Whether the probe beyond a method's edge scored higher on validation than the choice."""
    scores = edge_scores(root, setting, method)
    if scores is None:
        return False
    _, _, picked, beyond_it = scores
    return picked is not None and beyond_it is not None and math.isfinite(beyond_it) and beyond_it > picked


def beyond_runs(root: Path, setting: str, method: str, seeds: Sequence[int]) -> list[Run]:
    """When a probe beats the choice, the reported seeds at the probe's point too: a sensitivity row beside the
    tables (how much a wider grid could change this method's numbers), never in the main comparisons."""
    probe = edge_probe(root, setting, method)
    if probe is None or not probe_wins(root, setting, method):
        return []
    return [Run(setting, method, f"beyond_seed{s}", (*probe.overrides, f"seed={s}")) for s in seeds]


def seeded_runs(root: Path, setting: str, method: str, seeds: Sequence[int]) -> list[Run]:
    pick = chosen(root, setting, method)
    if pick is None:
        print(f"{setting}/{method}: not tuned (a tuning run failed), its seeded runs are skipped", flush=True)
        return []
    return [Run(setting, method, f"seed{s}", (*pick.overrides, f"seed={s}")) for s in seeds]


def run_all(
    root: Path, settings: list[str], methods: list[str], seeds: list[int], jobs: int, tiny: bool, extra: list[str]
) -> list[str]:
    """Every tuning run, then every seeded run, `jobs` at a time; a method's seeded runs (and pFLAlign's tuning,
    which needs FedAvg's choice) are queued as soon as what they depend on has finished. Returns the failures."""
    wants_pflalign = any(m == PFLALIGN or m in ABLATIONS or m in RETUNED for m in methods)

    def stage_of(run: Run) -> Hashable:
        """A tuning run's stage is its (setting, method): all of them together unlock what depends on the choice;
        a probe's unlocks the seeds beyond the grid when it wins."""
        if run.label.startswith("tune_"):
            return (run.setting, run.method)
        return ("probe", run.setting, run.method) if run.label.startswith("probe_") else None

    def as_jobs(runs: list[Run]) -> list[Job]:
        return [
            Job(f"{r.setting}/{r.method}/{slug(r.label)}", lambda r=r: launch(root, r, tiny, extra), stage_of(r))
            for r in runs
        ]

    def on_tuned(stage: Hashable) -> list[Job]:
        """What becomes possible once a method's tuning (or its grid-edge probe) is complete."""
        if cast(tuple[str, ...], stage)[0] == "probe":
            _, setting, method = cast(tuple[str, str, str], stage)
            return as_jobs(beyond_runs(root, setting, method, seeds))
        setting, method = cast(tuple[str, str], stage)
        unlocked: list[Run] = []
        if method in methods:
            unlocked += seeded_runs(root, setting, method, seeds)
            unlocked += probe_runs(root, setting, method)
        if method == "fedavg" and wants_pflalign:
            for owner in (PFLALIGN, *(m for m in RETUNED if m in methods)):
                tuning = tuning_runs(root, setting, owner)
                if not tuning:
                    print(f"{setting}/{owner}: FedAvg is not tuned, it is skipped", flush=True)
                unlocked += tuning
        if method == PFLALIGN:
            for variant in ABLATIONS:
                if variant in methods:
                    unlocked += seeded_runs(root, setting, variant, seeds)
        return as_jobs(unlocked)

    first = [  # FedAvg first: pFLAlign's grid depends on it
        run
        for setting in settings
        for method in BASELINES
        if method in methods or (method == "fedavg" and wants_pflalign)
        for run in tuning_runs(root, setting, method)
    ]
    return run_jobs(as_jobs(first), jobs, on_tuned)


def schedule(config: Path) -> tuple[int, int]:
    """(rounds, evaluations) of a run of a base config: every eval.every rounds, and always the last one."""
    with config.open("rb") as f:
        data = tomllib.load(f)
    rounds, every = int(data["train"]["rounds"]), int(data["eval"]["every"])
    return rounds, rounds // every + (rounds % every != 0)


def plan(settings: list[str], methods: list[str], seeds: list[int], jobs: int) -> list[str]:
    """The number of runs per setting and the time the cost model predicts for them."""
    lines = ["| setting | tuning runs | seeded runs | CPU hours (one core) |", "|---|---|---|---|"]
    tuned = {tuned_as(m) for m in methods}
    if tuned & {PFLALIGN, *RETUNED}:
        tuned.add("fedavg")  # pFLAlign's grid is built on FedAvg's choice
    total_runs, total_s = 0, 0.0
    for setting in settings:
        config = SETTINGS[setting][0]
        rounds, evaluations = schedule(config)
        costs = MEASURED_CPU_S[config.stem]
        cost = 0.0
        for method, count in [*((m, 3) for m in tuned), *((m, len(seeds)) for m in methods)]:
            startup, per_round, per_eval = costs[PFLALIGN if method.startswith(PFLALIGN) else method]
            cost += count * (startup + rounds * per_round + evaluations * per_eval)
        tuning, seeded = 3 * len(tuned), len(seeds) * len(methods)
        lines.append(f"| {setting} | {tuning} | {seeded} | {cost / 3600:.1f} |")
        total_runs += tuning + seeded
        total_s += cost
    lines.append(
        f"\n{total_runs} runs, {total_s / 3600:.1f} CPU hours: about {total_s / 3600 / jobs:.1f} h with {jobs} "
        "runs in parallel on quiet cores (more when the cores are shared)."
    )
    return lines


# ------------------------------------------------------------------------------------------------ report


def records_of(root: Path, setting: str, method: str, seeds: Sequence[int]) -> list[RunRecord]:
    return [
        with_fluctuation(r) for r in finished_runs(run_path(root, setting, method, f"seed{seed}") for seed in seeds)
    ]


def with_fluctuation(record: RunRecord) -> RunRecord:
    """A run finished before summaries had the stability fluctuation gets it from its metrics, by the summary's own
    function (its std, recomputed the same way, is unchanged)."""
    if "personalized_accuracy_fluctuation" not in (record.summary.get("stability") or {}):
        entries = [m for m in record.metrics if isinstance(m.get("personalized"), dict)]
        if entries:
            record.summary["stability"] = stability(entries)
    return record


def value(record: RunRecord, path: tuple[str, ...]) -> float:
    v = get_path(record.summary, *path)
    return float(v) if isinstance(v, int | float) else math.nan


def by_seed(records: list[RunRecord], path: tuple[str, ...]) -> dict[int, float]:
    """Per seed, the value of the runs that did not diverge (a diverged run is a failure, never a number)."""
    return {int(r.summary["seed"]): value(r, path) for r in records if not diverged(r)}


def cell(records: list[RunRecord], path: tuple[str, ...]) -> str:
    values = [v for v in by_seed(records, path).values() if not math.isnan(v)]
    return pct(mean(values), pstdev(values)) if values else "–"


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[list[float], str]:
    """Per-seed differences a − b over the seeds both have, and their bootstrap 95% interval as text."""
    diffs = [a[s] - b[s] for s in sorted(a) if s in b and not math.isnan(a[s]) and not math.isnan(b[s])]
    seeds = "1 seed" if len(diffs) == 1 else f"{len(diffs)} seeds"
    return diffs, f"{format_interval(*paired_interval(diffs))} ({seeds})"


def verdict(diffs: list[float], lower_is_better: bool) -> str:
    """Whether the interval of a − b excludes zero, in words; 'unclear' when it does not."""
    if len(diffs) < 2:
        return "too few seeds"
    _, low, high = paired_interval(diffs)
    if low > 0:
        return "worse" if lower_is_better else "better"
    if high < 0:
        return "better" if lower_is_better else "worse"
    return "unclear (interval contains 0)"


def tuned_label(root: Path, setting: str, method: str) -> str:
    """The chosen grid point, marked when it lies on the grid's edge (the best step may lie outside the grid)."""
    pick = chosen(root, setting, method)
    if pick is None:
        return "?"
    points = candidates(root, setting, tuned_as(method)) or []
    edge = " (edge)" if pick in (points[0], points[-1]) else ""
    return pick.label + edge + (" (full's)" if method in ABLATIONS else " (own grid)" if method in RETUNED else "")


def main_table(root: Path, setting: str, found: dict[str, list[RunRecord]]) -> list[str]:
    header = ["Method", "Tuned", "Runs", *(h for h, _, _ in COLUMNS), "Up / round", "Down / round", "Diverged"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, recs in found.items():
        tuned = tuned_label(root, setting, method)
        cells = [method, tuned, str(len(recs)), *(cell(recs, path) for _, path, _ in COLUMNS)]
        up = [value(r, ("bytes_per_round", "up")) for r in recs]
        down = [value(r, ("bytes_per_round", "down")) for r in recs]
        cells += [human_bytes(mean(up)), human_bytes(mean(down)), str(sum(diverged(r) for r in recs))]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def strongest_baseline(found: dict[str, list[RunRecord]]) -> str | None:
    """The baseline with the highest mean personalized accuracy over its seeds that did not diverge."""
    accuracy = {m: by_seed(recs, ACCURACY[1]) for m, recs in found.items() if m in BASELINES}
    means = {m: mean([v for v in s.values() if not math.isnan(v)] or [-math.inf]) for m, s in accuracy.items()}
    return max(means, key=lambda m: means[m]) if means else None


def comparison_lines(found: dict[str, list[RunRecord]]) -> list[str]:
    """pFLAlign minus FedAvg-FT, Ditto, the strongest other baseline and Local, paired by seed."""
    full = found[PFLALIGN]
    strongest = strongest_baseline(found)
    rivals = [m for m in dict.fromkeys([*RIVALS, strongest, "local"]) if m in found]
    lines = [
        "pFLAlign minus each rival, per seed, mean and bootstrap 95 % interval in points (stability: negative = "
        "pFLAlign steadier):",
        "",
        "| pFLAlign − | Pers. acc | Stability (std) | Fluctuation | reading |",
        "|---|---|---|---|---|",
    ]
    for rival in rivals:
        name = f"{rival} (strongest baseline)" if rival == strongest else rival
        diffs_acc, acc = paired(by_seed(full, ACCURACY[1]), by_seed(found[rival], ACCURACY[1]))
        diffs_std, std = paired(by_seed(full, STABILITY[1]), by_seed(found[rival], STABILITY[1]))
        diffs_fl, fl = paired(by_seed(full, FLUCTUATION[1]), by_seed(found[rival], FLUCTUATION[1]))
        reading = (
            f"accuracy {verdict(diffs_acc, False)}; stability {verdict(diffs_std, True)}; "
            f"fluctuation {verdict(diffs_fl, True)}"
        )
        lines.append(f"| {name} | {acc} | {std} | {fl} | {reading} |")
    return [*lines, ""]


def ablation_table(found: dict[str, list[RunRecord]]) -> list[str]:
    """Each variant against full pFLAlign (same seeds; same tuned values, except a retuned variant's own)."""
    full = found[PFLALIGN]
    lines = [
        "| Variant | Runs | Pers. acc | − full | Stability (std) | − full | reading (variant vs full) "
        "| P max (last eval) | Diverged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in (PFLALIGN, *ABLATIONS, *RETUNED):
        recs = found.get(method)
        if not recs:
            continue
        p_max = [v for v in by_seed(recs, ("last_round", "diagnostics", "p_max")).values() if not math.isnan(v)]
        cells = [method, str(len(recs)), cell(recs, ACCURACY[1])]
        if method == PFLALIGN:
            cells += ["–", cell(recs, STABILITY[1]), "–", "–"]
        else:
            diffs_acc, acc = paired(by_seed(recs, ACCURACY[1]), by_seed(full, ACCURACY[1]))
            diffs_std, std = paired(by_seed(recs, STABILITY[1]), by_seed(full, STABILITY[1]))
            reading = f"accuracy {verdict(diffs_acc, False)}; stability {verdict(diffs_std, True)}"
            cells += [acc, cell(recs, STABILITY[1]), std, reading]
        cells += [f"{mean(p_max):.3f}" if p_max else "–", str(sum(diverged(r) for r in recs))]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def tuning_score(root: Path, setting: str, method: str, label: str) -> float | None:
    """The validation score of a tuning-seed run (None until it has finished; NaN when it diverged)."""
    path = run_path(root, setting, method, label)
    return validation_score(read_run(path)) if (path / "summary.json").exists() else None


def edge_probe_lines(root: Path, setting: str) -> list[str]:
    """For each choice on its grid's edge, the point just beyond it on the tuning seed: would a wider grid have
    chosen differently?"""
    rows = []
    for method in (PFLALIGN, *RETUNED, *BASELINES):
        scores = edge_scores(root, setting, method)
        if scores is None:
            continue
        pick, probe, picked, beyond_it = scores
        if beyond_it is None:
            reading = "not run yet"
        elif not math.isfinite(beyond_it):
            reading = "the probe diverged: the choice stands"
        elif picked is not None and beyond_it > picked:
            reading = f"**the probe is better by {100 * (beyond_it - picked):.2f} points**: the optimum may lie outside"
        else:
            reading = "the choice stands"
        shown = "–" if beyond_it is None else "diverged" if not math.isfinite(beyond_it) else f"{100 * beyond_it:.2f}"
        chosen_score = f"{100 * picked:.2f}" if picked is not None else "–"
        rows.append(f"| {method} | {pick.label} | {chosen_score} | {probe.label} | {shown} | {reading} |")
    if not rows:
        return []
    return [
        "Grid-edge probes: every choice on the edge of its grid, against one more point beyond that edge, by the "
        "validation accuracy of the tuning seed (100). The probe never replaces the choice (every method keeps three "
        "grid points); it says whether the tables could change with wider grids.",
        "",
        "| Method | Chosen | Val. acc | Probe | Val. acc | reading |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def beyond_lines(root: Path, setting: str, found: dict[str, list[RunRecord]], seeds: Sequence[int]) -> list[str]:
    """The reported seeds at each winning probe's point, against the same method at its choice and (for pFLAlign)
    against its rivals: how much wider grids could change the comparisons."""
    strongest = strongest_baseline(found)
    rows = []
    for method in (PFLALIGN, *RETUNED, *BASELINES):
        probe = edge_probe(root, setting, method)
        paths = (run_path(root, setting, method, f"beyond_seed{s}") for s in seeds)
        recs = [with_fluctuation(r) for r in finished_runs(paths)] if probe is not None else []
        if probe is None or not recs:
            continue
        at_probe = by_seed(recs, ACCURACY[1])
        _, own = paired(at_probe, by_seed(found.get(method, []), ACCURACY[1]))
        rivals = (
            [*dict.fromkeys([strongest, *RIVALS])] if method == PFLALIGN else [PFLALIGN] if method in RETUNED else []
        )
        against = "; ".join(
            f"− {r}: {paired(at_probe, by_seed(found[r], ACCURACY[1]))[1]}" for r in rivals if r and r in found
        )
        failed = sum(diverged(r) for r in recs)
        rows.append(f"| {method} | {probe.label} | {cell(recs, ACCURACY[1])} | {own} | {against or '–'} | {failed} |")
    if not rows:
        return []
    return [
        "Beyond the grid: where a probe beat the choice, the reported seeds also ran at the probe's point. These rows "
        "had a fourth grid point that the other methods did not, so they are a sensitivity check, not part of the "
        "comparisons above.",
        "",
        "| Method | Point | Pers. acc | − same method at its choice | against | Diverged |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def curves(found: dict[str, list[RunRecord]], path: Path, title: str) -> None:
    """Personalized accuracy per evaluation, mean ± std over seeds: baselines left, ablations right."""
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    panels = zip(fig.subplots(1, 2), ((PFLALIGN, *BASELINES), (PFLALIGN, *ABLATIONS, *RETUNED)), strict=True)
    for ax, group in panels:
        for i, method in enumerate(group):
            recs = [r for r in found.get(method, []) if not diverged(r)]
            if not recs:
                continue
            rounds, means, stds = mean_curve(recs, "personalized", "accuracy")
            main = method == PFLALIGN
            ax.plot(
                rounds,
                [100 * m for m in means],
                "-" if main else "--",
                color=f"C{i % 10}",
                label=method,
                lw=2.5 if main else 1.2,
            )
            ax.fill_between(
                rounds,
                [100 * (m - s) for m, s in zip(means, stds, strict=True)],
                [100 * (m + s) for m, s in zip(means, stds, strict=True)],
                color=f"C{i % 10}",
                alpha=0.15,
            )
        ax.set_xlabel("round")
        ax.set_ylabel("personalized accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", ncol=2)
    fig.suptitle(title)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def setting_report(root: Path, setting: str, seeds: list[int], out: Path) -> list[str]:
    order = (PFLALIGN, *BASELINES, *ABLATIONS, *RETUNED)
    found = {m: recs for m in order if (recs := records_of(root, setting, m, seeds))}
    if not found:
        return [f"### {setting}", "", "No finished runs.", ""]
    lines = [f"### {setting}", "", *main_table(root, setting, found)]
    if PFLALIGN in found:
        lines += comparison_lines(found)
        lines += ["Ablations (each variant minus full pFLAlign, paired by seed, in points):", ""]
        lines += ablation_table(found)
    lines += edge_probe_lines(root, setting)
    lines += beyond_lines(root, setting, found, seeds)
    curves(found, out / f"curves_{setting}.png", f"{setting}: personalized accuracy, mean ± std over seeds")
    lines += [f"![personalized accuracy per round, {setting}](curves_{setting}.png)", ""]
    return lines


def tuning_record(root: Path, setting: str, method: str) -> dict[str, object]:
    """For chosen.json: the grid, each point's validation score (null until run) and the choice."""
    pick = chosen(root, setting, method)
    if method in ABLATIONS:
        return {"chosen": pick.label if pick else None, "tuned_as": PFLALIGN}
    scores: dict[str, float | str | None] = {}
    for candidate in candidates(root, setting, method) or []:
        score = tuning_score(root, setting, method, f"tune_{candidate.label}")
        scores[candidate.label] = score if score is None or math.isfinite(score) else "diverged"
    record: dict[str, object] = {"chosen": pick.label if pick else None, "validation_accuracy": scores}
    edge = edge_scores(root, setting, method)
    if edge is not None:
        _, probe, _, score = edge
        record["edge_probe"] = {probe.label: score if score is None or math.isfinite(score) else "diverged"}
    return record


def report(root: Path, settings: list[str], seeds: list[int], out: Path, elapsed: float | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "# pFLAlign benchmark results",
        "",
        "Generated by `python benchmarks/pflalign/run.py` (protocol in its docstring and in ../README.md). Last "
        "round, mean ± std over the seeds that finished, in percent; personalized accuracy is sample-weighted over "
        "clients (unweighted beside it); stability is the population std of personalized accuracy over the "
        "evaluations in the second half of a run (lower = steadier), which also counts a method still climbing; "
        "fluctuation is the RMS of successive changes over those evaluations over √2, the noise around the trend; "
        "generalization is each client's model on a "
        "sample of the other clients' pooled test data; bytes are totals over the clients of a round. Diverged "
        "runs are counted and left out of the means and of the paired differences. With 3 seeds a bootstrap "
        "interval has few distinct resamples: read 'better'/'worse' as a hint, not a test.",
        "",
    ]
    if elapsed is not None:
        parts += [f"Wall time of the last invocation: {elapsed / 3600:.2f} h.", ""]
    for setting in settings:
        parts += setting_report(root, setting, seeds, out)
    (out / "README.md").write_text("\n".join(parts))
    picks = {s: {m: tuning_record(root, s, m) for m in METHODS} for s in settings}
    (out / "chosen.json").write_text(json.dumps(picks, indent=1) + "\n")
    print("\n".join(parts))


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = benchmark_parser(__doc__, "runs/pflalign", HERE / "results")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes (4 rounds, small data)")
    parser.add_argument("--plan", action="store_true", help="print the runs and estimated hours, run nothing")
    args = parser.parse_args()
    keep_finished(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = args.settings.split(",")
    methods = args.methods.split(",")
    unknown = sorted(set(settings) - set(SETTINGS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown settings or methods: {', '.join(unknown)}")
    if args.plan:
        print("\n".join(plan(settings, methods, seeds, args.jobs)))
        return 0
    root = Path(args.runs)
    elapsed, failures = None, []
    if not args.report_only:
        started = time.perf_counter()
        failures = run_all(root, settings, methods, seeds, args.jobs, args.tiny, ["train.threads=1", *args.set])
        elapsed = time.perf_counter() - started
    report(root, settings, seeds, Path(args.out), elapsed)
    if failures:
        print(f"{len(failures)} runs failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
