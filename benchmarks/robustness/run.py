"""Regenerate the robustness & privacy benchmark: tune each method's learning rate on clean runs, run every
(method, aggregation rule, attack) cell and the privacy-utility curve over paired seeds, then write the tables, the
target checks, the intervals and the plots to benchmarks/robustness/results/.

    python benchmarks/robustness/run.py --plan                 # what would run, and its estimated CPU hours
    python benchmarks/robustness/run.py                        # everything (finished runs are kept), then the report
    python benchmarks/robustness/run.py --report-only          # only rebuild the results from existing runs
    python benchmarks/robustness/run.py --settings fmnist --methods fedavg,fedper --seeds 0   # a part
    python benchmarks/robustness/run.py --tiny --runs /tmp/rb_tiny --out /tmp/rb_tiny_out  # smoke test, minutes

Questions (ROBUSTNESS.md §8, the issue's targets): is each attack strong enough to cost plain averaging 15 points
(or reach 50 % backdoor success)? Does the best of mean, median, trimmed mean and Multi-Krum stay within 5 points of
its own clean run at 20 % malicious clients? What do the robust rules cost without an attack (≤ 2 points)? What
does client-level DP cost at ε ∈ {1, 2, 4, 8, ∞} with 20 clients? Do partial-sharing personalized methods (FedPer,
LG-FedAvg, FedProto, ProtoNorm) resist a backdoor that full-sharing ones (FedAvg, FedAvg-FT, Ditto) do not?

Protocol (DESIGN §8): every method's learning rate is chosen from the same 3-point grid by validation accuracy of a
clean run with plain averaging and a tuning seed (100) that no reported run uses; the chosen rate serves every rule,
attack and privacy level of that method. Seeds 0, 1, 2 are paired across conditions: the same seed gives the same
data, partition, initial model and malicious set, so each attacked run is compared with the clean run of the same
(method, rule) and seed, on the same benign clients. A run that rejected a reply, ended with a non-finite
validation loss or crashed counts as a failure: shown, never averaged in. Runs go to runs/robustness/ (not
committed); each is a normal fedpal run directory, run as its own `fedpal run` process with one torch thread.
Runs go seed by seed (all of seed 0 first), so a partial invocation leaves whole seeds behind.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedpal.config import load_config
from fedpal.report.run_reader import RunRecord, read_run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from protocol import diverged, format_interval, paired_interval, validation_score  # noqa: E402
from sweep import Job, benchmark_parser, keep_finished, run_config, run_jobs  # noqa: E402

CONFIGS = {"fmnist": HERE / "fmnist.toml", "hapt": HERE / "hapt.toml"}
SETTING_TITLES = {"fmnist": "Fashion-MNIST (MLP)", "hapt": "HAPT (MLP)"}
FULL_SHARING = ("fedavg", "fedavg_ft", "ditto")  # every shared weight is the whole model
PARTIAL_WEIGHTS = ("fedper", "lg_fedavg")  # a part of the model is shared, the rest stays personal
PROTOTYPE_METHODS = ("fedproto", "protonorm")  # only class prototypes are shared
WEIGHT_METHODS = (*FULL_SHARING, *PARTIAL_WEIGHTS)
METHODS = (*WEIGHT_METHODS, *PROTOTYPE_METHODS)
PARTIAL_SHARING = (*PARTIAL_WEIGHTS, *PROTOTYPE_METHODS)
RULES = ("mean", "median", "trimmed_mean", "multikrum")
# fedpal reduces prototypes per class over the clients that reported the class; Krum-style scores over two or three
# reporters mean nothing, so fedpal offers no per-class Multi-Krum (fedpal.robustness.class_wise)
PROTOTYPE_RULES = ("mean", "median", "trimmed_mean")
UPDATE_ATTACKS = ("sign_flip", "gaussian", "alie", "ipm", "scale")
DATA_ATTACKS = ("label_flip", "backdoor")
ATTACKS = ("sign_flip", "gaussian", "label_flip", "backdoor", "alie", "ipm", "scale", "proto_poison")
FRACTION = 0.2  # malicious share of every method's attacked runs
FEDAVG_FRACTIONS = (0.1, 0.3)  # FedAvg also at these
NUM_CLIENTS = 20
LRS = (0.01, 0.03, 0.1)  # the tuning grid, the same 3 points for every method
TUNE_SEED = 100
EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)  # inf: clipping without noise (no guarantee), beside the no-DP run
DELTA = 1e-5
# C: each client's update is clipped to this L2 norm. Clean FedAvg updates at lr 0.03 have norms ~0.35-0.45 here
# (measured), so C = 0.5 clips little at ε = ∞ and separates the cost of clipping from the cost of the noise.
DP_CLIP = 0.5
# C_p: each class prototype is clipped to this L2 norm (privacy.prototype_clip). Clients' class prototypes measured
# in clean 30-round runs at lr 0.03 (median / 90th percentile): FedProto 5.6 / 6.7 (Fashion-MNIST) and 4.4 / 5.9
# (HAPT); ProtoNorm 23 / 38 and 15 / 36 (its features are scaled up by s). Like C, each bound sits near the 90th
# percentile, so clipping alone costs little and the curve shows the cost of the noise.
PROTOTYPE_CLIP = {"fedproto": 7.0, "protonorm": 40.0}
# measured seconds of one real-size run per method (one core, `fedpal run` process included, other work sharing
# the 2-core machine): the --plan estimate
SECONDS = {
    "fmnist": {"fedavg": 20, "fedavg_ft": 24, "fedper": 20, "lg_fedavg": 22, "fedproto": 21, "protonorm": 25},
    "hapt": {"fedavg": 11, "fedavg_ft": 14, "fedper": 12, "lg_fedavg": 12, "fedproto": 15, "protonorm": 16},
}
SECONDS["fmnist"]["ditto"], SECONDS["hapt"]["ditto"] = 48, 26
TINY_SECONDS = 6  # one --tiny run


@dataclass(frozen=True)
class Scope:
    """Which cells a benchmark invocation covers."""

    settings: tuple[str, ...]
    methods: tuple[str, ...]
    rules: tuple[str, ...]  # weight-sharing methods
    prototype_rules: tuple[str, ...]  # prototype methods
    attacks: tuple[str, ...]
    fedavg_fractions: tuple[float, ...]
    epsilons: tuple[float, ...]
    dp_methods: tuple[str, ...]
    overrides: tuple[str, ...] = ()  # on every run


# DP curve: every method; fedpal's [privacy] clips and noises model updates and prototype payloads alike (per class
# a noised sum over a noised holder count, one Gaussian mechanism a round, docs/config.md)
FULL = Scope(tuple(CONFIGS), METHODS, RULES, PROTOTYPE_RULES, ATTACKS, FEDAVG_FRACTIONS, EPSILONS, METHODS)
TINY = Scope(
    tuple(CONFIGS),
    ("fedavg", "fedper", "fedproto"),
    ("mean", "multikrum"),
    ("mean", "median"),
    ("sign_flip", "backdoor", "proto_poison"),
    (0.1,),
    (1.0, math.inf),
    ("fedavg", "fedproto"),
    ("data.max_samples=2000", "train.rounds=2", "eval.every=1"),
)


@dataclass(frozen=True)
class Cell:
    """One condition of the grid, run once per seed."""

    setting: str
    method: str
    rule: str = "mean"
    attack: str = "none"
    fraction: float = 0.0  # the malicious share (also sizes Multi-Krum's f, so a clean Multi-Krum cell has one)
    epsilon: float | None = None  # DP target (inf: clipping only); None: no [privacy]

    @property
    def name(self) -> str:
        if self.epsilon is not None:
            return "dp_epsinf" if math.isinf(self.epsilon) else f"dp_eps{self.epsilon:g}"
        rule = f"multikrum_f{byzantine(self.fraction)}" if self.rule == "multikrum" else self.rule
        return f"{rule}_none" if self.attack == "none" else f"{rule}_{self.attack}_{round(100 * self.fraction)}"


def byzantine(fraction: float) -> int:
    """Malicious clients among 20 at this share, rounded as fedpal's attack rounds it (halves up)."""
    return math.floor(fraction * NUM_CLIENTS + 0.5)


