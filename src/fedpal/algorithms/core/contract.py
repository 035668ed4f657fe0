"""The algorithm contract (DESIGN §2): a protocol between a server and clients, written once, run by any engine.

Write every method as if each client were a separate process on another machine that holds only its own data and
state, because on Flower it is:

* server side: ``init_server``, ``configure`` (a payload per sampled client), ``aggregate`` (with the engine's
  ``reduce``), ``configure_evaluation`` (what a client needs to evaluate, e.g. the latest global prototypes),
  ``global_params`` and ``server_diagnostics``;
* client side: ``init_client``, ``local_update``, ``adapt_unseen``, ``personalized_params``, ``predict_scores``
  and ``client_diagnostics``. They receive the client's own view (data and module), its own state and a payload,
  and nothing else: they never read server state or call server functions.

Payloads (server -> client) and Replies (client -> server) are plain dicts whose values are tensors, numbers,
or one level of dicts of tensors (a parameter set). That is all an engine needs to count bytes, check replies for
NaN/Inf and wrong shapes, convert them to Flower's records or batch them. States are dicts of the same kinds, so
checkpoints are a ``torch.save`` away.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from fedpal.algorithms.core.training import ExtraLoss, FitResult, LocalTrainer, OptimizerFactory, TrainSettings
from fedpal.common.seeding import derive_seed
from fedpal.common.tensors import Tensors

Message = dict[str, Any]  # values: Tensor | int | float | dict[str, Tensor]
Payload = Message
Reply = Message
ServerState = dict[str, Any]
ClientState = dict[str, Any]

ReduceKind = Literal["update", "statistic"]
ClassUpload = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # prototypes [C, D], present [C], class counts [C]
CPU = torch.device("cpu")  # the default run.device


class Reduce(Protocol):
    """The engine's one reduction point (DESIGN §2): every average of client values goes through it, so a robust
    aggregator, clipping or noise configured in one place acts for every method.

    ``parts`` maps client ids to parameter sets; ``weights`` (same ids) are the averaging weights (None: uniform).
    ``kind`` says what the values are: "update" for model parameters (what robust aggregation and clipping act
    on), "statistic" for anything else (banks, statistics). ``reference`` is the parameter set the clients started
    from, for reducers that act on the updates' differences; the plain mean ignores it.
    """

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        *,
        kind: ReduceKind = "update",
        reference: Tensors | None = None,
    ) -> Tensors: ...

    def prototypes(
        self, uploads: Mapping[int, ClassUpload], weighting: Literal["uniform", "samples"]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class average of prototype payloads over the clients that hold each class. ``uploads`` maps client
        ids to (prototypes [C, D], present [C], class counts [C]); ``weighting``: every holder alike ("uniform") or
        by its class count ("samples"). Returns (the average [C, D], present [C])."""
        ...


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
    build_module: Callable[[str], nn.Module] | None = None  # the module comes back on ``device``
    rounds: int = 0  # R, for methods with a schedule over the run (FedKD's SVD energy)
    # where the run's tensors live (run.device): modules a method builds itself and server-side tensors go here
    device: torch.device = CPU
    num_clients: int = 0  # N training clients (ids 0..N-1), for server state indexed by client (FedFomo's affinities)
    # the initial tensors of every architecture (FedMosaic's reference model is the smallest one's)
    architecture_params: Mapping[str, Tensors] = field(default_factory=dict)
    # how adapter methods draw batches from a task stream's replay store (data.task_replay)
    task_replay: Literal["uniform", "priority"] = "uniform"


@dataclass
class ClientView:
    """One client as an algorithm sees it during one call: its training/validation tensors for this round and the
    reusable module of its architecture (inside ``trainer``).

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

    @property
    def device(self) -> torch.device:
        """Where this client's data live (the run's device): tensors the client creates belong there too."""
        return self.train_x.device

    @property
    def settings(self) -> TrainSettings:
        """The run's local optimisation settings (epochs, batch size, learning rate, optimizer)."""
        return self.trainer.settings

    def generator(self, purpose: str) -> torch.Generator:
        """A fresh generator for (seed, round, client, purpose)."""
        return torch.Generator().manual_seed(derive_seed(self.seed, self.round, self.id, purpose))

    def stochastic_seed(self, purpose: str) -> int:
        """The seed of torch's global generator (dropout, drop-path) for one pass of this client."""
        return derive_seed(self.seed, self.round, self.id, purpose, "stochastic-layers")

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
        forward_options: Mapping[str, Any] | None = None,
        optimizer_factory: OptimizerFactory | None = None,
    ) -> FitResult:
        """Train ``params`` on this client's training split with the run's local settings (see
        ``LocalTrainer.fit`` for the options)."""
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
            rng_seed=self.stochastic_seed(purpose),
            forward_options=forward_options,
            optimizer_factory=optimizer_factory,
        )

    def own_initial_params(self, part: Callable[[Tensors], Tensors] | None = None) -> Tensors:
        """A copy of this client's architecture's initial tensors, or of only ``part`` of them (a personal head):
        copying the whole model to keep a part leaves holes in the heap that many clients' parts then pin."""
        if self.initial_params is None:
            raise ValueError("this view carries no initial parameters")
        chosen = self.initial_params if part is None else part(self.initial_params)
        return {k: v.detach().clone() for k, v in chosen.items()}


