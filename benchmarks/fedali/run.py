"""Regenerate the FedAli benchmark on UCI HAPT: MAE pre-training per (setting, seed), every method's learning rate
tuned on validation data, the tuned methods and the controls over paired seeds, then the tables, the paired
intervals, the learning curves and chosen.json under benchmarks/fedali/results/.

    python benchmarks/fedali/run.py                 # everything (finished runs are kept), then the report
    python benchmarks/fedali/run.py --report-only   # only rebuild the results from existing runs
    python benchmarks/fedali/run.py --plan          # the number of runs and the estimated CPU hours
    python benchmarks/fedali/run.py --tiny --runs /tmp/fa --out /tmp/fa_out --seeds 0   # smoke test, minutes

Question (the paper's claim, shared/specs/fedali.md §9): under device and placement shift, does FedAli improve
generalization (each client's model on other clients' data, and on unseen users) over its baselines while keeping
personalization, and is it FedAli's protocol (aligning to the global prototypes) or the pre-training that does it?

Settings: `shift` (every user is a device with its own sensor rotation, gain and bias: `data.device_shift`), the
claim's setting, and `none` (HAPT as recorded, the earlier benchmark's setting). Protocol (DESIGN §8): every method's
learning rate from the same 3-point grid, chosen by the validation score of a run on the `shift` setting with a
tuning seed (100) that the reported seeds never use; the chosen rate serves both settings. The controls are not
tuned: each reuses the rate of the method it varies, so it differs from it in one thing only. A run that rejected a
reply or ended with a non-finite validation loss counts as diverged and is shown, not averaged in. Seeds are paired:
a seed fixes the data split, the initial model and the pre-trained encoders, so per-seed differences cancel them.
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

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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
from sweep import (  # noqa: E402
    Job,
    benchmark_parser,
    finished_runs,
    keep_finished,
    mean_curve,
    pct,
    pretrain_config,
    run_config,
    run_jobs,
)

CONFIG = HERE / "config.toml"
SETTINGS: dict[str, tuple[str, ...]] = {"shift": ("data.device_shift=true",), "none": ()}
TUNE_SETTING, TUNE_SEED = "shift", 100
LEARNING_RATES = (3e-4, 1e-3, 3e-3)  # Adam; FedAli's code uses 1e-3 for every method
TINY = ("data.max_samples=1500", "train.rounds=2", "train.local_epochs=1", "eval.every=1", "pretrain.epochs=1")


@dataclass(frozen=True)
class Variant:
    """One row of the tables: an algorithm on a model, from a pre-trained encoder or not, with its own overrides."""

    algorithm: str
    model: str = "hart"
    encoder: str | None = "plain"  # "alp" (MAE-pre-trained hart_alp), "plain" (MAE-pre-trained hart) or None
    overrides: tuple[str, ...] = ()
    tuned_as: str = ""  # whose learning rate it reuses ("" = its own tuning)
    settings: tuple[str, ...] = tuple(SETTINGS)

    @property
    def tuned(self) -> bool:
        return not self.tuned_as


CONTROL = ("shift",)  # the controls run in the claim's setting only (the budget's order: controls, seeds, rounds)
VARIANTS: dict[str, Variant] = {
    "fedali": Variant("fedali", "hart_alp", "alp"),
    "fedavg": Variant("fedavg"),
    "fedprox": Variant("fedprox", settings=CONTROL),  # in the budget's order, the unshifted column comes last
    "moon": Variant("moon", settings=CONTROL),
    "fedper": Variant("fedper"),
    "fedproto": Variant("fedproto"),
    "local": Variant("local"),
    # is it the protocol? the same ALP model and encoder without FedAli's server, and FedAli with λ = 0
    "fedavg on hart_alp": Variant("fedavg", "hart_alp", "alp", tuned_as="fedavg", settings=CONTROL),
    "fedali (λ = 0)": Variant("fedali", "hart_alp", "alp", ("algorithm.lam=0",), "fedali", CONTROL),
    # is it the pre-training? every weight-sharing method with and without it
    "fedali (no pre-training)": Variant("fedali", "hart_alp", None, tuned_as="fedali", settings=CONTROL),
    "fedavg (no pre-training)": Variant("fedavg", encoder=None, tuned_as="fedavg", settings=CONTROL),
    "fedprox (no pre-training)": Variant("fedprox", encoder=None, tuned_as="fedprox", settings=CONTROL),
    "fedper (no pre-training)": Variant("fedper", encoder=None, tuned_as="fedper", settings=CONTROL),
    # the personal banks: how fast they follow the data, and whether they outlive a round
    "fedali (β = 0.99)": Variant("fedali", "hart_alp", "alp", ("algorithm.beta=0.99",), "fedali", CONTROL),
    "fedali (β = 0.9)": Variant("fedali", "hart_alp", "alp", ("algorithm.beta=0.9",), "fedali", CONTROL),
    "fedali (banks kept)": Variant(
        "fedali", "hart_alp", "alp", ("algorithm.persist_local_prototypes=true",), "fedali", CONTROL
    ),
    # the ALP plan depends on the batch: the same trained models scored in batches of 2048 instead of 32
    "fedali (eval batch 2048)": Variant("fedali", "hart_alp", "alp", ("eval.batch_size=2048",), "fedali", CONTROL),
}
BASELINES = ("fedavg", "fedprox", "moon", "fedper", "fedproto")
METRICS = (  # (header, path in summary.json)
    ("Pers. F1", ("last_round", "personalized", "macro_f1")),
    ("Pers. F1 (val. round)", ("selected_round", "personalized", "macro_f1")),
    ("Gen. F1 (all)", ("last_round", "generalization", "all", "macro_f1")),
    ("Gen. F1 (others)", ("last_round", "generalization", "others", "macro_f1")),
    ("Gen. F1 (others, val. round)", ("selected_round", "generalization", "others", "macro_f1")),
    ("Unseen F1 (adapted)", ("unseen", "personalized", "macro_f1")),
    ("Unseen F1 (zero-shot)", ("unseen", "zero_shot", "macro_f1")),
)
PAIRED = (METRICS[0], METRICS[3], METRICS[5])  # the claim's three: personalization, generalization, unseen users
COMPARED = (METRICS[0], METRICS[1], METRICS[3], METRICS[4], METRICS[5])  # the three, and two at the selected round
# --plan: measured CPU seconds of one run (20 rounds, one core, other runs sharing the machine) and of one
# pre-training (40 epochs); see README.md
RUN_SECONDS = {"fedali": 290.0, "fedproto": 150.0}
DEFAULT_RUN_SECONDS = 190.0
PRETRAIN_SECONDS = 120.0


def slug(name: str) -> str:
    """A directory name: 'fedali (β = 0.99)' -> 'fedali_beta0.99', 'tune_lr=0.001' -> 'tune_lr0.001'."""
    for old, new in ((" (", "_"), (")", ""), ("λ = ", "lam"), ("β = ", "beta"), (", ", "_"), (" ", "_"), ("=", "")):
        name = name.replace(old, new)
    return name


def encoder_path(root: Path, setting: str, kind: str, seed: int) -> Path:
    return root / "pretrained" / f"{setting}-{kind}-seed{seed}.pt"


def run_path(root: Path, setting: str, name: str, label: str) -> Path:
    return root / setting / slug(name) / slug(label)


def pretrain(root: Path, setting: str, kind: str, seed: int, extra: Sequence[str]) -> float:
    """`fedpal pretrain` of one encoder (labels never read) on that setting's training windows; kept if there."""
    model = "hart_alp" if kind == "alp" else "hart"
    items = [*SETTINGS[setting], f"seed={seed}", f"pretrain.model={model}", f"model.name={model}", *extra]
    return pretrain_config(CONFIG, encoder_path(root, setting, kind, seed), items)


