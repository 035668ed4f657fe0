"""The client-batched executor against sequential execution on a GPU (``run.device = "cuda"``): the claim is that
at small batches a GPU is bound by kernel launches, so training a round's clients together is many times faster.

FedAvg on MNIST (the grid of ``executors.py``: CNN and MLP, batch 10 and 32, 20 and 100 clients), each (setting,
executor) in its own process, the median of training rounds 2..R. The goal of the issue "Speed": batched ≥ 5x
sequential at batch 10 with 20+ clients. Without a CUDA device the script says so and exits with code 2 (no GPU
was lent in the sessions that wrote it, so no number in the README comes from it yet).

    python benchmarks/speed/gpu.py --out benchmarks/speed/results/gpu.json
    python benchmarks/speed/gpu.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import executors  # benchmarks/speed/executors.py, beside this script
import measure

EXECUTORS = {"sequential": "sequential", "batched": "batched"}


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=12000, help="MNIST subsample (class-stratified)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu.py: torch finds no CUDA device (torch.cuda.is_available() is False); nothing measured")
        return 2
    grid = list(itertools.product(["cnn", "mlp"], [10, 32], [20, 100]))
    if args.quick:
        grid, args.samples, args.rounds = [("mlp", 10, 20)], 3000, 3
    rows = []
    started = time.perf_counter()
    for model, batch, clients in grid:
        cfg = executors.config(model, batch, clients, args.samples, args.rounds)
        results = {
            name: measure.in_child(
                executors.__file__, "measure", {"config": cfg, "executor": kind, "threads": 1, "device": "cuda"}
            )
            for name, kind in EXECUTORS.items()
        }
        base = results["sequential"]["seconds_per_round"]
        row = {
            "model": model,
            "batch": batch,
            "clients": clients,
            "device": torch.cuda.get_device_name(0),
            **{f"{name}_seconds_per_round": round(r["seconds_per_round"], 4) for name, r in results.items()},
            "batched_speedup": round(base / results["batched"]["seconds_per_round"], 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"rows": rows, "wall_seconds": round(time.perf_counter() - started, 1), "samples": args.samples}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print("| model | batch | clients | sequential s/round | batched s/round | batched / sequential |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['clients']} | {r['sequential_seconds_per_round']:.3f} | "
            f"{r['batched_seconds_per_round']:.3f} | {r['batched_speedup']}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
