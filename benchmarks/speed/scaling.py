"""Seconds per round and peak memory against the number of clients, and the share of a round spent evaluating.

MNIST (all 70,000 images) cut into 20 ... 1,000 clients by Dirichlet(0.1), the MLP, one local epoch at batch 32,
all clients every round, sequential execution with one thread. The total data are fixed, so a linear engine keeps
the training time per round flat as clients grow; the evaluation time grows with the clients that hold personal
models (FedPer: a personal head per client) and stays flat for a model shared by all (FedAvg). Each setting runs in
its own process; peak memory is that process's VmHWM, reported beside the size of the resident data.

    python benchmarks/speed/scaling.py --out benchmarks/speed/results/scaling.json
    python benchmarks/speed/scaling.py --clients 20,100 --algorithms fedavg      # quicker
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import measure  # benchmarks/speed/measure.py, beside this script


def measure_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process."""
    import torch

    from fedpal.config import from_dict
    from fedpal.data.federated import build_federated_data
    from fedpal.engine.assembly import assemble
    from fedpal.engine.driver import RoundDriver

    torch.set_num_threads(1)
    raw = {
        "seed": 0,
        "data": {"dataset": "mnist", "alpha": 0.1, "num_clients": spec["clients"], "min_samples": 10},
        "model": {"name": "mlp", "hidden_dim": 200, "feature_dim": 128},
        "train": {"rounds": spec["rounds"], "batch_size": 32, "lr": 0.05, "threads": 1},
        "eval": {"every": 1},
        "run": {"progress": False, "checkpoint_every": 0},
        "algorithm": {"name": spec["algorithm"]},
    }
    cfg = from_dict(raw)
    data = build_federated_data(cfg.data, cfg.seed)
    after_data = measure.peak_rss_mib()
    data_mib = (
        sum(
            t.numel() * t.element_size()
            for c in data.clients
            for t in (c.train_x, c.train_y, c.val_x, c.val_y, c.test_x, c.test_y)
        )
        / 2**20
    )
    driver = RoundDriver(assemble(cfg, data), progress=False)
    driver.initialize()
    train, evaluate = [], []
    for r in range(1, cfg.train.rounds + 1):
        t0 = time.perf_counter()
        driver.run_round(r)
        t1 = time.perf_counter()
        driver.evaluate(r)
        train.append(t1 - t0)
        evaluate.append(time.perf_counter() - t1)
    personal_mib = (
        sum(
            v.numel() * v.element_size()
            for state in driver.clients.values()
            for part in state.values()
            if isinstance(part, dict)
            for v in part.values()
        )
        / 2**20
    )
    return {
        "train_seconds": min(train),
        "evaluate_seconds": min(evaluate),
        "peak_rss_mib": measure.peak_rss_mib(),
        "rss_after_data_mib": after_data,
        "data_mib": data_mib,
        "personal_state_mib": personal_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="20,100,500,1000")
    parser.add_argument("--algorithms", default="fedavg,fedper")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(json.loads(args.child[1]))))
        return
    rows = []
    for algorithm in args.algorithms.split(","):
        for clients in [int(c) for c in args.clients.split(",")]:
            spec = {"clients": clients, "algorithm": algorithm, "rounds": args.rounds}
            row = {**spec, **measure.in_child(__file__, "measure", spec)}
            row["evaluation_share"] = row["evaluate_seconds"] / (row["evaluate_seconds"] + row["train_seconds"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print("| algorithm | clients | train s/round | eval s | eval share | peak RSS MiB | data MiB | personal MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['algorithm']} | {r['clients']} | {r['train_seconds']:.2f} | {r['evaluate_seconds']:.2f} | "
            f"{r['evaluation_share']:.0%} | {r['peak_rss_mib']:.0f} | {r['data_mib']:.0f} | "
            f"{r['personal_state_mib']:.1f} |"
        )


if __name__ == "__main__":
    main()