class Algorithm(ABC):
    """Server side: init_server, configure, aggregate, configure_evaluation, global_params.
    Client side: init_client, local_update, adapt_unseen, personalized_params, predict_scores.

    Evaluation asks, on each client, ``personalized_params`` for its personalized model with the payload of
    ``configure_evaluation``; ``global_params`` gives the global model (None when the method has none).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Hyperparameters: ClassVar[type] = NoHyperparameters
    # True when every client's personalized model is the global model: evaluation then runs it once.
    personalized_is_global: ClassVar[bool] = False
    # True when clients may run different architectures (nothing architecture-specific is shared).
    supports_heterogeneous_models: ClassVar[bool] = False
    # The model the method works only with ("" = any model of the registry), e.g. FedAli's "hart_alp".
    required_model: ClassVar[str] = ""
    # True when the method trains adapters on a frozen trunk (``model.adapters``): FedMosaic and its baselines.
    requires_adapters: ClassVar[bool] = False
    # The adapters such a method trains: "co_lora" (Co-LoRA in the trunk's block-end layers, ordinary LoRA
    # elsewhere: FedMosaic) or "lora" (ordinary LoRA with trainable A, B in every layer: the baselines, as the
    # official code builds them).
    adapter_layout: ClassVar[Literal["co_lora", "lora"]] = "co_lora"
    # True when the method's local training is plain passes (``client.fit`` without options, any extra term a
    # ``FunctionalTerm``), which the client-batched executor can run for many clients at once.
    batched_training: ClassVar[bool] = False
    # (value key, weight key or None for uniform) when the server uses that reply field only through one ``reduce``
    # of it with those weights: the engine may then fold it into the mean as replies arrive (memory flat in the
    # number of clients) and hand ``aggregate`` placeholders that the reducer resolves.
    streamed_reply: ClassVar[tuple[str, str | None] | None] = None
    # Reply keys whose individual values the server uses beyond ``reduce`` (to weigh, cluster, distil or train on
    # them): under [privacy] noise they are released to the server's outputs without noise, so ε does not cover
    # them and the summary says so (``privacy.unprotected_keys``).
    reads_replies_directly: ClassVar[tuple[str, ...]] = ()
    # The authors' local-training settings at CPU scale, as [train] keys (``{"optimizer": "adam", "lr": 1e-3}``):
    # a run uses each one its config leaves unset, says so in its log and writes it to the resolved config.
    recommended_training: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        self.hp = hp
        self.setup = setup

    # ---- server side
    @abstractmethod
    def init_server(self) -> ServerState: ...

    @abstractmethod
    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]: ...

    @abstractmethod
    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        """The next server state from this round's accepted replies; averages go through ``reduce``."""

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        """What each client needs to evaluate its personalized model (nothing by default)."""
        return {cid: {} for cid in client_ids}

    def global_params(self, server: ServerState) -> Tensors | None:
        """The global model, for methods that have one (evaluated as a fresh client holding it)."""
        return None

    def server_diagnostics(self, server: ServerState) -> dict[str, float]:
        """Method-specific numbers of the server state recorded with each evaluation (e.g. prototype geometry)."""
        return {}

    def server_matrices(self, server: ServerState) -> dict[str, torch.Tensor]:
        """Client-by-client matrices of the server state recorded with each evaluation and drawn by the report
        (FedFomo's affinities); none by default."""
        return {}

    # ---- client side
    def init_client(self, client: ClientView) -> ClientState:
        """Personal tensors kept between rounds; none by default."""
        return {}

    @abstractmethod
    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]: ...

    def adapt_unseen(self, client: ClientView, state: ClientState, payload: Payload) -> ClientState:
        """The state of a client that never trained, after the method's own adaptation (data.unseen_clients).

        ``state`` is fresh (``init_client``) and ``payload`` is what the final server state would send this client.
        By default the client joins for one round at the end, as a newly sampled client would: one local update,
        its reply discarded, so the federation's results stay those of training. A method whose personalization
        works otherwise (fine-tuning only a head, or no adaptation at all) may override this.
        """
        state, _ = self.local_update(client, state, payload)
        return state

    @abstractmethod
    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        """The client's personalized model, from its own state and its evaluation payload."""

    def inference_modes(self) -> tuple[str, ...]:
        """Names of the ways this method predicts; the first is the reported personalized prediction."""
        return ("model",)

    def predict_scores(
        self, client: ClientView, state: ClientState, payload: Payload, params: Tensors, x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Class scores [n, C] per inference mode (argmax = prediction; the reported loss is CE over them)."""
        return {"model": client.trainer.predict(params, x)}

    def client_diagnostics(self, state: ClientState) -> dict[str, float]:
        """Numbers of one client's state; the engine reports their mean over clients (NaN values left out)."""
        return {}

    # ---- optional checks an engine applies to replies, beyond NaN/Inf and shapes matching the payload
    def expected_reply_shapes(self, payload: Payload) -> dict[str, Any]:
        """Shapes a reply must have, by key (tensor: torch.Size; parameter set: {name: torch.Size})."""
        return {}


AlgorithmFactory = Callable[[Any, AlgorithmSetup], Algorithm]