def candidates() -> list[Candidate]:
    return grid([("train.lr", LEARNING_RATES)])


def chosen(root: Path, name: str) -> Candidate | None:
    """The tuned learning rate of a variant (its own, or the one of the method it varies); None until every tuning
    run of that method finished. Ties go to the smaller rate."""
    owner = VARIANTS[name].tuned_as or name
    return best_candidate([(c, run_path(root, TUNE_SETTING, owner, f"tune_{c.label}")) for c in candidates()])


def launch(root: Path, setting: str, name: str, label: str, overrides: Sequence[str], extra: Sequence[str]) -> float:
    variant = VARIANTS[name]
    items = [
        *SETTINGS[setting],
        f"algorithm.name={variant.algorithm}",
        f"model.name={variant.model}",
        "pretrain.method=none",
        *variant.overrides,
        *overrides,
    ]
    seed = next(int(o.split("=", 1)[1]) for o in overrides if o.startswith("seed="))
    if variant.encoder is not None:
        items.append(f"model.pretrained={encoder_path(root, setting, variant.encoder, seed)}")
    return run_config(CONFIG, run_path(root, setting, name, label), [*items, *extra])


def _encoder_needed(root: Path, setting: str, kind: str, seed: int, names: list[str], tuned: list[str]) -> bool:
    """Whether a run that starts from this encoder has not finished yet: a resumed sweep (runs restored from the
    archive, encoders not kept) pre-trains only what its remaining runs read."""
    if seed == TUNE_SEED:
        readers = [(n, f"tune_{c.label}") for n in tuned for c in candidates()]
    else:
        readers = [(n, f"seed{seed}") for n in names if setting in VARIANTS[n].settings]
    return any(
        VARIANTS[n].encoder == kind and not (run_path(root, setting, n, label) / "summary.json").exists()
        for n, label in readers
    )


