"""The `fedpal` command line. Bad input is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from fedpal.errors import UserError

if TYPE_CHECKING:
    from fedpal.config import ExperimentConfig

RUNNING: list[Path] = []  # the run directories this command has started, for the interruption hint

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (and exit code 2) instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"fedpal: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise UserError(f"--seeds expects comma-separated integers, got '{text}'") from None


# ---- commands


ENGINES = ("simulator", "flower")
ENGINE_HELP = "simulator (in this process) or flower (Flower's simulation runtime; pip install -e '.[flower]')"


def cmd_run(args: argparse.Namespace) -> int:
    from fedpal.api import default_run_dir, resolve, run
    from fedpal.report.run_reader import read_run
    from fedpal.report.tables import brief_runs_table

    config = resolve(args.config, args.set)
    out = Path(args.out) if args.out else default_run_dir(config)
    RUNNING.append(out)
    result = run(config, out=out, progress=not args.quiet, engine=args.engine)
    print(brief_runs_table([read_run(out)]))
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from fedpal.api import resume
    from fedpal.report.run_reader import read_run
    from fedpal.report.tables import brief_runs_table

    RUNNING.append(Path(args.run_dir))
    result = resume(args.run_dir, progress=not args.quiet, engine=args.engine)
    assert result.run_dir is not None  # a resumed run always has its directory
    print(brief_runs_table([read_run(result.run_dir)]))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedpal.algorithms.core.registry import get_algorithm_class
    from fedpal.api import resolve
    from fedpal.config import read_toml
    from fedpal.report import compare_tables, make_report
    from fedpal.report.run_reader import read_run
    from fedpal.report.tables import brief_metrics

    algorithms = _csv(args.algorithms)
    seeds = _seeds(args.seeds)
    if not algorithms or not seeds:
        raise UserError("--algorithms and --seeds must each name at least one value")
    raw = read_toml(args.config)
    base = {k: v for k, v in raw.items() if k != "algorithm"}
    configs = {}
    for name in algorithms:  # validate everything before the first run starts
        get_algorithm_class(name)
        for seed in seeds:
            configs[name, seed] = resolve(base, [*args.set, f'algorithm.name="{name}"', f"seed={seed}"])
    out = Path(args.out or f"runs/compare-{Path(args.config).stem}")
    records: dict[str, list] = {name: [] for name in algorithms}
    for (name, seed), config in configs.items():
        run_path = out / name / f"seed{seed}"
        RUNNING.append(run_path)
        grow_sweep(run_path, config, progress=not args.quiet)
        records[name].append(read_run(run_path))
    markdown, csv_text = compare_tables(records)
    (out / "compare.md").write_text(markdown)
    (out / "compare.csv").write_text(csv_text)
    written = make_report([r.path for recs in records.values() for r in recs], out)
    print(compare_tables(records, brief_metrics())[0])  # the first columns; the files have them all
    print("written: " + ", ".join(str(p) for p in [out / "compare.md", out / "compare.csv", *written]))
    return 0


def grow_sweep(run_path: Path, config: ExperimentConfig, progress: bool) -> None:
    """One (algorithm, seed) of a sweep: kept when finished, resumed when interrupted, run when absent, so a sweep
    into an existing folder only adds what is missing. A run there with other settings stops it in one line."""
    from fedpal.api import resume, run
    from fedpal.config import to_toml
    from fedpal.engine.run_directory import RunDirectory

    config_file = run_path / RunDirectory.CONFIG
    if config_file.exists():
        if config_file.read_text() != to_toml(config.to_dict()):
            raise UserError(
                f"{run_path} holds a run with other settings; use another --out, or remove that run to redo it"
            )
        if (run_path / RunDirectory.SUMMARY).exists():
            print(f"kept (finished): {run_path}")
            return
        if (run_path / RunDirectory.CHECKPOINT).exists():
            print(f"resuming: {run_path}")
            resume(run_path, progress=progress)
            return
    if run_path.exists():  # started but never checkpointed: nothing to keep
        import shutil

        shutil.rmtree(run_path)
    run(config, out=run_path, progress=progress)


def cmd_report(args: argparse.Namespace) -> int:
    from fedpal.report import make_report

    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report"
    paths = make_report(args.run_dirs, out)
    print((out / "report.md").read_text())
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def algorithms_listing() -> str:
    """What `fedpal algorithms` prints (imports every method, and torch with them)."""
    from fedpal.algorithms.core.registry import all_algorithms
    from fedpal.config import choices_of

    lines = ["Set a hyperparameter as algorithm.KEY (with algorithm.name = NAME) or algorithms.NAME.KEY.", ""]
    for name, cls in all_algorithms().items():
        needs = []
        if cls.required_model:
            needs.append(f"needs model.name = {cls.required_model!r}")
        needs.append("any architectures (model.family)" if cls.supports_heterogeneous_models else "one architecture")
        lines.append(f"{name}: {cls.description}  [{'; '.join(needs)}]")
        if cls.recommended_training:  # used for the [train] keys a config leaves unset
            settings = ", ".join(f"train.{k} = {v!r}" for k, v in cls.recommended_training.items())
            lines.append(f"    recommended when unset: {settings}")
        for f in dataclasses.fields(cls.Hyperparameters):
            choices = choices_of(cls.Hyperparameters, f.name)
            listed = f"  (one of {', '.join(repr(c) for c in choices)})" if choices else ""
            lines.append(f"    algorithms.{name}.{f.name} = {f.default!r}{listed}")
    return "\n".join(lines) + "\n"


def cmd_algorithms(args: argparse.Namespace) -> int:
    from fedpal.common.listing_cache import cached_listing

    sys.stdout.write(cached_listing("algorithms", algorithms_listing))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fedpal.models.families import FAMILIES
    from fedpal.models.registry import MODELS

    print("models (model.name):")
    for name, (_, description) in sorted(MODELS.items()):
        print(f"    {name}: {description}")
    print("families (model.family; client i runs architecture i mod K):")
    for name, (architectures, description) in sorted(FAMILIES.items()):
        print(f"    {name}: {', '.join(architectures)} ({description})")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from fedpal.data.sources.base import DatasetOptions
    from fedpal.data.sources.registry import DATASETS, get_dataset_spec

    if args.action == "install":
        if not args.name:
            raise UserError("usage: fedpal datasets install NAME")
        spec = get_dataset_spec(args.name)
        spec.install()
        print(f"installed {args.name}")
        return 0
    options = DatasetOptions()
    w = max(14, *(len(name) for name in DATASETS))  # the name column fits the longest name
    for name, spec in DATASETS.items():
        state = "installed" if spec.is_installed(options) else "not installed"
        print(f"{name:<{w}} {state:<14} {spec.description}")
        print(f"{'':<{w}} install: fedpal datasets install {name}   ({spec.install_command})")
    sources = ("mnist", "fashion_mnist", "animal_mnist", "hapt")  # what the task stream is built from
    state = "installed" if all(DATASETS[s].is_installed(options) for s in sources) else "not installed"
    print(f"{'task_stream':<{w}} {state:<14} FedMosaic's 13 tasks over images and IMU windows, 10 clients x 4 tasks")
    print(f'{"":<{w}} built from: {", ".join(sources)} (data.dataset = "task_stream", docs/config.md)')
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from fedpal.api import resolve
    from fedpal.config import partition_title
    from fedpal.data.federated import build_federated_data
    from fedpal.data.partition_report import format_partition_table, save_partition_heatmap

    config = resolve(args.config, args.set)
    data = build_federated_data(config.data, config.seed)
    counts = data.label_counts()
    print(format_partition_table(counts, data.class_names))
    if args.heatmap:
        save_partition_heatmap(counts, args.heatmap, title=partition_title(config.data))
        print(f"heatmap: {args.heatmap}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedpal.api import resolve
    from fedpal.data.federated import build_federated_data
    from fedpal.pretraining import pretrain_to_file

    config = resolve(args.config, args.set)
    if config.pretrain.method not in ("mae", "multitask"):
        raise UserError(
            f'fedpal pretrain needs pretrain.method = "mae" or "multitask", got \'{config.pretrain.method}\''
        )
    data = build_federated_data(config.data, config.seed)
    result = pretrain_to_file(config, data, Path(args.out), progress=not args.quiet)
    if config.pretrain.method == "mae":
        what = f"(MAE) on {result.windows} training windows of {data.num_clients} clients"
        loss = f"final masked-frame MSE {result.losses[-1]:.5f}"
    else:
        what = f"(multi-task) on {result.windows} public samples that no client holds"
        loss = f"final cross-entropy {result.losses[-1]:.5f}"
    print(
        f"pre-trained {config.pretrain.model} {what}, {len(result.losses)} epochs, {loss}, "
        f"{result.seconds:.1f} s -> {args.out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fedpal import __version__

    parser = _Parser(prog="fedpal", description="Personalized federated learning under heterogeneity.")
    parser.add_argument("--version", action="version", version=f"fedpal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="experiment config (TOML)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    p = sub.add_parser("run", help="run one experiment and write a run directory")
    with_config(p)
    p.add_argument("--out", help="run directory (default runs/<algorithm>-<dataset>-s<seed>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--engine", choices=ENGINES, default="simulator", help=ENGINE_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    p.add_argument("run_dir", help="run directory written by `fedpal run`")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--engine", choices=ENGINES, default="simulator", help=ENGINE_HELP)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("compare", help="run several algorithms over several seeds; mean ± std table")
    with_config(p)
    p.add_argument("--algorithms", required=True, help="comma-separated algorithm names")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--out", help="output directory (default runs/compare-<config name>)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="plots and a markdown table for one or many run directories")
    p.add_argument("run_dirs", nargs="+", help="run directories")
    p.add_argument("--out", help="where to write the report (default <first run>/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("algorithms", help="list algorithms with their hyperparameters and defaults")
    p.set_defaults(func=cmd_algorithms)

    p = sub.add_parser("models", help="list models and heterogeneous model families")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("datasets", help="list datasets (installed or not); `datasets install NAME` installs one")
    p.add_argument("action", nargs="?", choices=["list", "install"], default="list")
    p.add_argument("name", nargs="?", help="dataset to install")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("pretrain", help="MAE pre-training of the encoder without labels; use with model.pretrained")
    with_config(p)
    p.add_argument("--out", required=True, help="checkpoint file to write (e.g. pretrained.pt)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("partition", help="print the samples-per-client-per-class table of a config's partition")
    with_config(p)
    p.add_argument("--heatmap", help="also write a heatmap PNG here")
    p.set_defaults(func=cmd_partition)

    from fedpal.flower.commands import add_flower_commands

    add_flower_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    terminal = logging.StreamHandler()
    terminal.setLevel(logging.WARNING)  # a run's INFO notes go to its log.txt, not the terminal
    logging.basicConfig(level=logging.WARNING, format="fedpal: %(message)s", handlers=[terminal])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        sys.stderr.write(f"fedpal: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if RUNNING and args.command == "compare":
            hint = "run the same `fedpal compare` again: it keeps finished runs and resumes this one"
        else:
            hint = f"`fedpal resume {RUNNING[-1] if RUNNING else 'RUN_DIR'}` continues from the last checkpoint"
        sys.stderr.write(f"fedpal: interrupted; {hint}\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