def clean_control(cell: Cell) -> Cell:
    """The same (method, rule) without attack: Multi-Krum keeps the f it assumed under attack."""
    return Cell(cell.setting, cell.method, cell.rule, "none", cell.fraction if cell.rule == "multikrum" else 0.0)


def rules_for(method: str, scope: Scope) -> tuple[str, ...]:
    return scope.prototype_rules if method in PROTOTYPE_METHODS else scope.rules


def attacks_for(method: str, scope: Scope) -> tuple[str, ...]:
    """Prototype methods send no model update, so the update attacks have nothing to act on (fedpal's attack leaves
    their replies as they are): they get the data attacks and prototype poisoning; weight-sharing methods get all
    but prototype poisoning."""
    if method in PROTOTYPE_METHODS:
        return tuple(a for a in scope.attacks if a in (*DATA_ATTACKS, "proto_poison"))
    return tuple(a for a in scope.attacks if a != "proto_poison")


def cells(scope: Scope, setting: str) -> list[Cell]:
    """Every cell of one setting, clean controls first within each (method, rule)."""
    out: list[Cell] = []
    for method in scope.methods:
        for rule in rules_for(method, scope):
            fractions = (FRACTION, *scope.fedavg_fractions) if method == "fedavg" else (FRACTION,)
            for fraction in fractions:
                out.append(clean_control(Cell(setting, method, rule, fraction=fraction)))
                out += [Cell(setting, method, rule, attack, fraction) for attack in attacks_for(method, scope)]
        if method in scope.dp_methods:
            out += [Cell(setting, method, epsilon=eps) for eps in scope.epsilons]
    return list(dict.fromkeys(out))


def run_path(root: Path, cell: Cell, seed: int) -> Path:
    return root / cell.setting / cell.method / cell.name / f"seed{seed}"


def tune_path(root: Path, setting: str, method: str, lr: float) -> Path:
    return root / setting / method / f"tune_lr{lr:g}"


def run_rounds(setting: str, extra: Iterable[str]) -> int:
    return load_config(CONFIGS[setting], list(extra)).train.rounds


_Z_CACHE: dict[tuple[float, int], float] = {}


def noise_multiplier(epsilon: float, rounds: int) -> float:
    """z whose ε after ``rounds`` rounds of all 20 of 20 clients (sampling without replacement, q = 1: no
    amplification) stays within ``epsilon`` at δ, by the accountant the runs use (RDP); 0 for ε = ∞."""
    if math.isinf(epsilon):
        return 0.0
    if (epsilon, rounds) not in _Z_CACHE:
        from fedpal.privacy.accountant import calibrate_noise_multiplier

        _Z_CACHE[(epsilon, rounds)] = calibrate_noise_multiplier(
            epsilon,
            delta=DELTA,
            rounds=rounds,
            sample_size=NUM_CLIENTS,
            population_size=NUM_CLIENTS,
            sampling="without_replacement",
            accounting="rdp",
        )
    return _Z_CACHE[(epsilon, rounds)]


def cell_overrides(cell: Cell, lr: float, seed: int, rounds: int) -> list[str]:
    out = [f"algorithm.name={cell.method}", f"train.lr={lr}", f"seed={seed}"]
    if cell.rule != "mean":
        key = "prototype_rule" if cell.method in PROTOTYPE_METHODS else "rule"
        out.append(f"aggregation.{key}={cell.rule}")
        if cell.rule == "multikrum":
            out.append(f"aggregation.byzantine={byzantine(cell.fraction)}")
    if cell.attack != "none":
        out += [f"attack.type={cell.attack}", f"attack.fraction={cell.fraction}"]
    if cell.epsilon is not None:
        z = noise_multiplier(cell.epsilon, rounds)
        out += [f"privacy.clip={DP_CLIP}", f"privacy.noise_multiplier={z!r}", f"privacy.delta={DELTA}"]
        if cell.method in PROTOTYPE_CLIP:
            out.append(f"privacy.prototype_clip={PROTOTYPE_CLIP[cell.method]}")
    return out


def launch(config: Path, path: Path, overrides: list[str], retry_failed: bool) -> float:
    """One run; a crash is written to failed.txt (counted as a failure in the report) instead of stopping the
    benchmark, and not retried unless asked (a seeded run crashes again)."""
    failed = path / "failed.txt"
    if failed.exists() and not retry_failed:
        return 0.0
    try:
        return run_config(config, path, overrides)
    except RuntimeError as error:
        path.mkdir(parents=True, exist_ok=True)
        failed.write_text(f"{error}\n")
        print(f"FAILED {path}: {error}", flush=True)
        return math.nan


# ------------------------------------------------------------------------------------------------ tuning


