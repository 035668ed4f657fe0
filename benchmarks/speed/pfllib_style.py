"""fedpal against a loop written the way the common PFL libraries write it, on PFLlib's default workload.

Workload (PFLlib's defaults): MNIST, Dirichlet alpha = 0.1 over 20 clients, its 4-layer CNN (FedAvgCNN), batch 10,
SGD lr 0.005, 1 local epoch, all clients every round, evaluation every round. Both sides use the same clients'
splits (fedpal's partition) and the same initial model.

The library-style loop, written plainly here: every client object owns a deep copy of the model and an optimizer;
each round the server copies the global weights into every client, each client builds a DataLoader over its
training data and trains, the server averages the clients' models weighted by training samples, and every client
evaluates the global model on its test data and its training data (PFLlib's test and train metrics) through fresh
DataLoaders. It runs with torch's default threads, as those libraries do.

fedpal runs the same FedAvg through `fedpal.run` with its fastest CPU executor (worker processes, one thread each)
and evaluates every round under its own protocol (personalized, generalization, validation, global).

Both report seconds per round and the global model's test accuracy (sample-weighted over the clients' test splits)
after every round; each side runs in its own process, one after the other.

    python benchmarks/speed/pfllib_style.py --rounds 20 --out benchmarks/speed/results/pfllib_style.json
    python benchmarks/speed/pfllib_style.py --rounds 2 --max-samples 6000      # a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import measure  # benchmarks/speed/measure.py, beside this script


def workload(rounds: int, max_samples: int) -> dict[str, Any]:
    data: dict[str, Any] = {"dataset": "mnist", "partition": "dirichlet", "alpha": 0.1, "num_clients": 20}
    if max_samples:
        data["max_samples"] = max_samples
    return {
        "seed": 0,
        "data": data,
        "model": {"name": "cnn", "feature_dim": 512},
        "train": {"rounds": rounds, "batch_size": 10, "lr": 0.005, "local_epochs": 1, "optimizer": "sgd"},
        "eval": {"every": 1},
        "run": {"progress": False, "checkpoint_every": 0},
        "algorithm": {"name": "fedavg"},
    }


class LibraryClient:
    """A client as the common libraries keep it: its own model copy, optimizer and data, loaders built per use."""

    def __init__(self, model: Any, train: tuple[Any, Any], test: tuple[Any, Any], lr: float, batch: int) -> None:
        import torch

        self.model = copy.deepcopy(model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.train_data, self.test_data, self.batch = train, test, batch

    def loader(self, data: tuple[Any, Any], shuffle: bool) -> Any:
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(*data), batch_size=self.batch, shuffle=shuffle, drop_last=False)

    def set_parameters(self, model: Any) -> None:
        for new, old in zip(model.parameters(), self.model.parameters(), strict=True):
            old.data = new.data.clone()

    def train(self) -> None:
        from torch.nn import functional as F

        self.model.train()
        for x, y in self.loader(self.train_data, shuffle=True):
            self.optimizer.zero_grad()
            F.cross_entropy(self.model(x), y).backward()
            self.optimizer.step()

    def metrics(self, data: tuple[Any, Any]) -> tuple[int, float, int]:
        import torch
        from torch.nn import functional as F

        self.model.eval()
        correct, loss, n = 0, 0.0, 0
        with torch.no_grad():
            for x, y in self.loader(data, shuffle=False):
                out = self.model(x)
                correct += int((out.argmax(1) == y).sum())
                loss += float(F.cross_entropy(out, y, reduction="sum"))
                n += y.numel()
        return correct, loss, n


def library_style(raw: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process."""
    import torch

    from fedpal.config import from_dict
    from fedpal.data.federated import build_federated_data
    from fedpal.engine.assembly import assemble

    default_threads = torch.get_num_threads()  # torch's default (one per core), what the libraries run with
    cfg = from_dict(raw)
    data = build_federated_data(cfg.data, cfg.seed)
    global_model = copy.deepcopy(next(iter(assemble(cfg, data).trainers.values())).module)
    torch.set_num_threads(default_threads)  # assemble applied fedpal's own choice (train.threads = 0: one thread)
    torch.manual_seed(cfg.seed)
    t = cfg.train
    clients = [
        LibraryClient(global_model, (c.train_x, c.train_y), (c.test_x, c.test_y), t.lr, t.batch_size)
        for c in data.clients
    ]
    sizes = [c.train_y.numel() for c in data.clients]
    seconds, accuracy = [], []
    for _ in range(t.rounds):
        started = time.perf_counter()
        for client in clients:
            client.set_parameters(global_model)
            client.train()
        uploads = [copy.deepcopy(client.model) for client in clients]
        for param in global_model.parameters():
            param.data.zero_()
        for model, n in zip(uploads, sizes, strict=True):
            for server_param, client_param in zip(global_model.parameters(), model.parameters(), strict=True):
                server_param.data += client_param.data.clone() * (n / sum(sizes))
        correct = total = 0
        for client in clients:  # evaluate: the global model on every client's test and training data
            client.set_parameters(global_model)
            c, _, n = client.metrics(client.test_data)
            client.metrics(client.train_data)
            correct, total = correct + c, total + n
        seconds.append(time.perf_counter() - started)
        accuracy.append(correct / total)
    return {"seconds": seconds, "accuracy": accuracy, "threads": torch.get_num_threads()}


def fedpal_side(raw: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process."""
    import fedpal

    raw = copy.deepcopy(raw)
    raw["train"]["threads"] = 1
    raw["run"]["executor"] = "processes"
    started = time.perf_counter()
    result = fedpal.run(raw)
    walls = [entry["wall_seconds"] for entry in result.metrics]
    seconds = [b - a for a, b in zip([0.0, *walls[:-1]], walls, strict=True)]
    accuracy = [entry["personalized"]["accuracy"] for entry in result.metrics]
    return {"seconds": seconds, "accuracy": accuracy, "total_seconds": time.perf_counter() - started}


def in_child(kind: str, raw: dict[str, Any]) -> dict[str, Any]:
    return measure.in_child(__file__, kind, raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--max-samples", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, raw = args.child
        print(json.dumps((library_style if kind == "library" else fedpal_side)(json.loads(raw))))
        return
    raw = workload(args.rounds, args.max_samples)
    library = in_child("library", raw)
    ours = in_child("fedpal", raw)
    lib_s, our_s = statistics.median(library["seconds"]), statistics.median(ours["seconds"])
    report = {
        "workload": raw,
        "library_style": library,
        "fedpal_processes": ours,
        "median_seconds_per_round": {"library_style": lib_s, "fedpal": our_s},
        "speedup": lib_s / our_s,
        "final_accuracy": {"library_style": library["accuracy"][-1], "fedpal": ours["accuracy"][-1]},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print("| round | library-style s | library-style acc | fedpal s | fedpal acc |")
    print("|---|---|---|---|---|")
    for r in range(args.rounds):
        print(
            f"| {r + 1} | {library['seconds'][r]:.1f} | {library['accuracy'][r]:.4f} | "
            f"{ours['seconds'][r]:.1f} | {ours['accuracy'][r]:.4f} |"
        )
    print(f"median s/round: library-style {lib_s:.2f}, fedpal {our_s:.2f}; speed-up {lib_s / our_s:.2f}x")


if __name__ == "__main__":
    main()