def run_all(
    root: Path, settings: list[str], names: list[str], seeds: list[int], jobs: int, extra: list[str]
) -> list[str]:
    """The encoders' pre-trainings, then the tuning runs, then each method's seeded runs as soon as its tuning
    finished (a variant's with the method it varies); returns the failures."""
    tuned = sorted({VARIANTS[n].tuned_as or n for n in names})  # the methods whose tuning these runs need
    kinds = sorted({k for n in [*names, *tuned] if (k := VARIANTS[n].encoder) is not None})
    pretrainings = [(s, k, seed) for s in settings for seed in seeds for k in kinds]
    pretrainings += [(TUNE_SETTING, k, TUNE_SEED) for k in kinds]
    pretrainings = [p for p in pretrainings if _encoder_needed(root, *p, names, tuned)]

    def run(setting: str, name: str, label: str, overrides: list[str], stage: str | None = None) -> Job:
        return Job(f"{setting}/{name}/{label}", lambda: launch(root, setting, name, label, overrides, extra), stage)

    def unlocked(stage: Hashable) -> list[Job]:
        if stage == "pretrain":
            return [
                run(TUNE_SETTING, n, f"tune_{c.label}", [*c.overrides, f"seed={TUNE_SEED}"], f"tune {n}")
                for n in tuned
                for c in candidates()
            ]
        method = str(stage).removeprefix("tune ")
        found = []
        for s in settings:
            for n in names:
                if (VARIANTS[n].tuned_as or n) != method or s not in VARIANTS[n].settings:
                    continue
                pick = chosen(root, n)
                assert pick is not None, f"{n}: its tuning finished but no point was chosen"
                found += [run(s, n, f"seed{seed}", [*pick.overrides, f"seed={seed}"]) for seed in seeds]
        return found

    first = [
        Job(f"pretrain {s}/{k}/{seed}", lambda s=s, k=k, seed=seed: pretrain(root, s, k, seed, extra), "pretrain")
        for s, k, seed in pretrainings
    ]
    return run_jobs(first, jobs, unlocked) if first else run_jobs(unlocked("pretrain"), jobs, unlocked)


