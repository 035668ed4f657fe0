"""The algorithm contract (DESIGN §2): a protocol between a server and clients, written once, run by any engine.

Payloads (server -> client) and Replies (client -> server) are plain dicts whose values are tensors, numbers,
or one level of dicts of tensors (a parameter set). That is all an engine needs to count bytes, check replies
for NaN/Inf and wrong shapes, serialize them or batch them. Server and client states are dicts of the same
kinds, so checkpoints are a ``torch.save`` away.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedpal.algorithms.training import ExtraLoss, FitResult, LocalTrainer, Tensors, TrainSettings

Message = dict[str, Any]  # values: Tensor | int | float | dict[str, Tensor]
Payload = Message
Reply = Message
ServerState = dict[str, Any]
ClientState = dict[str, Any]


@dataclass(frozen=True)
class NoHyperparameters:
    """For algorithms without hyperparameters of their own."""


@dataclass(frozen=True)
class AlgorithmSetup:
    """What an algorithm is told once: the task, the local settings and the initial model tensors."""

    num_classes: int
    train: TrainSettings
    initial_params: Tensors  # of the first architecture (the only one in a homogeneous run)
    seed: int
    feature_dim: int = 0
    architectures: tuple[str, ...] = ()  # client i runs architectures[i % K]
    # Builds a fresh module of a named architecture for this task (e.g. the small shared model of FML/FedKD).
    build_module: Callable[[str], nn.Module] | None = None
    rounds: int = 0  # R, for methods with a schedule over the run (FedKD's SVD energy)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, round, client id, purpose, ...), independent of call order."""
    words = [p if isinstance(p, int) else int.from_bytes(p.encode()[:8].ljust(8, b"\0"), "little") for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class ClientView:
    """One client as an algorithm sees it during one call: its training/validation tensors and a trainer.

    The test split is deliberately absent: only the engine's evaluator reads it.
    """

    id: int
    round: int
    seed: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    trainer: LocalTrainer  # the reusable module of this client's architecture
    architecture: str = ""
    initial_params: Tensors | None = None  # seeded initial tensors of this client's architecture

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    def generator(self, purpose: str) -> torch.Generator:
        """A fresh generator for (seed, round, client, purpose)."""
        return torch.Generator().manual_seed(derive_seed(self.seed, self.round, self.id, purpose))

    def fit(
        self,
        params: Tensors,
        *,
        epochs: int | None = None,
        lr: float | None = None,
        extra_loss: ExtraLoss | None = None,
        purpose: str = "train",
        shuffle: bool = True,
        drop_last: bool = False,
        trainable: Callable[[nn.Module], list[nn.Parameter]] | None = None,
    ) -> FitResult:
        """Train ``params`` on this client's training split with the run's local settings."""
        return self.trainer.fit(
            params,
            self.train_x,
            self.train_y,
            self.generator(purpose),
            epochs=epochs,
            lr=lr,
            extra_loss=extra_loss,
            shuffle=shuffle,
            drop_last=drop_last,
            trainable=trainable,
            rng_seed=derive_seed(self.seed, self.round, self.id, purpose, "stochastic-layers"),
        )

    def own_initial_params(self) -> Tensors:
        """A copy of this client's architecture's initial tensors."""
        if self.initial_params is None:
            raise ValueError("this view carries no initial parameters")
        return {k: v.detach().clone() for k, v in self.initial_params.items()}


class Algorithm(ABC):
    """Server side: init_server, configure, aggregate. Client side: init_client, local_update.

    Evaluation asks ``personalized_params`` for each client's personalized model and ``global_params`` for the
    global model (None when the method has none).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Hyperparameters: ClassVar[type] = NoHyperparameters
    # True when every client's personalized model is the global model: evaluation then runs it once.
    personalized_is_global: ClassVar[bool] = False
    # True when clients may run different architectures (nothing architecture-specific is shared).
    supports_heterogeneous_models: ClassVar[bool] = False

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        self.hp = hp
        self.setup = setup

    # ---- server side
    @abstractmethod
    def init_server(self) -> ServerState: ...

    @abstractmethod
    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]: ...

    @abstractmethod
    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply]) -> ServerState: ...

    # ---- client side
    def init_client(self, client: ClientView) -> ClientState:
        """Personal tensors kept between rounds; none by default."""
        return {}

    @abstractmethod
    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]: ...

    def adapt_unseen(self, client: ClientView, server: ServerState) -> ClientState:
        """The state of a client that never trained, after the method's own adaptation to it (data.unseen_clients).

        By default the client joins for one round at the end, as a newly sampled client would: a fresh state, the
        payload the final server state gives it, one local update. Its reply is discarded and the server state is
        not changed, so the federation's results stay those of training. A method whose personalization works
        otherwise (e.g. fine-tuning only a head, or no adaptation at all) may override this.
        """
        state = self.init_client(client)
        payload = self.configure(server, client.round, [client.id])[client.id]
        state, _ = self.local_update(client, state, payload)
        return state

    # ---- evaluation
    @abstractmethod
    def personalized_params(self, client: ClientView, state: ClientState, server: ServerState) -> Tensors: ...

    def global_params(self, server: ServerState) -> Tensors | None:
        return None

    def inference_modes(self) -> tuple[str, ...]:
        """Names of the ways this method predicts; the first is the reported personalized prediction."""
        return ("model",)

    def predict_scores(
        self, client: ClientView, state: ClientState, server: ServerState, params: Tensors, x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Class scores [n, C] per inference mode (argmax = prediction; the reported loss is CE over them)."""
        return {"model": client.trainer.predict(params, x)}

    def diagnostics(self, server: ServerState, clients: dict[int, ClientState]) -> dict[str, float]:
        """Method-specific numbers recorded with each evaluation (e.g. prototype geometry)."""
        return {}

    # ---- optional checks an engine applies to replies, beyond NaN/Inf and shapes matching the payload
    def expected_reply_shapes(self, payload: Payload) -> dict[str, Any]:
        """Shapes a reply must have, by key (tensor: torch.Size; parameter set: {name: torch.Size})."""
        return {}


AlgorithmFactory = Callable[[Any, AlgorithmSetup], Algorithm]
