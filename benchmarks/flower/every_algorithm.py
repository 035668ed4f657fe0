"""Every registered algorithm on Flower's simulation runtime against the in-process simulator, on the conformance
suite's tiny configs (the tests check four of them in CI; this checks all, in ~20 s each on two cores).

    python benchmarks/flower/every_algorithm.py --out benchmarks/flower/results/every_algorithm.json

For each method: one run in-process and one with ``engine = "flower"`` (2 virtual nodes hosting 5 clients, 3
rounds of 5 local epochs, 3 clients a round, one unseen client), then every figure of the summaries and of every
evaluation compared, except what only the simulator measures (the generalization probe, unseen clients) and the
wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fedpal
from fedpal.algorithms.core.registry import all_algorithms

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import tiny_config
from tests.test_conformance import DIGITS, MODELS, model_kind

SIMULATOR_ONLY = ("generalization", "generalization_accuracy", "unseen", "wall_seconds", "evaluated_clients")
HAPT = {"dataset": "hapt", "num_clients": 5, "unseen_clients": 1, "max_samples": 800, "alpha": 0.5, "min_samples": 20}


def config(name: str) -> dict[str, Any]:
    cls = all_algorithms()[name]
    kind = model_kind(cls)
    raw = tiny_config(name, **copy.deepcopy(DIGITS))
    raw["model"] = dict(MODELS[kind])
    raw["train"]["local_epochs"] = 5  # enough steps that the models learn in 3 rounds: the figures compared move
    if kind == "hart_alp":  # the suite's synthetic windows exist only in its process: nodes read HAPT instead
        raw["data"] = dict(HAPT)
        raw["train"].update({"optimizer": "adam", "lr": 0.001, "batch_size": 16})
    if kind == "mosaic":
        raw["algorithm"]["local_steps"] = 4
    if name == "protonorm":
        raw["train"]["lr"] = 0.005
    raw["flower"] = {"nodes": 2, "round_timeout": 300.0, "wait_for_nodes": 300.0}
    return raw


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in dict.fromkeys([*a, *b]) if k not in SIMULATOR_ONLY]
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {str(a)[:40]} != {str(b)[:40]}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/flower/results/every_algorithm.json"))
    parser.add_argument("--methods", default="", help="comma-separated subset")
    args = parser.parse_args()
    names = args.methods.split(",") if args.methods else sorted(all_algorithms())
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in names:
        if name in results:
            continue
        with tempfile.TemporaryDirectory() as folder:
            raw = config(name)
            started = time.perf_counter()
            simulated = fedpal.run(raw, out=Path(folder) / "simulator")
            middle = time.perf_counter()
            flowered = fedpal.run(raw, out=Path(folder) / "flower", engine="flower")
            ended = time.perf_counter()
            read = lambda run: [json.loads(x) for x in (Path(folder) / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
            found = differences(simulated.summary, flowered.summary) + differences(read("simulator"), read("flower"))
        results[name] = {
            "identical": not found,
            "differences": found[:10],
            "personalized_accuracy": flowered.summary["personalized"]["accuracy"],
            "client_failures": flowered.summary["client_failures"],
            "seconds": {"simulator": round(middle - started, 1), "flower": round(ended - middle, 1)},
        }
        print(name, results[name], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    same = sum(r["identical"] for r in results.values())
    print(f"{same} of {len(results)} algorithms identical on Flower")


if __name__ == "__main__":
    main()