def plan(settings: list[str], names: list[str], seeds: list[int], jobs: int) -> list[str]:
    def cost(name: str) -> float:
        return RUN_SECONDS.get(VARIANTS[name].algorithm, DEFAULT_RUN_SECONDS)

    tuned = sorted({VARIANTS[n].tuned_as or n for n in names})
    tuning = [(n, c) for n in tuned for c in candidates()]
    seeded = [(s, n) for s in settings for n in names if s in VARIANTS[n].settings for _ in seeds]
    kinds = {VARIANTS[n].encoder for n in names} - {None}
    pretrainings = len(kinds) * (len(settings) * len(seeds) + 1)
    seconds = sum(cost(n) for n, _ in tuning) + sum(cost(n) for _, n in seeded) + pretrainings * PRETRAIN_SECONDS
    return [
        f"{len(tuning)} tuning runs, {len(seeded)} seeded runs, {pretrainings} pre-trainings",
        f"~{seconds / 3600:.1f} CPU h, ~{seconds / 3600 / jobs:.1f} h wall with --jobs {jobs}",
    ]


# ------------------------------------------------------------------------------------------------- report


def value(rec: RunRecord, path: tuple[str, ...]) -> float | None:
    v = get_path(rec.summary, *path)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def records_of(root: Path, setting: str, name: str, seeds: list[int]) -> list[RunRecord]:
    return finished_runs(run_path(root, setting, name, f"seed{seed}") for seed in seeds)


def cell(recs: list[RunRecord], path: tuple[str, ...]) -> str:
    values = [v for r in recs if not diverged(r) and (v := value(r, path)) is not None]
    return pct(mean(values), pstdev(values)) if values else "–"


