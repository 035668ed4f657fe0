"""Helpers the benchmark scripts share: one fedpal run per process, the one scheduler that runs a benchmark's jobs in
stages, the run archive, seed-averaged curves, table cells.

A benchmark script imports this after putting ``benchmarks/`` on ``sys.path`` (the scripts run as files).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from fedpal.report.run_reader import RunRecord, get_path, read_run

# The files of a finished run that the reports read; kept, gzipped, under results/finished/ (committed), so a
# benchmark that spans sessions resumes on a fresh clone without its run directories (which are not committed).
KEPT_FILES = ("summary.json", "metrics.jsonl", "config.toml")
_kept: tuple[Path, Path] | None = None  # (runs root, archive root) once keep_finished was called


def keep_finished(args: argparse.Namespace) -> int:
    """Restore every archived run under ``args.runs`` (those already there are left alone) and archive each run
    that finishes from now on (unless ``--archive none``); returns how many runs were restored."""
    global _kept
    if args.archive == "none":
        return 0
    runs, archive = Path(args.runs), Path(args.archive or Path(args.out) / "finished")
    _kept = (runs, archive)
    restored = 0
    for bundle in sorted(archive.rglob("*.json.gz")):
        path = runs / bundle.relative_to(archive).with_name(bundle.name.removesuffix(".json.gz"))
        if (path / "summary.json").exists():
            continue
        files = json.loads(gzip.decompress(bundle.read_bytes()))
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        for name, text in files.items():
            (path / name).write_text(text, encoding="utf-8")
        restored += 1
    if restored:
        print(f"restored {restored} finished runs from {archive}", flush=True)
    return restored


def _archive(path: Path) -> None:
    if _kept is None:
        return
    runs, archive = _kept
    bundle = archive / path.relative_to(runs).parent / f"{path.name}.json.gz"
    files = {name: (path / name).read_text(encoding="utf-8") for name in KEPT_FILES if (path / name).exists()}
    bundle.parent.mkdir(parents=True, exist_ok=True)
    partial = bundle.with_suffix(".part")
    partial.write_bytes(gzip.compress(json.dumps(files).encode("utf-8"), mtime=0))
    partial.replace(bundle)


def run_config(config: Path, path: Path, overrides: list[str]) -> float:
    """One `fedpal run` in its own process; a finished run (summary.json) is kept, a partial one redone; a run that
    finishes is archived when keep_finished was called."""
    if (path / "summary.json").exists():
        return 0.0
    if path.exists():
        shutil.rmtree(path)
    seconds = _fedpal("run", config, path, overrides)
    _archive(path)
    return seconds


def pretrain_config(config: Path, path: Path, overrides: list[str]) -> float:
    """One `fedpal pretrain` in its own process, writing the weights file ``path``; kept if it is already there (a
    pre-training is deterministic in its config, so a fresh clone redoes it rather than storing weights)."""
    if path.exists():
        return 0.0
    return _fedpal("pretrain", config, path, overrides)


def _fedpal(command_name: str, config: Path, path: Path, overrides: list[str]) -> float:
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = [command_name, str(config), "--out", str(path), "--quiet"]
    if command_name == "run":  # the sweep runs its jobs side by side, one core each: no worker processes per run
        overrides = ["run.executor=sequential", *overrides]
    for item in overrides:
        argv += ["--set", item]
    started = time.perf_counter()
    code, output = _in_fresh_process(argv)
    if code != 0:
        raise RuntimeError(f"{command_name} {path}: exit {code}: {output.strip()[-500:]}")
    return time.perf_counter() - started


# Each fedpal command runs in a process of its own, forked from a server that imported torch and fedpal once: the
# same code as `python -m fedpal` in a fresh process (every draw of a run comes from its seed), without the ~4 s of
# imports per run (torch, and torch._dynamo, which torch.optim loads on first use), a fifth of a short run.
# "__main__" (the benchmark script, imported once by the server as multiprocessing does) keeps each child from
# importing it again.
PRELOAD = ["__main__", "torch", "torch._dynamo", "torch.optim", "fedpal.cli", "fedpal.api", "fedpal.runner", "sweep"]
_forkserver: multiprocessing.context.ForkServerContext | None = None
_forkserver_lock = threading.Lock()


def _in_fresh_process(argv: list[str]) -> tuple[int, str]:
    """`python -m fedpal ARGV` in a new process: its exit code and its output (stdout and stderr)."""
    global _forkserver
    if "forkserver" not in multiprocessing.get_all_start_methods():  # not on Linux: a plain new interpreter
        done = subprocess.run([sys.executable, "-m", "fedpal", *argv], capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr
    with _forkserver_lock:
        if _forkserver is None:
            _forkserver = multiprocessing.get_context("forkserver")
            _forkserver.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="fedpal_sweep_") as folder:
        log = Path(folder) / "output.txt"
        process = _forkserver.Process(target=_fedpal_main, args=(argv, str(log)), daemon=False)
        process.start()
        process.join()
        return int(process.exitcode or 0), log.read_text(errors="replace") if log.exists() else ""


def _fedpal_main(argv: list[str], log: str) -> None:
    """The forked child: output to ``log``, then fedpal's command line as `python -m fedpal` runs it."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    from fedpal.cli import main

    sys.exit(main(argv))