def chosen_lr(root: Path, setting: str, method: str) -> tuple[float | None, dict[float, float]]:
    """The grid's learning rate with the best validation score (ties: the smaller), once all its tuning runs ended,
    and every point's score."""
    scores: dict[float, float] = {}
    for lr in LRS:
        path = tune_path(root, setting, method, lr)
        if (path / "summary.json").exists():
            scores[lr] = validation_score(read_run(path))
        elif (path / "failed.txt").exists():
            scores[lr] = -math.inf
        else:
            return None, scores
    return max(LRS, key=lambda lr: (scores[lr], -lr)), scores


# ------------------------------------------------------------------------------------------------ plan


def duration(seconds: float) -> str:
    return f"~{seconds / 3600:.1f} CPU h" if seconds >= 3600 else f"~{seconds / 60:.0f} CPU min"


def plan_lines(scope: Scope, root: Path, seeds: list[int], jobs: int, tiny: bool) -> list[str]:
    lines = [f"Plan: settings {', '.join(scope.settings)}; methods {', '.join(scope.methods)}; seeds {seeds}"]
    total_runs, total_seconds, done = 0, 0.0, 0
    for setting in scope.settings:
        grid = cells(scope, setting)
        kinds = {
            "tuning (3 learning rates x method, seed 100)": [(m, 1) for m in scope.methods for _ in LRS],
            "clean controls": [(c.method, len(seeds)) for c in grid if c.attack == "none" and c.epsilon is None],
            f"attacked at {FRACTION:.0%}": [
                (c.method, len(seeds)) for c in grid if c.fraction == FRACTION and c.attack != "none"
            ],
            "FedAvg attacked at other shares": [
                (c.method, len(seeds)) for c in grid if c.attack != "none" and c.fraction != FRACTION
            ],
            "privacy curve": [(c.method, len(seeds)) for c in grid if c.epsilon is not None],
        }
        lines.append(f"- {setting}: {len(grid)} cells")
        for kind, items in kinds.items():
            runs = sum(n for _, n in items)
            seconds = sum(n * (TINY_SECONDS if tiny else SECONDS[setting][m]) for m, n in items)
            lines.append(f"    {kind}: {runs} runs, {duration(seconds)}")
            total_runs += runs
            total_seconds += seconds
        done += sum(1 for c in grid for s in seeds if (run_path(root, c, s) / "summary.json").exists())
        done += sum(
            1 for m in scope.methods for lr in LRS if (tune_path(root, setting, m, lr) / "summary.json").exists()
        )
    lines.append(
        f"Total: {total_runs} runs, {duration(total_seconds)} (measured seconds per run of each method, one core), "
        f"{duration(total_seconds / max(jobs, 1)).replace('CPU ', '')} wall with --jobs {jobs}; "
        f"already finished: {done}."
    )
    return lines


# ------------------------------------------------------------------------------------------------ reading runs


@dataclass
class Outcome:
    """One finished (or crashed) run, as the report needs it."""

    seed: int
    last: dict[str, Any]  # the last evaluation of metrics.jsonl
    summary: dict[str, Any]
    failed: bool  # rejected a reply, non-finite validation loss, or crashed

    @property
    def malicious(self) -> list[int]:
        return list(self.last.get("malicious_clients") or [])

    def accuracy(self, clients: Iterable[int] | None = None) -> float:
        """Sample-weighted personalized test accuracy at the last round over ``clients`` (default: the benign
        ones, which is every client without an attack): sum of correct / sum of samples, as ``benign`` is."""
        if self.failed or "personalized" not in self.last:
            return math.nan
        own = self.last["personalized"]
        keep = [c for c in range(len(own["per_client_samples"])) if c not in set(self.malicious)]
        keep = keep if clients is None else list(clients)
        acc = np.asarray(own["per_client_accuracy"], dtype=float)[keep]
        samples = np.asarray(own["per_client_samples"], dtype=float)[keep]
        return float((acc * samples).sum() / samples.sum()) if samples.sum() else math.nan

    @property
    def benign_clients(self) -> list[int]:
        n = len(self.last["personalized"]["per_client_samples"])
        return [c for c in range(n) if c not in set(self.malicious)]

    @property
    def asr(self) -> float:
        value = (self.last.get("backdoor") or {}).get("attack_success_rate")
        return float(value) if isinstance(value, int | float) and not self.failed else math.nan

    @property
    def epsilon(self) -> float:
        value = (self.summary.get("privacy") or {}).get("epsilon")
        return float(value) if isinstance(value, int | float) else math.nan


def read_outcome(path: Path, seed: int) -> Outcome | None:
    if (path / "summary.json").exists():
        record: RunRecord = read_run(path)
        last = record.metrics[-1] if record.metrics else {}
        return Outcome(seed, last, record.summary, diverged(record))
    if (path / "failed.txt").exists():
        return Outcome(seed, {}, {}, True)
    return None


class Results:
    """Every outcome of the scope, by cell and seed."""

    def __init__(self, root: Path, scope: Scope, seeds: list[int]) -> None:
        self.scope, self.seeds = scope, seeds
        self.by_cell: dict[Cell, dict[int, Outcome]] = {}
        for setting in scope.settings:
            for cell in cells(scope, setting):
                found = {s: read_outcome(run_path(root, cell, s), s) for s in seeds}
                self.by_cell[cell] = {s: o for s, o in found.items() if o is not None}

    def get(self, cell: Cell) -> dict[int, Outcome]:
        return self.by_cell.get(cell, {})

    def accuracy(self, cell: Cell) -> tuple[float, float, int, int]:
        """(mean, std) of the benign accuracy over the seeds that did not fail, how many failed, how many ran."""
        outs = self.get(cell)
        values = [o.accuracy() for o in outs.values() if not o.failed]
        values = [v for v in values if not math.isnan(v)]
        failed = sum(o.failed for o in outs.values())
        if not values:
            return math.nan, math.nan, failed, len(outs)
        return mean(values), pstdev(values), failed, len(outs)

    def change(self, cell: Cell, control: Cell | None = None) -> tuple[list[float], int]:
        """Per seed, the cell's benign accuracy minus its control's (default: its clean control) on the same benign
        clients, over the seeds where both ran and neither failed; and how many of the cell's seeds failed."""
        control = clean_control(cell) if control is None else control
        outs, base = self.get(cell), self.get(control)
        diffs = []
        for seed in self.seeds:
            if seed in outs and seed in base and not outs[seed].failed and not base[seed].failed:
                attacked = outs[seed]
                diffs.append(attacked.accuracy() - base[seed].accuracy(attacked.benign_clients))
        return [d for d in diffs if not math.isnan(d)], sum(o.failed for o in outs.values())

    def asr(self, cell: Cell) -> list[float]:
        return [o.asr for o in self.get(cell).values() if not math.isnan(o.asr)]