def main_table(found: dict[str, list[RunRecord]]) -> list[str]:
    headers = ["Method", "Seeds (diverged)", *(h for h, _ in METRICS), "Bank shift", "Up / round", "Wall (min)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, recs in found.items():
        failed = sum(diverged(r) for r in recs)
        ok = [r for r in recs if not diverged(r)]
        shift = [v for r in ok if (v := value(r, ("last_round", "diagnostics", "bank_shift"))) is not None]
        up = [v for r in ok if (v := value(r, ("bytes_per_round", "up"))) is not None]
        wall = [v for r in ok if (v := value(r, ("wall_seconds",))) is not None]
        cells = [name, f"{len(recs)} ({f'**{failed}**' if failed else 0})", *(cell(recs, p) for _, p in METRICS)]
        cells.append(f"{100 * mean(shift):.2f} %" if shift else "–")
        cells.append(human_bytes(mean(up)) if up else "–")
        cells.append(f"{mean(wall) / 60:.1f}" if wall else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def differences(a: list[RunRecord], b: list[RunRecord], path: tuple[str, ...]) -> list[float]:
    """Per-seed a − b (fractions; shown in points) over the seeds where both finished without diverging."""
    left = {r.seed: value(r, path) for r in a if not diverged(r)}
    right = {r.seed: value(r, path) for r in b if not diverged(r)}
    return [x - y for s, x in left.items() if (y := right.get(s)) is not None and x is not None]


def paired_cell(a: list[RunRecord], b: list[RunRecord], path: tuple[str, ...]) -> str:
    diffs = differences(a, b, path)
    return f"{format_interval(*paired_interval(diffs))} (n = {len(diffs)})" if diffs else "–"


def strongest(found: dict[str, list[RunRecord]], path: tuple[str, ...]) -> str | None:
    """The baseline with the best mean of one metric (over its non-diverged seeds)."""
    means = {}
    for name in BASELINES:
        values = [v for r in found.get(name, []) if not diverged(r) and (v := value(r, path)) is not None]
        if values:
            means[name] = mean(values)
    return max(means, key=lambda n: means[n]) if means else None


def comparison_table(found: dict[str, list[RunRecord]]) -> list[str]:
    """FedAli minus the strongest baseline of each metric, and minus Local, per seed, in points."""
    if "fedali" not in found:
        return []
    lines = [
        "FedAli minus the strongest baseline of each metric (the baseline with the best mean) and minus Local, "
        "paired by seed: mean [bootstrap 95 % interval] in points.",
        "",
        "| Metric | Strongest baseline | FedAli − it | FedAli − Local |",
        "|---|---|---|---|",
    ]
    for header, path in COMPARED:
        best = strongest(found, path)
        against = paired_cell(found["fedali"], found[best], path) if best else "–"
        local = paired_cell(found["fedali"], found["local"], path) if "local" in found else "–"
        lines.append(f"| {header} | {best or '–'} | {against} | {local} |")
    return [*lines, ""]


CONTRASTS = (  # (what it asks, a, b): a − b per seed
    ("FedAli's protocol over FedAvg, same ALP model and encoder", "fedali", "fedavg on hart_alp"),
    ("the alignment's influence (λ = 0.2 against 0)", "fedali", "fedali (λ = 0)"),
    ("pre-training, FedAli", "fedali", "fedali (no pre-training)"),
    ("pre-training, FedAvg", "fedavg", "fedavg (no pre-training)"),
    ("pre-training, FedProx", "fedprox", "fedprox (no pre-training)"),
    ("pre-training, FedPer", "fedper", "fedper (no pre-training)"),
    ("β = 0.99 against 0.999", "fedali (β = 0.99)", "fedali"),
    ("β = 0.9 against 0.999", "fedali (β = 0.9)", "fedali"),
    ("personal banks kept across rounds", "fedali (banks kept)", "fedali"),
    ("evaluation in batches of 2048 against 32", "fedali (eval batch 2048)", "fedali"),
)


def controls_table(found: dict[str, list[RunRecord]]) -> list[str]:
    rows = [(q, a, b) for q, a, b in CONTRASTS if a in found and b in found]
    if not rows:
        return []
    lines = [
        "Controls: a − b per seed, mean [bootstrap 95 % interval] in points.",
        "",
        "| Question | a | b | " + " | ".join(h for h, _ in PAIRED) + " |",
        "|---|---|---|" + "---|" * len(PAIRED),
    ]
    for question, a, b in rows:
        cells = [paired_cell(found[a], found[b], path) for _, path in PAIRED]
        lines.append(f"| {question} | {a} | {b} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot_curves(found: dict[str, list[RunRecord]], path: Path, title: str) -> None:
    panels = (
        (("personalized", "macro_f1"), "personalization macro-F1"),
        (("generalization", "others", "macro_f1"), "generalization macro-F1 (other clients)"),
    )
    fig = Figure(figsize=(6.5 * len(panels), 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    shown = [n for n in found if n in ("fedali", "local", *BASELINES, "fedavg on hart_alp", "fedali (no pre-training)")]
    for i, name in enumerate(shown):
        recs = [r for r in found[name] if not diverged(r)]
        if not recs:
            continue
        for ax, (keys, panel) in zip(axes, panels, strict=True):
            rounds, means, stds = mean_curve(recs, *keys)
            style = "-" if name.startswith("fedali") else "--"
            ax.plot(rounds, [100 * m for m in means], style, color=f"C{i}", label=name)
            low = [100 * (m - s) for m, s in zip(means, stds, strict=True)]
            high = [100 * (m + s) for m, s in zip(means, stds, strict=True)]
            ax.fill_between(rounds, low, high, color=f"C{i}", alpha=0.1)
            ax.set_title(panel)
            ax.set_xlabel("round")
            ax.set_ylabel("macro-F1 (%)")
            ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def setting_report(root: Path, setting: str, seeds: list[int], out: Path) -> list[str]:
    found = {n: recs for n in VARIANTS if (recs := records_of(root, setting, n, seeds))}
    title = {"shift": "Device shift (data.device_shift)", "none": "No shift (HAPT as recorded)"}[setting]
    if not found:
        return [f"## {title}", "", "No finished runs.", ""]
    lines = [f"## {title}", "", *main_table(found), *comparison_table(found), *controls_table(found)]
    plot_curves(found, out / f"curves_{setting}.png", f"{title}: mean ± std over seeds")
    return [*lines, f"![learning curves, {setting}](curves_{setting}.png)", ""]


def tuning_record(root: Path, name: str) -> dict[str, object]:
    pick = chosen(root, name)
    if not VARIANTS[name].tuned:
        return {"chosen": pick.label if pick else None, "tuned_as": VARIANTS[name].tuned_as}
    scores: dict[str, float | str | None] = {}
    for candidate in candidates():
        path = run_path(root, TUNE_SETTING, name, f"tune_{candidate.label}")
        score = validation_score(read_run(path)) if (path / "summary.json").exists() else None
        scores[candidate.label] = score if score is None or math.isfinite(score) else "diverged"
    return {"chosen": pick.label if pick else None, "validation_accuracy": scores}


def report(root: Path, settings: list[str], seeds: list[int], out: Path, elapsed: float | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    picks = {n: tuning_record(root, n) for n in VARIANTS}
    parts = [
        "# FedAli benchmark results (UCI HAPT)",
        "",
        "Generated by `python benchmarks/fedali/run.py`. The question, the answer with its intervals and what would "
        "change it are in ../README.md (Answers); protocol and sizes there and in the script's docstring. "
        "Macro-F1 in percent, mean ± std over the seeds that did not diverge, each a mean over clients. *Pers.*: "
        "each client's post-local-training model on its own test split; *Gen.*: the same model "
        "on the pooled test data of all training clients (FedAli's definition) or of the others; *val. round*: "
        "the evaluation that validation loss selects; *Unseen*: 6 held-out users, after the method's own local "
        "update (*adapted*) or with the global model (*zero-shot*). *Bank shift*: FedAli's ‖L − G‖_F / ‖G‖_F "
        "after local training, mean over ALP layers and clients. Diverged runs are counted in bold.",
        "",
        "Learning rates (Adam, chosen on the `shift` setting, seed 100): "
        + ", ".join(f"{n} {p['chosen'] or 'not tuned yet'}" for n, p in picks.items() if VARIANTS[n].tuned)
        + ".",
        "",
    ]
    if elapsed is not None:
        parts += [f"Wall time of the last invocation: {elapsed / 3600:.2f} h.", ""]
    for setting in settings:
        parts += setting_report(root, setting, seeds, out)
    (out / "README.md").write_text("\n".join(parts))
    (out / "chosen.json").write_text(json.dumps(picks, indent=1, ensure_ascii=False) + "\n")
    print("\n".join(parts))


def main() -> int:
    parser = benchmark_parser(__doc__, "runs/fedali", HERE / "results")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes (2 rounds, 1,500 windows)")
    parser.add_argument("--plan", action="store_true", help="print the runs and estimated hours, run nothing")
    parser.set_defaults(seeds="0,1,2,3,4")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings, names = args.settings.split(","), args.variants.split(",")
    unknown = sorted(set(settings) - set(SETTINGS)) + sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown settings or variants: {', '.join(unknown)}")
    if args.plan:
        print("\n".join(plan(settings, names, seeds, args.jobs)))
        return 0
    keep_finished(args)
    root = Path(args.runs)
    elapsed, failures = None, []
    if not args.report_only:
        started = time.perf_counter()
        extra = ["train.threads=1", *(TINY if args.tiny else ()), *args.set]
        failures = run_all(root, settings, names, seeds, args.jobs, extra)
        elapsed = time.perf_counter() - started
    report(root, settings, seeds, Path(args.out), elapsed)
    if failures:
        print(f"{len(failures)} runs failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