@dataclass(frozen=True)
class Job:
    """One unit of a benchmark (a run, a pre-training): ``start`` does it and returns its seconds (0.0 when it was
    already done); the jobs of one ``stage`` together unlock what depends on them (a method's tuning runs unlock its
    seeded runs)."""

    name: str
    start: Callable[[], float]
    stage: Hashable | None = None


def run_jobs(first: Iterable[Job], jobs: int, then: Callable[[Hashable], Iterable[Job]] | None = None) -> list[str]:
    """Run ``first``, ``jobs`` at a time in order; whenever every job of a stage has ended without failing, what
    ``then(stage)`` returns goes to the front of the queue (a stage with a failed job unlocks nothing, and says so).
    Unlocked work first: a method's seeded runs start as soon as its tuning ends, so a partial sweep holds whole
    results rather than every tuning run and no seeded one. One line per job as it ends. A job that raises
    RuntimeError is reported and the others go on; returns the failed jobs' names."""
    failures: list[str] = []
    workers = max(1, jobs)
    with ThreadPoolExecutor(workers) as pool:
        queue: deque[Job] = deque()
        pending: dict[Future[float], Job] = {}
        left: dict[Hashable, int] = {}  # jobs of each stage not yet ended (queued or running)
        failed_stages: set[Hashable] = set()
        ended = 0

        def enqueue(batch: Iterable[Job], front: bool) -> None:
            batch = list(batch)
            for job in batch:
                if job.stage is not None:
                    left[job.stage] = left.get(job.stage, 0) + 1
            if front:
                queue.extendleft(reversed(batch))
            else:
                queue.extend(batch)

        def start_more() -> None:
            while queue and len(pending) < workers:
                job = queue.popleft()
                pending[pool.submit(job.start)] = job

        enqueue(first, front=False)
        start_more()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                ended += 1
                progress = f"[{ended}/{ended + len(pending) + len(queue)}] {job.name}"
                try:
                    print(f"{progress}: {future.result():.1f} s", flush=True)
                except RuntimeError as error:
                    failures.append(job.name)
                    print(f"{progress}: FAILED {error}", flush=True)
                    if job.stage is not None:
                        failed_stages.add(job.stage)
                if job.stage is None:
                    continue
                left[job.stage] -= 1
                if left[job.stage] > 0:
                    continue
                if job.stage in failed_stages:
                    print(f"{job.stage}: a job failed, so what depends on it is skipped", flush=True)
                elif then is not None:
                    enqueue(then(job.stage), front=True)
            start_more()
    return failures


def benchmark_parser(doc: str, runs: str, out: Path) -> argparse.ArgumentParser:
    """The options every benchmark script takes; each adds its own (which settings, methods or variants)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default=runs, help="where run directories go")
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the results from existing runs")
    parser.add_argument("--archive", help="where finished runs are kept (default: OUT/finished; 'none': nowhere)")
    return parser


def finished_runs(paths: Iterable[Path]) -> list[RunRecord]:
    """The runs among ``paths`` that finished (wrote summary.json), read, in order."""
    return [read_run(path) for path in paths if (path / "summary.json").exists()]


def mean_curve(recs: list[RunRecord], *keys: str) -> tuple[list[float], list[float], list[float]]:
    """(rounds, mean, std) of one metric over the runs of several seeds, evaluation by evaluation."""
    rounds = [float(m["round"]) for m in recs[0].metrics]
    series = [[get_path(m, *keys) for m in r.metrics] for r in recs]
    means, stds = [], []
    for i in range(len(rounds)):
        values = [float(s[i]) for s in series if i < len(s) and isinstance(s[i], int | float)]
        values = [v for v in values if math.isfinite(v)]
        mean = sum(values) / len(values) if values else math.nan
        means.append(mean)
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else math.nan)
    return rounds, means, stds


def pct(mean: float | None, std: float | None) -> str:
    """A 'mean ± std' table cell in percent; '–' when the metric is absent."""
    return "–" if mean is None or std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"
