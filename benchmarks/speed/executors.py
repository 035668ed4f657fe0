"""Executors side by side, and the limit they approach.

Each measurement runs in its own process (so thread settings and memory do not leak between them): a FedAvg run on
MNIST is assembled, its executor started (start-up timed apart), and training rounds 2..R are timed (round 1 warms
up allocations). Reported: seconds per training round (median), training samples per second, and the ratio to
sequential single-thread execution in the same table. The limit is the same model trained on resident tensors by a
plain loop: one client's worth of data at the same batch size (what one core can do), and centrally at batch 256.

    python benchmarks/speed/executors.py                    # the grid of the README (about 15 minutes)
    python benchmarks/speed/executors.py --quick            # a smoke test (one small setting)
    python benchmarks/speed/executors.py --out benchmarks/speed/results/executors.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import measure  # benchmarks/speed/measure.py, beside this script

EXECUTORS = {
    "sequential, 1 thread": {"executor": "sequential", "threads": 1},
    "sequential, 2 threads": {"executor": "sequential", "threads": 2},
    "processes x2": {"executor": "processes", "threads": 1},
    "batched, 1 thread": {"executor": "batched", "threads": 1},
}


def config(model: str, batch: int, clients: int, samples: int, rounds: int) -> dict[str, Any]:
    model_table = {"name": model, "hidden_dim": 200, "feature_dim": 512 if model == "cnn" else 128}
    return {
        "seed": 0,
        "data": {"dataset": "mnist", "alpha": 0.1, "num_clients": clients, "max_samples": samples},
        "model": model_table,
        "train": {"rounds": rounds, "batch_size": batch, "lr": 0.005, "local_epochs": 1},
        "eval": {"every": 1000},
        "run": {"progress": False, "checkpoint_every": 0},
        "algorithm": {"name": "fedavg"},
    }


def measure_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process: time the rounds of one (setting, executor)."""
    import torch

    from fedpal.config import from_dict
    from fedpal.data.federated import build_federated_data
    from fedpal.engine.assembly import assemble
    from fedpal.engine.batched import BatchedExecutor
    from fedpal.engine.driver import RoundDriver
    from fedpal.engine.executor import Executor
    from fedpal.engine.processes import ProcessExecutor
    from fedpal.engine.sequential import SequentialExecutor

    raw = spec["config"]
    raw["train"]["threads"] = spec["threads"]
    raw["run"]["device"] = spec.get("device", "cpu")
    synchronize = torch.cuda.synchronize if raw["run"]["device"] == "cuda" else (lambda: None)
    cfg = from_dict(raw)
    data = build_federated_data(cfg.data, cfg.seed)
    assembly = assemble(cfg, data)
    torch.set_num_threads(spec["threads"])
    started = time.perf_counter()
    executor: Executor = SequentialExecutor(assembly)
    if spec["executor"] == "processes":
        executor = ProcessExecutor(assembly, 2)
    elif spec["executor"] == "batched":
        executor = BatchedExecutor(assembly)
    startup = time.perf_counter() - started
    driver = RoundDriver(assembly, executor, progress=False)
    driver.initialize()
    times = []
    for r in range(1, cfg.train.rounds + 1):
        t0 = time.perf_counter()
        driver.run_round(r)
        synchronize()  # a round's GPU work is done when its time is read
        times.append(time.perf_counter() - t0)
    executor.close()
    samples = sum(c.train_y.numel() for c in data.clients)
    per_round = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"seconds_per_round": per_round, "startup_seconds": startup, "train_samples": samples, "rounds": times}


def limit_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process: a plain loop on resident tensors, one thread, at ``batch`` over ``n`` samples."""
    import torch
    from torch.nn import functional as F

    from fedpal.config import from_dict
    from fedpal.data.federated import build_federated_data
    from fedpal.engine.assembly import assemble

    torch.set_num_threads(1)
    cfg = from_dict(spec["config"])
    data = build_federated_data(cfg.data, cfg.seed)
    module = next(iter(assemble(cfg, data).trainers.values())).module
    x = torch.cat([c.train_x for c in data.clients])[: spec["n"]]
    y = torch.cat([c.train_y for c in data.clients])[: spec["n"]]
    optimizer = torch.optim.SGD(module.parameters(), lr=0.005)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        order = torch.randperm(x.shape[0])
        for start in range(0, x.shape[0], spec["batch"]):
            idx = order[start : start + spec["batch"]]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(x[idx]), y[idx]).backward()
            optimizer.step()
        best = min(best, time.perf_counter() - t0)
    return {"samples_per_second": x.shape[0] / best}


def in_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return measure.in_child(__file__, kind, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=12000, help="MNIST subsample (class-stratified)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child
        print(json.dumps((measure_one if kind == "measure" else limit_one)(json.loads(spec))))
        return
    grid = list(itertools.product(["cnn", "mlp"], [10, 32], [20, 100]))
    if args.quick:
        grid, args.samples, args.rounds = [("mlp", 32, 20)], 3000, 2
    rows = []
    started = time.perf_counter()
    for model, batch, clients in grid:
        cfg = config(model, batch, clients, args.samples, args.rounds)
        results = {name: in_child("measure", {"config": cfg, **opts}) for name, opts in EXECUTORS.items()}
        train = results["sequential, 1 thread"]["train_samples"]
        per_client = train // clients
        one_core = in_child("limit", {"config": cfg, "batch": batch, "n": per_client * 4})["samples_per_second"]
        central = in_child("limit", {"config": cfg, "batch": 256, "n": train})["samples_per_second"]
        base = results["sequential, 1 thread"]["seconds_per_round"]
        row = {
            "model": model,
            "batch": batch,
            "clients": clients,
            "train_samples": train,
            "limit_one_core_samples_per_s": round(one_core),
            "limit_central_batch256_samples_per_s": round(central),
            "executors": {
                name: {
                    "seconds_per_round": round(r["seconds_per_round"], 3),
                    "startup_seconds": round(r["startup_seconds"], 2),
                    "samples_per_s": round(train / r["seconds_per_round"]),
                    "speedup_vs_sequential_1_thread": round(base / r["seconds_per_round"], 2),
                }
                for name, r in results.items()
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"rows": rows, "wall_seconds": round(time.perf_counter() - started, 1), "samples": args.samples}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print_table(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    names = list(EXECUTORS)
    print("| model | batch | clients | " + " | ".join(f"{n} (s/round, x)" for n in names) + " | one-core limit |")
    print("|---|---|---|" + "---|" * (len(names) + 1))
    for row in rows:
        cells = [
            f"{row['executors'][n]['seconds_per_round']:.2f}, {row['executors'][n]['speedup_vs_sequential_1_thread']}x"
            for n in names
        ]
        best = max(row["executors"][n]["samples_per_s"] for n in names)
        limit = f"{best / row['limit_one_core_samples_per_s']:.2f} of 1 core"
        print(f"| {row['model']} | {row['batch']} | {row['clients']} | " + " | ".join(cells) + f" | {limit} |")


if __name__ == "__main__":
    main()