def rate_text(values: list[float]) -> str:
    """A rate's mean over seeds with its bootstrap 95 % interval, in percent: '87.1 [80.2, 93.0]'."""
    if not values:
        return "–"
    m, low, high = paired_interval(values)
    return f"{100 * m:.1f}" if math.isnan(low) else f"{100 * m:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def cell_text(results: Results, cell: Cell, with_change: bool = True) -> str:
    """'81.2 ± 0.4 (−3.1 [−4.0, −2.2])' in percent and points, with failed seeds counted."""
    m, s, failed, ran = results.accuracy(cell)
    if ran == 0:
        return "not run"
    text = "–" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}"
    if with_change and cell.attack != "none":
        diffs, _ = results.change(cell)
        if diffs:
            text += f" ({format_interval(*paired_interval(diffs))})"
    if failed:
        text += f" **{failed}/{ran} failed**"
    return text


# ------------------------------------------------------------------------------------------------ report


def clean_table(results: Results, setting: str) -> list[str]:
    scope = results.scope
    lines = [
        "Clean runs: benign = all clients' accuracy, mean ± std over seeds; in brackets the rule's cost against "
        "plain averaging (the rule minus mean, paired by seed, bootstrap 95 % interval, points).",
        "",
        "| method | " + " | ".join(scope.rules) + " |",
        "|---|" + "---|" * len(scope.rules),
    ]
    for method in scope.methods:
        row = [method]
        for rule in scope.rules:
            if rule not in rules_for(method, scope):
                row.append("n/a")
                continue
            cell = clean_control(Cell(setting, method, rule, fraction=FRACTION))
            text = cell_text(results, cell, with_change=False)
            if rule != "mean":
                diffs, _ = results.change(cell, Cell(setting, method))
                if diffs:
                    text += f" ({format_interval(*paired_interval(diffs))})"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def attack_table(results: Results, setting: str, attack: str) -> list[str]:
    scope = results.scope
    lines = [f"#### {attack}, {FRACTION:.0%} malicious", ""]
    lines += ["| method | " + " | ".join(scope.rules) + " |", "|---|" + "---|" * len(scope.rules)]
    for method in scope.methods:
        if attack not in attacks_for(method, scope):
            continue
        row = [method]
        for rule in scope.rules:
            if rule not in rules_for(method, scope):
                row.append("n/a")
                continue
            cell = Cell(setting, method, rule, attack, FRACTION)
            text = cell_text(results, cell)
            if attack == "backdoor":
                asr = results.asr(cell)
                if asr:
                    text += f"; ASR {rate_text(asr)}"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def fraction_table(results: Results, setting: str) -> list[str]:
    scope = results.scope
    if "fedavg" not in scope.methods:
        return []
    lines = [
        "#### FedAvg at 10 / 20 / 30 % malicious",
        "",
        "| attack | rule | " + " | ".join(f"{f:.0%}" for f in sorted((FRACTION, *scope.fedavg_fractions))) + " |",
        "|---|---|" + "---|" * (1 + len(scope.fedavg_fractions)),
    ]
    for attack in attacks_for("fedavg", scope):
        for rule in scope.rules:
            row = [attack, rule]
            for fraction in sorted((FRACTION, *scope.fedavg_fractions)):
                cell = Cell(setting, "fedavg", rule, attack, fraction)
                text = cell_text(results, cell)
                if attack == "backdoor" and results.asr(cell):
                    text += f"; ASR {100 * mean(results.asr(cell)):.1f}"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def verdict(ok: bool | None) -> str:
    return "incomplete" if ok is None else ("**met**" if ok else "**not met**")


