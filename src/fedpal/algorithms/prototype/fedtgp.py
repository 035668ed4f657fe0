"""FedTGP (Zhang et al., AAAI 2024): instead of averaging, the server learns the global prototypes with a small
generator (Trainable Global Prototypes) under an adaptive-margin contrastive loss, so each class's prototype stays
near its clients' prototypes yet at least a margin closer to them than any other class's. The margin is the
largest nearest-class gap among this round's averaged client prototypes, capped by tau. The generator persists
across rounds; clients are FedProto clients with eval-pass collection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedpal.algorithms.core import prototypes as protos
from fedpal.algorithms.core.contract import AlgorithmSetup, Reply, ServerState
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.prototype.base import Collection, PrototypeHyperparameters, PrototypeMethod
from fedpal.algorithms.prototype.trainable import PrototypeGenerator, adaptive_margin, train_generator
from fedpal.common.seeding import derive_seed
from fedpal.errors import ConfigError


@dataclass(frozen=True)
class FedTGPHyperparameters(PrototypeHyperparameters):
    lam: float = 10.0
    proto_collection: Collection = "eval_pass"
    server_epochs: int = 100  # K: epochs over the uploaded (prototype, class) pairs per round
    margin_threshold: float = 100.0  # tau, the cap on the adaptive margin
    server_batch_size: int = 0  # 0 = the clients' batch size (as in the source)
    server_lr: float = 0.0  # 0 = the clients' learning rate (as in the source)
    generator_hidden: int = 0  # hidden width of the generator; 0 = D
    generator_reinit: bool = False  # re-initialise the generator every round (the source keeps it)


@register_algorithm
class FedTGP(PrototypeMethod):
    name = "fedtgp"
    description = "server-trained global prototypes with an adaptive-margin contrastive loss (Zhang et al., 2024)"
    reads_replies_directly = ("prototypes",)  # its server trains the prototype generator on each client's prototypes
    Hyperparameters = FedTGPHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.server_epochs < 0 or hp.margin_threshold < 0:
            raise ConfigError("algorithm.server_epochs and algorithm.margin_threshold must be >= 0")
        super().__init__(hp, setup)
        self.generator = self._fresh_generator()

    def _fresh_generator(self) -> PrototypeGenerator:
        """Initialised on the CPU (the same tensors on every device), then moved to the run's device."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.setup.seed, "tgp-init"))
            generator = PrototypeGenerator(self.num_classes, self.dim, self.hp.generator_hidden or self.dim)
        return generator.to(self.setup.device)

    def init_server(self) -> ServerState:
        state = super().init_server()
        state["generator"] = {k: v.detach().clone() for k, v in self.generator.state_dict().items()}
        return state

    def make_global(
        self, state: ServerState, round: int, mean: torch.Tensor, present: torch.Tensor, replies: dict[int, Reply]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], ServerState]:
        hp = self.hp
        generator = self._fresh_generator() if hp.generator_reinit else self.generator
        if not hp.generator_reinit:
            generator.load_state_dict(state["generator"])
        vectors, labels = [], []
        for cid in sorted(replies):
            for key, vector in replies[cid]["prototypes"].items():
                vectors.append(vector)
                labels.append(int(key))
        if not vectors:
            return mean, present, {}, {}
        device = self.setup.device
        pairs, pair_labels = torch.stack(vectors), torch.tensor(labels, device=device)
        ones = torch.ones(self.num_classes, device=device)
        round_mean, round_present = protos.average(
            [
                (*protos.from_dict(r["prototypes"], self.num_classes, self.dim, device=device), ones)
                for r in replies.values()
            ],
            "uniform",
        )
        margin = adaptive_margin(round_mean, round_present, hp.margin_threshold)
        train = self.setup.train
        loss = train_generator(
            generator,
            pairs,
            pair_labels,
            margin=margin,
            epochs=hp.server_epochs,
            batch_size=hp.server_batch_size or train.batch_size,
            lr=hp.server_lr or train.lr,
            generator=torch.Generator().manual_seed(derive_seed(self.setup.seed, round, "tgp-train")),
        )
        with torch.no_grad():
            global_protos = generator.all_prototypes().detach()
        every = torch.ones(self.num_classes, dtype=torch.bool, device=device)
        kept = {"generator": {k: v.detach().clone() for k, v in generator.state_dict().items()}}
        return global_protos, every, {"margin": float(margin), "server_loss": float(loss)}, kept
