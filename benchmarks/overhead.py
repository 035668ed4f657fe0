"""Engine overhead: one FedAvg round in fedpal against a plain PyTorch loop doing the same local training.

Both sides use the same model, the same resident tensors, the same batch order (the generator fedpal derives
from (seed, round, client)), the same optimizer settings and the same sample-weighted average; the plain loop
has no payloads, byte counting, reply checks or algorithm contract. Rounds alternate between the two and the
median is compared. Goal: ratio <= 1.10.

The second part runs a 500-client FedAvg-FT experiment on MNIST with the CNN in a child process and prints its
peak resident memory.

    .venv/bin/python benchmarks/overhead.py                 # MNIST, CNN, 20 clients
    .venv/bin/python benchmarks/overhead.py --model mlp --repeats 7
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

from fedpal.api import resolve
from fedpal.common.seeding import derive_seed
from fedpal.data.federated import build_federated_data
from fedpal.engine.simulator import Simulator


def plain_round(module: torch.nn.Module, global_state: dict, data, seed: int, round: int, cfg) -> dict:
    """The same FedAvg round as fedpal's, written as a plain PyTorch loop."""
    t = cfg.train
    total = sum(c.train_y.shape[0] for c in data.clients)
    new_state = {k: torch.zeros_like(v) for k, v in global_state.items()}
    for cid, client in enumerate(data.clients):
        module.load_state_dict(global_state)
        optimizer = torch.optim.SGD(module.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        generator = torch.Generator().manual_seed(derive_seed(seed, round, cid, "train"))
        x, y = client.train_x, client.train_y
        module.train()
        for _ in range(t.local_epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            for start in range(0, x.shape[0], t.batch_size):
                idx = order[start : start + t.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(module(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
        weight = x.shape[0] / total
        for k, v in module.state_dict().items():
            new_state[k].add_(v, alpha=weight)
    return new_state


def overhead(args: argparse.Namespace) -> None:
    overrides = [
        f'data.dataset="{args.dataset}"',
        f"data.num_clients={args.clients}",
        f'model.name="{args.model}"',
        'algorithm.name="fedavg"',
        f"data.max_samples={args.max_samples}",
        'run.executor="sequential"',  # the engine's own overhead, in this process
    ]
    cfg = resolve({}, overrides)
    data = build_federated_data(cfg.data, cfg.seed)
    sim = Simulator(cfg, data, run_dir=None, progress=False)
    sim.initialize()
    module = sim.trainer.module
    start_params = {k: v.clone() for k, v in sim.server["params"].items()}
    fedpal_times, plain_times = [], []
    plain_round(module, start_params, data, cfg.seed, 1, cfg)  # warm-up: first-call allocations, thread pools
    for repeat in range(args.repeats):
        sim.server = {"params": {k: v.clone() for k, v in start_params.items()}}
        t0 = time.perf_counter()
        sim.run_round(1)
        fedpal_times.append(time.perf_counter() - t0)
        fedpal_result = sim.server["params"]

        t0 = time.perf_counter()
        plain_result = plain_round(module, start_params, data, cfg.seed, 1, cfg)
        plain_times.append(time.perf_counter() - t0)
        if repeat == 0:
            diff = max(float((fedpal_result[k] - plain_result[k]).abs().max()) for k in plain_result)
            print(f"max |fedpal - plain| after one round: {diff:.2e} (same work => ~0)")
    f, p = statistics.median(fedpal_times), statistics.median(plain_times)
    samples = sum(c.train_y.shape[0] for c in data.clients)
    print(
        f"{args.dataset} / {args.model} / {args.clients} clients / {samples} training samples, "
        f"{args.repeats} repeats, torch threads {torch.get_num_threads()}"
    )
    print(f"fedpal round  median {f:.3f} s  (all: {', '.join(f'{t:.3f}' for t in fedpal_times)})")
    print(f"plain  round  median {p:.3f} s  (all: {', '.join(f'{t:.3f}' for t in plain_times)})")
    print(f"overhead ratio fedpal/plain = {f / p:.3f}  (goal <= 1.10)")


def peak_rss_kib() -> int:
    """This process's peak resident memory (VmHWM). Unlike getrusage's ru_maxrss, it is not inherited from the
    parent across fork + exec, so a child started from a big parent measures only itself."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(args: argparse.Namespace) -> None:
    """Run the 500-client FedAvg-FT experiment and print peak RSS as JSON (runs in its own process)."""
    t0 = time.perf_counter()
    after_import_kib = peak_rss_kib()
    overrides = [
        'data.dataset="mnist"',
        "data.num_clients=500",
        "data.alpha=0.1",
        'model.name="cnn"',
        'algorithm.name="fedavg_ft"',
        'run.executor="sequential"',  # this process's peak memory, without workers
        f"train.rounds={args.memory_rounds}",
        "train.client_fraction=0.1",
        f"eval.every={args.memory_rounds}",
        "eval.generalization_samples=1000",
        "eval.generalization_clients=100",
    ]
    cfg = resolve({}, overrides)
    data = build_federated_data(cfg.data, cfg.seed)
    after_data_kib = peak_rss_kib()
    summary = Simulator(cfg, data, run_dir=None, progress=False).run()
    peak_kib = peak_rss_kib()
    print(
        json.dumps(
            {
                "peak_rss_mib": round(peak_kib / 1024, 1),
                "after_import_mib": round(after_import_kib / 1024, 1),
                "after_data_mib": round(after_data_kib / 1024, 1),
                "seconds": round(time.perf_counter() - t0, 1),
                "personalized_accuracy": summary["personalized"]["accuracy"],
                "rounds": args.memory_rounds,
            }
        )
    )


def memory(args: argparse.Namespace) -> None:
    command = [sys.executable, __file__, "--memory-child", "--memory-rounds", str(args.memory_rounds)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    report = json.loads(out)
    print(
        f"500-client FedAvg-FT on MNIST with the CNN ({report['rounds']} rounds, 10% of clients per round, "
        f"evaluation fine-tunes all 500): peak RSS {report['peak_rss_mib']} MiB, {report['seconds']} s, "
        f"personalized accuracy {report['personalized_accuracy']:.4f}\n"
        f"  peak RSS after importing torch + fedpal {report['after_import_mib']} MiB, "
        f"after loading and partitioning MNIST {report['after_data_mib']} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--max-samples", type=int, default=0, help="class-stratified subsample (0 = all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-rounds", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    overhead(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