def target_checks(results: Results, setting: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Targets (a)-(c) of the issue, each with its numbers: lines for the README and records for the JSON."""
    scope = results.scope
    lines = [f"#### Targets, {setting}", ""]
    records: list[dict[str, Any]] = []

    def record(target: str, subject: str, ok: bool | None, numbers: str) -> None:
        lines.append(f"- ({target}) {subject}: {verdict(ok)} — {numbers}")
        records.append({"setting": setting, "target": target, "subject": subject, "met": ok, "numbers": numbers})

    # (a) each attack costs plain averaging >= 15 points (backdoor: success >= 50 %)
    for method in ("fedavg", *PROTOTYPE_METHODS):
        if method not in scope.methods or "mean" not in rules_for(method, scope):
            continue
        for attack in attacks_for(method, scope):
            if method in PROTOTYPE_METHODS and attack != "proto_poison":
                continue  # the data attacks are checked on FedAvg, the plain averaging of weights
            cell = Cell(setting, method, "mean", attack, FRACTION)
            diffs, failed = results.change(cell)
            ran = len(results.get(cell))
            subject = f"{attack} against plain averaging ({method}, mean, {FRACTION:.0%})"
            if attack == "backdoor":
                asr = results.asr(cell)
                ok = None if len(asr) + failed < len(results.seeds) else bool(asr) and mean(asr) >= 0.5
                record("a", subject, ok, f"ASR {rate_text(asr)} % (≥ 50 % wanted)")
                continue
            if ran and failed == ran:
                record("a", subject, True, f"every seed failed ({failed}/{ran}): the attack broke the run")
                continue
            m, low, high = paired_interval(diffs)
            ok = None if len(diffs) + failed < len(results.seeds) else -m >= 0.15
            note = f"; {failed}/{ran} seeds failed (the attack broke them)" if failed else ""
            record("a", subject, ok, f"change {format_interval(m, low, high)} points (≤ −15 wanted){note}")
    # (b) at 20 %, the best rule within 5 points of its own clean run
    for method in scope.methods:
        for attack in ("sign_flip", "gaussian", "label_flip", "proto_poison"):
            if attack not in attacks_for(method, scope):
                continue
            costs: dict[str, tuple[float, float, float]] = {}
            broken: list[str] = []
            complete = True
            for rule in rules_for(method, scope):
                cell = Cell(setting, method, rule, attack, FRACTION)
                diffs, failed = results.change(cell)
                if failed:
                    broken.append(rule)
                elif len(diffs) < len(results.seeds):
                    complete = False
                elif diffs:
                    costs[rule] = paired_interval(diffs)
            subject = f"best rule under {attack} ({method}, {FRACTION:.0%})"
            failed_note = f"; failed in some seed (a failure): {', '.join(broken)}" if broken else ""
            if not costs:
                record("b", subject, None if not broken or not complete else False, f"no complete rule{failed_note}")
                continue
            best = max(costs, key=lambda r: costs[r][0])
            others = ", ".join(f"{r} {100 * costs[r][0]:+.1f}" for r in costs if r != best)
            ok = -costs[best][0] <= 0.05 if complete else None
            record(
                "b",
                subject,
                ok,
                f"{best}: {format_interval(*costs[best])} points against its clean run (≥ −5 wanted); "
                f"others: {others or '–'}{failed_note}",
            )
    # (c) robust rules cost <= 2 points without attack
    for method in scope.methods:
        for rule in rules_for(method, scope):
            if rule == "mean":
                continue
            cell = clean_control(Cell(setting, method, rule, fraction=FRACTION))
            diffs, failed = results.change(cell, Cell(setting, method))
            ran = len(results.get(cell))
            subject = f"{rule} without attack ({method})"
            if failed:
                record("c", subject, False, f"{failed}/{ran} clean runs failed")
                continue
            m, low, high = paired_interval(diffs)
            ok = None if len(diffs) < len(results.seeds) else -m <= 0.02
            record("c", subject, ok, f"{format_interval(m, low, high)} points against mean (≥ −2 wanted)")
    return [*lines, ""], records


def overhead_lines(out: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Target (d), from overhead.py's results (run separately)."""
    path = out / "overhead.json"
    if not path.exists():
        return [
            "#### Target (d): reducer overhead",
            "",
            "Not measured yet: `python benchmarks/robustness/overhead.py`.",
            "",
        ], []
    data = json.loads(path.read_text())
    lines = [
        "#### Target (d): reducer overhead ≤ 5 % of a round",
        "",
        f"From `overhead.py` ({data.get('note', '')}): each rule's reduction of one round's 20 real FedAvg replies, "
        "median of repeats, against the median FedAvg round (local training of 20 clients plus the mean).",
        "",
        "| model | parameters | round (s) | rule | reduction (s) | extra over mean / round | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    records = []
    for entry in data["models"]:
        for rule, seconds in entry["rules"].items():
            extra = (seconds - entry["rules"]["mean"]) / entry["round_seconds"]
            ok = extra <= 0.05
            lines.append(
                f"| {entry['label']} | {entry['parameters']:,} | {entry['round_seconds']:.3f} | {rule} | {seconds:.4f} "
                f"| {100 * extra:.2f} % | {verdict(ok) if rule in RULES and rule != 'mean' else '–'} |"
            )
            if rule in RULES and rule != "mean":
                records.append({"target": "d", "subject": f"{rule}, {entry['label']}", "met": ok, "extra": extra})
    return [*lines, ""], records


def privacy_section(results: Results, setting: str, rounds: int) -> tuple[list[str], dict[str, Any]]:
    scope = results.scope
    methods = [m for m in scope.dp_methods if m in scope.methods]
    if not methods:
        return [], {}
    header = ["ε (δ = 1e-5)", "z", "noise std on the mean / C"]
    lines = [
        "#### Privacy-utility curve (no attack; accuracy of all clients, mean ± std; in brackets the change against "
        "the same method without [privacy], paired by seed)",
        "",
        "| " + " | ".join(header + methods) + " |",
        "|" + "---|" * (len(header) + len(methods)),
    ]
    curve: dict[str, Any] = {"rounds": rounds, "clip": DP_CLIP, "delta": DELTA, "points": []}
    reference = ["no DP", "–", "–"]
    curve["no_dp"] = {}
    for method in methods:
        reference.append(cell_text(results, Cell(setting, method), with_change=False))
        curve["no_dp"][method] = results.accuracy(Cell(setting, method))[0]
    lines.append("| " + " | ".join(reference) + " |")
    for eps in scope.epsilons:
        z = noise_multiplier(eps, rounds)
        row = ["∞ (clip only)" if math.isinf(eps) else f"{eps:g}", f"{z:.2f}", f"{z / NUM_CLIENTS:.3f}"]
        point: dict[str, Any] = {"epsilon": eps if math.isfinite(eps) else "inf", "z": z, "methods": {}}
        for method in methods:
            cell = Cell(setting, method, epsilon=eps)
            m, s, failed, ran = results.accuracy(cell)
            diffs, _ = results.change(cell, Cell(setting, method))
            text = cell_text(results, cell, with_change=False)
            if diffs:
                text += f" ({format_interval(*paired_interval(diffs))})"
            spent = [o.epsilon for o in results.get(cell).values() if not math.isnan(o.epsilon)]
            row.append(text)
            point["methods"][method] = {
                "mean": m,
                "std": s,
                "failed": failed,
                "runs": ran,
                "change": paired_interval(diffs) if diffs else None,
                "reported_epsilon": max(spent) if spent else None,
            }
        curve["points"].append(point)
        lines.append("| " + " | ".join(row) + " |")
    spent_all = [
        p["methods"][m]["reported_epsilon"]
        for p in curve["points"]
        for m in methods
        if isinstance(p["epsilon"], float) and p["methods"][m]["reported_epsilon"] is not None
    ]
    targets_ok = all(
        p["methods"][m]["reported_epsilon"] <= p["epsilon"] * (1 + 1e-6)
        for p in curve["points"]
        for m in methods
        if isinstance(p["epsilon"], float) and p["methods"][m]["reported_epsilon"] is not None
    )
    lines += ["", f"ε the runs themselves reported never exceeded its target: {targets_ok} ({len(spent_all)} runs)."]
    return [*lines, ""], curve


def shared_weights(results: Results) -> int:
    """Floats in one FedAvg reply (its upload bytes per round / 20 clients / 4 bytes), from a finished clean run;
    the MLP's ~184k without one."""
    for setting in results.scope.settings:
        for outcome in results.get(Cell(setting, "fedavg")).values():
            up = (outcome.summary.get("bytes_per_round") or {}).get("up")
            if isinstance(up, int | float) and up > 0:
                return int(up / NUM_CLIENTS / 4)
    return 184_000


def privacy_statement(results: Results, rounds: int) -> list[str]:
    """What user-level DP means with 20 clients, with this benchmark's numbers."""
    z1, z8 = noise_multiplier(1.0, rounds), noise_multiplier(8.0, rounds)
    from fedpal.privacy.accountant import calibrate_noise_multiplier

    population = 1000
    z_large = calibrate_noise_multiplier(
        8.0, delta=DELTA, rounds=rounds, sample_size=NUM_CLIENTS, population_size=population, sampling="poisson"
    )
    params = shared_weights(results)  # FedAvg's; FedPer shares most of them, LG-FedAvg only the head
    dim = load_config(CONFIGS["fmnist"], []).model.feature_dim  # the prototypes' width
    root_d = math.sqrt(params)
    accumulated = z8 / NUM_CLIENTS * root_d * math.sqrt(rounds)  # the noise summed over the rounds, at ε = 8
    verdict_text = (
        f"even summed over all {rounds} rounds the signal (at most {rounds}·C) stays below the accumulated noise "
        f"(about {accumulated:.0f}·C at ε = 8), so the shared model can barely learn at the finite ε of the curve."
        if accumulated > rounds
        else f"summed over {rounds} rounds the signal (up to {rounds}·C) can exceed the accumulated noise (about "
        f"{accumulated:.0f}·C at ε = 8), so a consistent update direction can still be learnt at large ε."
    )
    return [
        "**What user-level DP can and cannot mean here.** The guarantee is client-level (user-level) DP of what is "
        f"released, the {rounds} noised aggregates and every model computed from them: replacing everything one "
        "client holds by anything else changes their distribution by at most (ε, δ = 1e-5). It is central DP: the "
        "server that adds the noise is trusted (secure aggregation would hide the single replies from it, not the "
        "noised sum). With a fixed federation of 20 clients the neighbouring relation is replace-one: the guarantee "
        "protects what a client's data are, not whether it took part (which is public anyway).",
        f"- All 20 clients take part in every round, so the sampling ratio is q = 1: sampling gives no "
        f"amplification, every round spends a full Gaussian mechanism and the {rounds} rounds compose. Calibrated "
        f"with fedpal.privacy.accountant (RDP, sampling without replacement) that needs z = {z1:.1f} for ε = 1 and "
        f"z = {z8:.1f} for ε = 8 (replacing one client's data can move the clipped sum by 2C, so these are twice "
        "the z that add-or-remove-one, sensitivity C, would need).",
        f"- The noise on the mean update has std z·C/20 per coordinate: {z1 / NUM_CLIENTS:.2f}·C at ε = 1, "
        f"{z8 / NUM_CLIENTS:.2f}·C at ε = 8; over FedAvg's {params:,} shared weights its norm is about "
        f"{z1 / NUM_CLIENTS * root_d:.0f}·C and {z8 / NUM_CLIENTS * root_d:.0f}·C, against a clipped mean update "
        f"of norm at most C. That is arithmetic, not a measurement: {verdict_text} What accuracy remains comes from "
        "what clients compute from their own data and keep (FedAvg-FT's fine-tuning, FedPer's "
        "heads, LG-FedAvg's backbones, Ditto's personal models). Those parts are never released, so the guarantee "
        "does not speak about them, and a client's own predictions are not private from itself.",
        f"- Useful user-level DP needs many clients per round, not only many clients: drawing the 20 clients of a "
        f"round by Poisson sampling from {population:,} (q = {NUM_CLIENTS / population:g}) lowers the z for ε = 8 "
        f"over {rounds} rounds to {z_large:.2f}, yet the noise on a 20-client mean would still have norm about "
        f"{z_large / NUM_CLIENTS * root_d:.0f}·C; only cohorts of hundreds to thousands of clients per round bring "
        "z·C/m near C/√d (pfl-research simulates that with a noise cohort; fedpal has no such option).",
        f"- Prototypes: per class, the noised sum of C_p-clipped prototypes is divided by a noised count of "
        f"holders m_c, so the noise on a class's mean has norm about z·C_p·√(2K·D)/m_c against a mean of norm at most "
        f"C_p. For Fashion-MNIST (K = 10, D = {dim}) with all 20 clients holding a class that is "
        f"{z1 * math.sqrt(2 * 10 * dim) / NUM_CLIENTS:.0f}·C_p at ε = 1 and "
        f"{z8 * math.sqrt(2 * 10 * dim) / NUM_CLIENTS:.0f}·C_p at ε = 8, every round (the prototypes are "
        "recomputed each round, so no averaging over rounds helps): the global prototypes are mostly noise, and what "
        "remains is what each client's own training keeps.",
        f"- The bounds are fixed from clean runs (choosing them on private data would itself spend privacy): C = "
        f"{DP_CLIP} for model updates, C_p = {PROTOTYPE_CLIP['fedproto']:g} (FedProto) and "
        f"{PROTOTYPE_CLIP['protonorm']:g} (ProtoNorm) for class prototypes, whose per-class sums get noise of std "
        "z·C_p·√(2K) (a client may change up to K classes' sums and counts); ε = ∞ is clipping without noise "
        "(no guarantee).",
        "",
    ]


def backdoor_section(results: Results, setting: str) -> list[str]:
    scope = results.scope
    methods = [
        m for m in (*FULL_SHARING, *PARTIAL_SHARING) if m in scope.methods and "backdoor" in attacks_for(m, scope)
    ]
    if not methods:
        return []
    lines = [
        f"#### Backdoor: attack success rate at {FRACTION:.0%} malicious (mean over seeds [bootstrap 95 % interval], "
        "% of the benign clients' triggered non-target test samples classified as the target)",
        "",
        "| sharing | method | " + " | ".join(scope.rules) + " |",
        "|---|---|" + "---|" * len(scope.rules),
    ]
    for method in methods:
        kind = "full" if method in FULL_SHARING else "partial"
        row = [kind, method]
        for rule in scope.rules:
            if rule not in rules_for(method, scope):
                row.append("n/a")
                continue
            asr = results.asr(Cell(setting, method, rule, "backdoor", FRACTION))
            row.append(rate_text(asr))
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Partial minus full sharing, under mean: the ASR difference per seed (same data, same malicious clients), "
        "mean [bootstrap 95 % interval] in points; *lower* / *higher* when the interval excludes 0.",
        "",
    ]

    def asr_by_seed(method: str) -> dict[int, float]:
        outs = results.get(Cell(setting, method, "mean", "backdoor", FRACTION)).values()
        return {o.seed: o.asr for o in outs if not math.isnan(o.asr)}

    for method in (m for m in methods if m in PARTIAL_SHARING):
        mine, against = asr_by_seed(method), []
        for full in (m for m in methods if m in FULL_SHARING):
            theirs = asr_by_seed(full)
            diffs = [mine[s] - theirs[s] for s in results.seeds if s in mine and s in theirs]
            if not diffs:
                continue
            m, low, high = paired_interval(diffs)
            clear = "one seed" if math.isnan(low) else "lower" if high < 0 else "higher" if low > 0 else "not separated"
            against.append(f"− {full}: {format_interval(m, low, high)} ({clear})")
        if against:
            lines.append(f"- {method} " + "; ".join(against))
    return [*lines, ""]


def flattening_lines(root: Path, results: Results, setting: str) -> list[str]:
    """How much the clean runs' validation accuracy still moved over the last third of the rounds."""
    parts = []
    for method in results.scope.methods:
        moves = []
        for seed in results.seeds:
            path = run_path(root, Cell(setting, method), seed)
            if not (path / "summary.json").exists():
                continue
            metrics = read_run(path).metrics
            if len(metrics) < 2:
                continue
            last_round = metrics[-1]["round"]
            earlier = [m for m in metrics if m["round"] <= last_round * 2 / 3] or metrics[:1]
            moves.append(metrics[-1]["validation"]["accuracy"] - earlier[-1]["validation"]["accuracy"])
        if moves:
            parts.append(f"{method} {100 * mean(moves):+.1f}")
    if not parts:
        return []
    return [
        "Rounds: validation accuracy of the clean mean runs over the last third of the rounds, points (near 0: the "
        f"curve had flattened): {', '.join(parts)}.",
        "",
    ]


def heatmap(results: Results, setting: str, path: Path) -> None:
    """Benign accuracy change against the own clean run, per (method, rule) and attack, at 20 %."""
    scope = results.scope
    rows = [(m, r) for m in scope.methods for r in rules_for(m, scope)]
    cols = [a for a in scope.attacks]
    values = np.full((len(rows), len(cols)), np.nan)
    labels = [["" for _ in cols] for _ in rows]
    for i, (method, rule) in enumerate(rows):
        for j, attack in enumerate(cols):
            if attack not in attacks_for(method, scope):
                continue
            cell = Cell(setting, method, rule, attack, FRACTION)
            diffs, failed = results.change(cell)
            if diffs:
                values[i, j] = 100 * mean(diffs)
                labels[i][j] = f"{values[i, j]:.0f}"
            if failed:
                labels[i][j] += f"\n{failed} failed"
    fig = Figure(figsize=(1.1 * len(cols) + 3, 0.32 * len(rows) + 1.8), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="RdBu", vmin=-60, vmax=60, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if labels[i][j]:
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [f"{m} / {r}" for m, r in rows], fontsize=8)
    ax.set_title(
        f"{SETTING_TITLES[setting]}, {FRACTION:.0%} malicious:\nbenign accuracy change vs own clean run (points)",
        fontsize=10,
    )
    fig.colorbar(image, ax=ax, shrink=0.6)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def privacy_plot(curves: dict[str, dict[str, Any]], path: Path) -> None:
    settings = [s for s, c in curves.items() if c]
    if not settings:
        return
    fig = Figure(figsize=(5.5 * len(settings), 4), layout="constrained")
    axes = fig.subplots(1, len(settings), squeeze=False)[0]
    for ax, setting in zip(axes, settings, strict=True):
        points = curves[setting]["points"]
        xs = list(range(len(points)))
        for i, method in enumerate(points[0]["methods"]):
            ys = [100 * p["methods"][method]["mean"] for p in points]
            errs = [100 * p["methods"][method]["std"] for p in points]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, color=f"C{i}", label=method)
            no_dp = curves[setting]["no_dp"].get(method, math.nan)
            if not math.isnan(no_dp):
                ax.axhline(100 * no_dp, color=f"C{i}", ls=":", lw=1)
        ax.set_xticks(xs, [f"{p['epsilon']:g}" if p["epsilon"] != "inf" else "∞\n(clip only)" for p in points])
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_ylabel("accuracy, all clients (%)")
        ax.set_title(f"{SETTING_TITLES[setting]} (dotted: without DP)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


TUNING_HEADING = "## Tuning (learning rate, clean runs with mean, seed 100, validation accuracy)"


def report(root: Path, scope: Scope, seeds: list[int], out: Path, elapsed: float | None, extra: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = Results(root, scope, seeds)
    lrs = {s: {m: chosen_lr(root, s, m) for m in scope.methods} for s in scope.settings}
    wall = [
        float(read_run(p.parent).summary.get("wall_seconds") or 0.0)
        for s in scope.settings
        for p in (root / s).rglob("summary.json")
    ]
    expected = sum(len(cells(scope, s)) * len(seeds) for s in scope.settings)
    present = sum(len(v) for v in results.by_cell.values())
    parts = [
        "# Robustness & privacy benchmark results",
        "",
        "Generated by `python benchmarks/robustness/run.py` (questions, settings and protocol in ../README.md and in "
        "the script's docstring). Accuracy is the benign clients' personalized test accuracy at the last round "
        "(sample-weighted: correct / samples over the clients the attack does not control; every client without an "
        "attack), mean ± std over the seeds that did not fail. In brackets: the change against the same (method, "
        "rule)'s clean run, per seed on the same benign clients, mean [bootstrap 95 % interval] in points. Failed "
        "runs (a rejected reply, a non-finite validation loss, a crash) are counted in bold and left out of means.",
        "",
        f"Runs: {present} of {expected} reported runs present, seeds {seeds}; all finished runs together, tuning "
        f"included: {sum(wall) / 3600:.2f} hours of one core ({len(wall)} runs).",
        "",
    ]
    if elapsed is not None:
        parts += [f"Wall time of the last invocation: {elapsed / 60:.1f} min.", ""]
    parts += [TUNING_HEADING, ""]
    parts += [
        "| setting | method | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " | chosen |",
        "|---|---|" + "---|" * (len(LRS) + 1),
    ]
    for setting in scope.settings:
        for method in scope.methods:
            pick, scores = lrs[setting][method]
            cells_ = [f"{100 * scores[lr]:.1f}" if lr in scores and math.isfinite(scores[lr]) else "–" for lr in LRS]
            parts.append(
                f"| {setting} | {method} | " + " | ".join(cells_) + f" | {pick if pick is not None else '?'} |"
            )
    parts.append("")
    all_targets: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    for setting in scope.settings:
        rounds = run_rounds(setting, [*scope.overrides, *extra])
        parts += [f"## {SETTING_TITLES[setting]}", ""]
        parts += clean_table(results, setting)
        parts += flattening_lines(root, results, setting)
        for attack in scope.attacks:
            parts += attack_table(results, setting, attack)
        parts += fraction_table(results, setting)
        lines, records = target_checks(results, setting)
        parts += lines
        all_targets += records
        parts += backdoor_section(results, setting)
        lines, curves[setting] = privacy_section(results, setting, rounds)
        parts += lines
        heatmap(results, setting, out / f"attacks_{setting}.png")
        parts += [f"![benign accuracy change per attack, {setting}](attacks_{setting}.png)", ""]
    if any(curves.values()):
        privacy_plot(curves, out / "privacy.png")
        parts += ["## Privacy", "", "![privacy-utility curve](privacy.png)", ""]
        parts += privacy_statement(results, run_rounds(scope.settings[0], [*scope.overrides, *extra]))
    lines, overhead_records = overhead_lines(out)
    parts += ["## Reducer overhead", "", *lines]
    all_targets += overhead_records
    met = sum(t["met"] is True for t in all_targets)
    missed = sum(t["met"] is False for t in all_targets)
    open_ = sum(t["met"] is None for t in all_targets)
    at = parts.index(TUNING_HEADING)
    parts[at:at] = [
        f"Targets checked: {met} met, {missed} not met, {open_} incomplete (each listed with its numbers below).",
        "",
    ]
    (out / "README.md").write_text("\n".join(parts))
    (out / "results.json").write_text(json.dumps(plain_json(results_json(results, lrs, all_targets, curves)), indent=1))
    print("\n".join(parts))


def plain_json(value: Any) -> Any:
    """Standard JSON: NaN and infinities become null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    return value


def results_json(
    results: Results,
    lrs: dict[str, dict[str, tuple[float | None, dict[float, float]]]],
    targets: list[dict[str, Any]],
    curves: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Every cell with its per-seed numbers, the chosen learning rates, the targets and the privacy curves."""
    out_cells = []
    for cell, outs in results.by_cell.items():
        if not outs:
            continue
        diffs = results.change(cell)[0] if cell.attack != "none" else []
        m, s, failed_runs, ran = results.accuracy(cell)
        out_cells.append(
            {
                "setting": cell.setting,
                "method": cell.method,
                "rule": cell.rule,
                "byzantine": byzantine(cell.fraction) if cell.rule == "multikrum" else None,
                "attack": cell.attack,
                "fraction": cell.fraction,
                "epsilon": None if cell.epsilon is None else ("inf" if math.isinf(cell.epsilon) else cell.epsilon),
                "accuracy_mean": m,
                "accuracy_std": s,
                "failed": failed_runs,
                "runs": ran,
                "per_seed": {
                    str(o.seed): {"accuracy": o.accuracy(), "asr": o.asr, "failed": o.failed, "epsilon": o.epsilon}
                    for o in outs.values()
                },
                "change_vs_clean": paired_interval(diffs) if diffs else None,
                "asr": paired_interval(results.asr(cell)) if results.asr(cell) else None,
            }
        )
    return {
        "seeds": results.seeds,
        "learning_rates": {s: {m: pick for m, (pick, _) in v.items()} for s, v in lrs.items()},
        "targets": targets,
        "privacy": curves,
        "cells": out_cells,
    }


# ------------------------------------------------------------------------------------------------ main


def execute(scope: Scope, root: Path, seeds: list[int], jobs: int, extra: list[str], retry_failed: bool) -> None:
    """The tuning runs, then every cell's runs seed by seed, ``jobs`` at a time; finished runs are skipped."""

    def run(config: Path, path: Path, overrides: list[str], stage: str | None = None) -> Job:
        return Job(str(path.relative_to(root)), lambda: launch(config, path, overrides, retry_failed), stage)

    def cell_runs(_: Hashable) -> list[Job]:
        picks = {(s, m): chosen_lr(root, s, m)[0] for s in scope.settings for m in scope.methods}
        rounds = {s: run_rounds(s, extra) for s in scope.settings}
        found = []
        for seed in seeds:
            for setting in scope.settings:
                for cell in cells(scope, setting):
                    lr = picks[(cell.setting, cell.method)]
                    assert lr is not None, f"{cell.setting}/{cell.method} is not tuned"
                    overrides = [*cell_overrides(cell, lr, seed, rounds[cell.setting]), *extra]
                    found.append(run(CONFIGS[cell.setting], run_path(root, cell, seed), overrides))
        return found

    tuning = [
        run(
            CONFIGS[setting],
            tune_path(root, setting, method, lr),
            [f"algorithm.name={method}", f"train.lr={lr}", f"seed={TUNE_SEED}", *extra],
            "tuning",
        )
        for setting in scope.settings
        for method in scope.methods
        for lr in LRS
    ]
    run_jobs(tuning, jobs, cell_runs)


def main() -> int:
    parser = benchmark_parser(__doc__, "runs/robustness", HERE / "results")
    parser.add_argument("--settings", default=",".join(CONFIGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--plan", action="store_true", help="print the runs and their estimated time, run nothing")
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny data, 2 rounds, a few cells, seed 0")
    parser.add_argument("--retry-failed", action="store_true", help="rerun runs that crashed before")
    args = parser.parse_args()
    keep_finished(args)
    base = TINY if args.tiny else FULL
    settings = tuple(s for s in args.settings.split(",") if s in base.settings)
    methods = tuple(m for m in args.methods.split(",") if m in base.methods)
    scope = replace(base, settings=settings, methods=methods)
    seeds = [0] if args.tiny else [int(s) for s in args.seeds.split(",")]
    root, out = Path(args.runs), Path(args.out)
    extra = [*scope.overrides, *args.set]
    if args.plan:
        print("\n".join(plan_lines(scope, root, seeds, args.jobs, args.tiny)))
        return 0
    elapsed = None
    if not args.report_only:
        print("\n".join(plan_lines(scope, root, seeds, args.jobs, args.tiny)), flush=True)
        started = time.perf_counter()
        execute(scope, root, seeds, args.jobs, extra, args.retry_failed)
        elapsed = time.perf_counter() - started
    report(root, scope, seeds, out, elapsed, args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
