"""Reducer overhead (the benchmark's target (d), ≤ 5 % of a round): how long each aggregation rule takes to reduce
one round's 20 real FedAvg replies of the benchmark's model, against a measured FedAvg round, all in one process so
the ratios share one machine state.

    python benchmarks/robustness/overhead.py                       # both settings' MLP, and a ~1.1M-parameter MLP
    python benchmarks/robustness/overhead.py --repeats 9 --rounds 4

A FedAvg round runs through the engine's round driver (local training of all 20 clients, reply checks, the mean, as
in a benchmark run without evaluation); the last round's replies are kept at the reduction point, and every rule
then reduces those same replies (as deltas from the round's broadcast, as in a run) ``--repeats`` times after one
warm-up call. The first round is a warm-up too; medians are compared. Krum-style rules assume f = 4 (20 % of 20
clients), the norm bound the benchmark's DP clip. One torch thread, as in the benchmark. Writes overhead.json to
``--out`` (benchmarks/robustness/results/), which run.py's report reads.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedpal.algorithms.core.contract import ReduceKind
from fedpal.common.tensors import Tensors
from fedpal.config import AggregationConfig, load_config
from fedpal.data.federated import build_federated_data
from fedpal.engine.reduction import MeanReducer, build_reducer
from fedpal.engine.simulator import Simulator
from fedpal.robustness.rule import RULE_NAMES

HERE = Path(__file__).resolve().parent
CONFIGS = {"fmnist": HERE / "fmnist.toml", "hapt": HERE / "hapt.toml"}
MALICIOUS = 4  # f of the Krum-style rules: 20 % of 20 clients
NORM_BOUND = 0.5  # run.py's DP_CLIP
# (label, setting, extra overrides): the benchmark's two models, and the spec's ~1M-parameter case
MODELS = (
    ("MLP, Fashion-MNIST", "fmnist", ()),
    ("MLP, HAPT", "hapt", ()),
    ("MLP hidden 1200, Fashion-MNIST", "fmnist", ("model.hidden_dim=1200",)),
)


class RecordingReducer(MeanReducer):
    """The plain mean, holding every reply (as a robust rule must, so nothing is folded as replies arrive), and
    keeping the last round's model-update reduction: its replies, weights and reference."""

    streams = False

    def __init__(self) -> None:
        super().__init__()
        self.last: tuple[dict[int, Tensors], dict[int, float] | None, Tensors | None] | None = None

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        *,
        kind: ReduceKind = "update",
        reference: Tensors | None = None,
    ) -> Tensors:
        if kind == "update":
            self.last = (dict(parts), None if weights is None else dict(weights), reference)
        return super().__call__(parts, weights, kind=kind, reference=reference)


def median_seconds(call: Any, repeats: int) -> float:
    call()  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(label: str, setting: str, overrides: tuple[str, ...], rounds: int, repeats: int) -> dict[str, Any]:
    config = load_config(CONFIGS[setting], ["algorithm.name=fedavg", "run.executor=sequential", *overrides])
    data = build_federated_data(config.data, config.seed)
    sim = Simulator(config, data, run_dir=None, progress=False)
    recorder = RecordingReducer()
    sim.reduce = recorder
    sim.initialize()
    round_times = []
    for r in range(1, rounds + 1):
        started = time.perf_counter()
        sim.run_round(r)
        round_times.append(time.perf_counter() - started)
    assert recorder.last is not None, "FedAvg reduced no model update"
    parts, weights, reference = recorder.last
    rule_seconds = {}
    for name in RULE_NAMES:
        reducer = build_reducer(AggregationConfig(rule=name, byzantine=MALICIOUS, norm_bound=NORM_BOUND))
        reduce_once = functools.partial(reducer, parts, weights, kind="update", reference=reference)
        rule_seconds[name] = median_seconds(reduce_once, repeats)
    first = next(iter(parts.values()))
    return {
        "label": label,
        "setting": setting,
        "overrides": list(overrides),
        "clients": len(parts),
        "parameters": int(sum(t.numel() for t in first.values())),
        "round_seconds": statistics.median(round_times[1:] or round_times),
        "round_all": round_times,
        "rules": rule_seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="FedAvg rounds timed (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=5, help="timed reductions per rule")
    parser.add_argument("--models", default=",".join(str(i) for i in range(len(MODELS))), help="indices of MODELS")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every model")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    entries = []
    for index in (int(i) for i in args.models.split(",")):
        label, setting, overrides = MODELS[index]
        entry = measure(label, setting, (*overrides, *args.set), args.rounds, args.repeats)
        entries.append(entry)
        print(f"{label}: {entry['parameters']:,} parameters, round {entry['round_seconds']:.3f} s (median)")
        for name, seconds in entry["rules"].items():
            extra = (seconds - entry["rules"]["mean"]) / entry["round_seconds"]
            print(
                f"  {name:13s} {seconds:.4f} s   {100 * seconds / entry['round_seconds']:6.2f} % of a round, "
                f"{100 * extra:+6.2f} % over the mean"
            )
    note = (
        f"{datetime.date.today().isoformat()}, one torch thread, {os.cpu_count()} cores shared with other work, "
        f"{args.rounds} FedAvg rounds (the first a warm-up), {args.repeats} timed reductions per rule, f = "
        f"{MALICIOUS}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({"note": note, "models": entries}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
