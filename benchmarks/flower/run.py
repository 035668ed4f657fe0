"""Flower overhead: seconds per round of one FedAvg run in-process, on Flower's simulation runtime and on a loopback
deployment (a SuperLink and two SuperNodes), and the bytes Flower moves against the bytes fedpal counts.

    python benchmarks/flower/run.py --out benchmarks/flower/results/flower.json

One config for all three (MNIST, 10 clients, every client every round, an evaluation every round), one run each,
one after another on this machine; the ratios are taken within this one invocation. Each mode's rounds are read
from its own metrics.jsonl (the driver's wall clock, evaluation included), the first round apart: it pays the
start-up (Ray's actors, the deployed node's first process). The bytes are measured on the simulation: each message
the Grid pushes or pulls is cut into Flower's objects and deflated as the Grid sends them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fedpal
from fedpal.config import from_dict, to_toml

CONFIG: dict[str, Any] = {
    "seed": 0,
    "data": {"dataset": "mnist", "partition": "dirichlet", "alpha": 0.1, "num_clients": 10, "max_samples": 12000},
    "model": {"name": "mlp"},
    "train": {"rounds": 6, "batch_size": 32, "lr": 0.05, "threads": 1, "local_epochs": 1},
    "eval": {"every": 1},
    "run": {"progress": False, "executor": "sequential"},  # in process, the simulator's own executor
    "flower": {"nodes": 2, "round_timeout": 300.0, "wait_for_nodes": 300.0},
    "algorithm": {"name": "fedavg"},
}


def round_seconds(run_dir: Path) -> list[float]:
    walls = [json.loads(line)["wall_seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip([0.0, *walls], walls, strict=False)]


def wire_counter() -> tuple[dict[str, int], Any]:
    """Counts the deflated size of every message the Flower executor pushes and every reply it pulls."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedpal.flower import executor

    counted = {"down": 0, "up": 0, "messages": 0}

    def size(message: Any) -> int:
        return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())

    original = executor.FlowerExecutor._exchange

    def exchange(self: Any, messages: list[Any]) -> Any:
        counted["down"] += sum(size(m) for m in messages)
        counted["messages"] += len(messages)
        for node, reply in original(self, messages):
            if reply is not None:
                counted["up"] += size(reply)
            yield node, reply

    executor.FlowerExecutor._exchange = exchange  # type: ignore[method-assign]
    return counted, original


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def deployment(config_file: Path, out: Path, scratch: Path, timeout: float) -> None:
    """A SuperLink and two SuperNodes (clients 0-4 and 5-9) on loopback, the run submitted, every process group
    ended by PID at the end."""
    home, port = scratch / "flwr", free_port()
    fedpal_cli = [sys.executable, "-m", "fedpal", "flower"]
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: object) -> None:
        log = (scratch / f"{name}.log").open("wb")
        started.append(
            subprocess.Popen(
                [*fedpal_cli, *map(str, args)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    try:
        start("superlink", "superlink", "--insecure", "--port", port, "--home", home)
        time.sleep(5)
        for name, clients in (("node-a", "0-4"), ("node-b", "5-9")):
            start(name, "supernode", "--superlink", f"127.0.0.1:{port}", "--insecure", "--clients", clients,
                  "--state-dir", scratch / f"state-{name}", "--port", free_port(), "--home", home)  # fmt: skip
        link = ["--superlink", f"127.0.0.1:{port}", "--insecure", "--home", str(home)]
        subprocess.run([*fedpal_cli, "submit", str(config_file), "--out", str(out), *link], check=True)
        deadline = time.monotonic() + timeout
        while not (out / "summary.json").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the deployed run did not finish within {timeout:.0f} s (logs in {scratch})")
            time.sleep(1)
    finally:
        for process in started:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        time.sleep(3)
        for process in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/flower/results/flower.json"))
    parser.add_argument("--rounds", type=int, default=CONFIG["train"]["rounds"])
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds the deployed run may take")
    args = parser.parse_args()
    raw = json.loads(json.dumps(CONFIG))
    raw["train"]["rounds"] = args.rounds
    results: dict[str, Any] = {"config": raw, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="fedpal-flower-bench-") as folder:
        scratch = Path(folder)
        config_file = scratch / "config.toml"
        config_file.write_text(to_toml(from_dict(raw).to_dict()))
        runs = {mode: scratch / mode for mode in ("in_process", "flower_simulation", "flower_deployment")}

        started = time.perf_counter()
        reference = fedpal.run(raw, out=runs["in_process"])
        results["modes"]["in_process"] = {"process_seconds": time.perf_counter() - started}

        counted, original = wire_counter()
        started = time.perf_counter()
        simulated = fedpal.run(raw, out=runs["flower_simulation"], engine="flower")
        results["modes"]["flower_simulation"] = {"process_seconds": time.perf_counter() - started}
        from fedpal.flower import executor

        executor.FlowerExecutor._exchange = original  # type: ignore[method-assign]

        started = time.perf_counter()
        deployment(config_file, runs["flower_deployment"], scratch, args.timeout)
        results["modes"]["flower_deployment"] = {"process_seconds": time.perf_counter() - started}
        deployed = json.loads((runs["flower_deployment"] / "summary.json").read_text())

        base = None
        for mode, run_dir in runs.items():
            seconds = round_seconds(run_dir)
            later = statistics.median(seconds[1:])
            base = base or later
            results["modes"][mode].update(
                first_round_seconds=seconds[0], median_round_seconds=later, ratio_to_in_process=later / base,
                round_seconds=seconds,
            )  # fmt: skip
        summaries = {
            "in_process": reference.summary,
            "flower_simulation": simulated.summary,
            "flower_deployment": deployed,
        }
        for mode, summary in summaries.items():
            results["modes"][mode].update(
                personalized_accuracy=summary["personalized"]["accuracy"], client_failures=summary["client_failures"]
            )
        counted_bytes = simulated.summary["bytes"]
        results["bytes"] = {
            "fedpal_counted": {key: counted_bytes[key] for key in ("down", "up", "evaluation_down")},
            "flower_wire": {"down": counted["down"], "up": counted["up"], "messages": counted["messages"]},
            "wire_over_counted": (counted["down"] + counted["up"])
            / max(1, counted_bytes["down"] + counted_bytes["up"] + counted_bytes["evaluation_down"]),
        }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(
        json.dumps(
            {m: {k: v for k, v in r.items() if k != "round_seconds"} for m, r in results["modes"].items()}, indent=1
        )
    )
    print(json.dumps(results["bytes"], indent=1))


if __name__ == "__main__":
    main()
