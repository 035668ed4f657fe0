"""The in-process simulator: samples clients, calls the algorithm, checks and counts messages, evaluates on a
schedule, writes metrics and checkpoints. It never knows an algorithm by name.

All randomness is derived from (seed, round, client id, purpose), so a run is reproducible bit for bit, does
not depend on the order in which clients run, and a resumed run ends with the same numbers as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpal.algorithms.base import (
    Algorithm,
    AlgorithmSetup,
    ClientState,
    ClientView,
    ServerState,
    derive_seed,
)
from fedpal.algorithms.registry import get_algorithm_class
from fedpal.algorithms.training import LocalTrainer, TrainSettings
from fedpal.config import ExperimentConfig, build_dataclass
from fedpal.data.federated import FederatedData
from fedpal.engine.messages import message_bytes, reply_problem
from fedpal.engine.progress import Progress
from fedpal.engine.run_directory import RunDirectory
from fedpal.engine.summary import build_summary
from fedpal.errors import ConfigError
from fedpal.evaluation.evaluator import Evaluator
from fedpal.models.families import architecture_of, get_family
from fedpal.models.registry import build_model
from fedpal.pretraining.checkpoint import apply_pretrained

log = logging.getLogger("fedpal")


@dataclass
class Counters:
    """Running totals that a checkpoint must restore for a resumed run to match."""

    up_by_key: dict[str, int] = field(default_factory=dict)
    down_by_key: dict[str, int] = field(default_factory=dict)
    rejected_replies: int = 0
    local_steps: int = 0
    wall_seconds: float = 0.0

    def add(self, direction: str, by_key: dict[str, int]) -> None:
        table = self.up_by_key if direction == "up" else self.down_by_key
        for key, n in by_key.items():
            table[key] = table.get(key, 0) + n

    def as_bytes(self) -> dict[str, Any]:
        return {
            "up": sum(self.up_by_key.values()),
            "down": sum(self.down_by_key.values()),
            "up_by_key": dict(self.up_by_key),
            "down_by_key": dict(self.down_by_key),
        }


def sample_clients(config: ExperimentConfig, num_clients: int, round: int) -> list[int]:
    t = config.train
    count = t.clients_per_round if t.clients_per_round > 0 else max(1, round_half_up(t.client_fraction * num_clients))
    count = min(count, num_clients)
    if count == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(config.seed, round, "client-sampling"))
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def model_architectures(config: ExperimentConfig) -> tuple[tuple[str, ...], str]:
    """The architectures clients run (client i runs entry i mod K) and how backbones reach the feature size."""
    m = config.model
    if m.family:
        architectures = get_family(m.family)
        projection = "pool" if m.projection == "auto" else m.projection
    else:
        architectures = (m.name,)
        projection = "linear" if m.projection == "auto" else m.projection
    return architectures, projection


def build_algorithm(config: ExperimentConfig, data: FederatedData) -> tuple[Algorithm, dict[str, LocalTrainer]]:
    """One reusable module and trainer per architecture, and the algorithm with its typed hyperparameters."""
    cls = get_algorithm_class(config.algorithm_name)
    hp_values = {k: v for k, v in config.algorithm.items() if k != "name"}
    hp = build_dataclass(cls.Hyperparameters, hp_values, "algorithm")
    architectures, projection = model_architectures(config)
    if len(set(architectures)) > 1 and not cls.supports_heterogeneous_models:
        raise ConfigError(
            f"algorithm '{cls.name}' shares model weights and needs one architecture, but model.family "
            f"'{config.model.family}' has {len(set(architectures))}; use a heterogeneous-model method or unset it"
        )
    m = config.model

    def build_module(name: str) -> nn.Module:
        options = {"width": m.width, "blocks": m.blocks, "bank_sizes": m.bank_sizes, "hart_quirks": m.hart_quirks}
        return build_model(name, data.input_shape, data.num_classes, m.feature_dim, m.hidden_dim, projection, options)

    t = config.train
    settings = TrainSettings(t.local_epochs, t.batch_size, t.lr, t.optimizer, t.momentum, t.weight_decay)
    trainers: dict[str, LocalTrainer] = {}
    for name in dict.fromkeys(architectures):  # seeded initialisation without touching the caller's global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "model-init", *([name] if m.family else [])))
            trainers[name] = LocalTrainer(build_module(name), settings)
            trainers[name].eval_batch_size = config.eval.batch_size
        if m.pretrained:  # before any snapshot, so every method (FedAli and baselines) starts from it
            apply_pretrained(trainers[name].module, m.pretrained, name)
    setup = AlgorithmSetup(
        data.num_classes,
        settings,
        trainers[architectures[0]].snapshot(),
        config.seed,
        feature_dim=m.feature_dim,
        architectures=architectures,
        build_module=build_module,
        rounds=config.train.rounds,
    )
    return cls(hp, setup), trainers


class Simulator:
    def __init__(
        self,
        config: ExperimentConfig,
        data: FederatedData,
        run_dir: RunDirectory | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.data = data
        self.run_dir = run_dir
        if config.train.threads > 0:
            torch.set_num_threads(config.train.threads)
        self.algorithm, self.trainers = build_algorithm(config, data)
        self.architectures = self.algorithm.setup.architectures
        self.initial_params = {name: trainer.snapshot() for name, trainer in self.trainers.items()}
        self.evaluator = Evaluator(data, config.eval, config.seed)
        self.progress = Progress(config.train.rounds, config.algorithm_name, progress and config.run.progress)
        self.counters = Counters()
        self.history: list[dict[str, Any]] = []
        self.server: ServerState = {}
        self.clients: dict[int, ClientState] = {}
        self.next_round = 1

    # ---- views and state
    @property
    def trainer(self) -> LocalTrainer:
        """The first architecture's trainer (the only one in a homogeneous run)."""
        return self.trainers[self.architectures[0]]

    def local_steps(self) -> int:
        return sum(t.steps for t in self.trainers.values())

    def view(self, cid: int, round: int) -> ClientView:
        """Client ``cid``'s view; ids from num_clients on are the held-out clients (their own trainer too)."""
        c = self.data.client(cid)
        arch = architecture_of(cid, self.architectures)
        trainer = self.trainers[arch]
        return ClientView(
            cid,
            round,
            self.config.seed,
            c.train_x,
            c.train_y,
            c.val_x,
            c.val_y,
            trainer,
            arch,
            self.initial_params[arch],
        )

    def initialize(self) -> None:
        self.server = self.algorithm.init_server()
        self.clients = {cid: self.algorithm.init_client(self.view(cid, 0)) for cid in range(self.data.num_clients)}

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.server = checkpoint["server"]
        self.clients = checkpoint["clients"]
        self.counters = Counters(**checkpoint["counters"])
        self.next_round = int(checkpoint["round"]) + 1
        self.history = list(checkpoint["history"])

    def checkpoint_state(self, round: int) -> dict[str, Any]:
        return {
            "round": round,
            "server": self.server,
            "clients": self.clients,
            "counters": self.counters.__dict__,
            "history": self.history,
        }

    # ---- one round
    def run_round(self, round: int) -> None:
        ids = sample_clients(self.config, self.data.num_clients, round)
        payloads = self.algorithm.configure(self.server, round, ids)
        replies = {}
        for cid in ids:
            payload = payloads[cid]
            self.counters.add("down", message_bytes(payload))
            steps_before = self.local_steps()
            new_state, reply = self.algorithm.local_update(self.view(cid, round), self.clients[cid], payload)
            self.counters.local_steps += self.local_steps() - steps_before
            problem = reply_problem(reply, self.algorithm.expected_reply_shapes(payload))
            # A rejected reply still travelled; one holding a non-message value has no size (reply_problem says why).
            with contextlib.suppress(TypeError):
                self.counters.add("up", message_bytes(reply))
            if problem is not None:
                self.counters.rejected_replies += 1
                message = f"round {round}: rejected reply of client {cid}: {problem}"
                log.warning(message)
                if self.run_dir is not None:
                    self.run_dir.log(message)
                continue
            self.clients[cid] = new_state
            replies[cid] = reply
        self.server = self.algorithm.aggregate(self.server, round, replies)

    def evaluate(self, round: int) -> dict[str, Any]:
        metrics = self.evaluator.evaluate(self.algorithm, self.server, self.clients, lambda cid: self.view(cid, round))
        return {
            "round": round,
            "wall_seconds": round_wall(self.counters.wall_seconds),
            "local_steps": self.counters.local_steps,
            "bytes": self.counters.as_bytes(),
            "rejected_replies": self.counters.rejected_replies,
            **metrics,
        }

    def evaluate_unseen(self, round: int) -> dict[str, Any]:
        """Adapt each held-out client from the final server state with the method's own ``adapt_unseen`` and
        evaluate it. Nothing here reaches the server, the training clients or the counters of training."""
        n = self.data.num_clients
        steps_before = self.local_steps()
        adapted = {
            cid: self.algorithm.adapt_unseen(self.view(cid, round), self.server)
            for cid in range(n, n + len(self.data.unseen))
        }
        steps = self.local_steps() - steps_before
        metrics = self.evaluator.evaluate_unseen(
            self.algorithm, self.server, adapted, lambda cid: self.view(cid, round)
        )
        return {**metrics, "adaptation_steps": steps}

    # ---- the loop
    def run(self) -> dict[str, Any]:
        if self.next_round == 1 and not self.server and not self.clients:
            self.initialize()
        rounds = self.config.train.rounds
        every = self.config.eval.every
        ckpt_every = self.config.run.checkpoint_every
        for r in range(self.next_round, rounds + 1):
            started = time.perf_counter()
            self.run_round(r)
            entry = None
            if r % every == 0 or r == rounds:
                entry = self.evaluate(r)
                if r == rounds and self.data.unseen:  # before the checkpoint, so a finished run keeps it
                    entry["unseen"] = self.evaluate_unseen(r)
            self.counters.wall_seconds += time.perf_counter() - started
            if entry is not None:
                entry["wall_seconds"] = round_wall(self.counters.wall_seconds)
                self.history.append(entry)
                if self.run_dir is not None:
                    self.run_dir.append_metrics(entry)
                brief = {"acc": entry["personalized"]["accuracy"], "gen": entry["generalization"]["accuracy"]}
                self.progress.update(r, brief)
            else:
                self.progress.update(r)
            if self.run_dir is not None and ckpt_every > 0 and (r % ckpt_every == 0 or r == rounds):
                self.run_dir.save_checkpoint(self.checkpoint_state(r))
            self.next_round = r + 1
        self.progress.close()
        summary = build_summary(self.config, self.history, self.counters)
        if self.run_dir is not None:
            self.run_dir.write_summary(summary)
        return summary


def round_wall(seconds: float) -> float:
    return round(seconds, 3)
