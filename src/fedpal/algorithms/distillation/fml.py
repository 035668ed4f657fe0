"""FML (Shen et al., 2020, "Federated Mutual Learning"), as in HtFLlib: a shared model as go-between.

Each client keeps a personal model of its own architecture and trains, on the same batches, a shared model of one
architecture that the server averages (FedAvg). The two learn from each other by deep mutual learning (each
matches the other's predictions besides the labels), so the shared model carries knowledge across clients and
architectures while the personal model stays fitted to local data.

HtFLlib (`clientfml.py`, `serverfml.py`, `main.py`, `total.sh`):
- losses per batch, with KL = ``nn.KLDivLoss()`` (mean over all B*C elements, temperature 1, target not detached):
  L_personal = alpha * CE(z_p, y) + (1 - alpha) * KL(softmax(z_s) || softmax(z_p)),
  L_shared   = beta  * CE(z_s, y) + (1 - beta)  * KL(softmax(z_p) || softmax(z_s));
  both backward passes accumulate in both models (each follows the gradient of the sum), each model's gradient
  norm is clipped to 10, both use SGD at the local learning rate;
- alpha = beta = 0.5 in the benchmark scripts (main.py's default 1.0 switches the mutual terms off);
- the shared model is ``BaseHeadSplit(args, 0)``: client 0's architecture (or a separately named global model);
  here ``shared_model`` names an architecture, "" = the run's first architecture (client 0's), which works for
  image and sensor families alike;
- the server averages the uploaded shared models **uniformly** over the clients (1/len(uploaded_ids)), parameters
  only (buffers are not exchanged; fedpal's family models have none);
- the evaluated model is the personal model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from fedpal.algorithms.core.contract import (
    Algorithm,
    AlgorithmSetup,
    ClientState,
    ClientView,
    Payload,
    Reduce,
    Reply,
    ServerState,
)
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.distillation.mutual import (
    Member,
    MutualBatch,
    build_shared_trainer,
    kl_mean,
    mutual_fit,
    parameter_names,
    shared_architecture,
)
from fedpal.common.tensors import Tensors


@dataclass(frozen=True)
class FMLHyperparameters:
    alpha: float = 0.5  # CE weight of the personal model (HtFLlib scripts -al 0.5; main.py default 1.0)
    beta: float = 0.5  # CE weight of the shared model (HtFLlib scripts -bt 0.5; main.py default 1.0)
    shared_model: str = ""  # architecture of the shared model; "" = the run's first architecture (HtFLlib's choice)
    clip_norm: float = 10.0  # per-model gradient-norm clip (HtFLlib hard-codes 10); 0 = off
    shuffle_train: bool = False  # HtFLlib's train loader is unshuffled (fixed order every epoch)
    drop_last: bool = True  # HtFLlib's train loader drops the last partial batch (a lone partial batch is kept)


@register_algorithm
class FML(Algorithm):
    name = "fml"
    streamed_reply = ("shared", None)
    description = "personal model + FedAvg-shared model trained by deep mutual learning (Shen et al., 2020)"
    Hyperparameters = FMLHyperparameters
    supports_heterogeneous_models = True

    def __init__(self, hp: FMLHyperparameters, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        self.shared_name = shared_architecture(hp.shared_model, setup.architectures)
        self.shared = build_shared_trainer(setup.build_module, self.shared_name, setup.train, setup.seed)
        self.shared_names = parameter_names(self.shared.module)
        initial = self.shared.snapshot()
        self.shared_buffers = {k: v for k, v in initial.items() if k not in set(self.shared_names)}
        self.shared_initial = {k: initial[k] for k in self.shared_names}

    # ---- server
    def init_server(self) -> ServerState:
        return {"shared": {k: v.clone() for k, v in self.shared_initial.items()}}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"shared": state["shared"]} for cid in client_ids}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        if not replies:
            return state
        shared = {cid: reply["shared"] for cid, reply in replies.items()}
        return {**state, "shared": reduce(shared, None, reference=state["shared"])}  # uniform, as HtFLlib

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        return {"params": client.own_initial_params()}

    def mutual_loss(self, batch: MutualBatch) -> torch.Tensor:
        alpha, beta = self.hp.alpha, self.hp.beta
        z_p, z_s = batch.logits_a, batch.logits_b
        personal = alpha * F.cross_entropy(z_p, batch.y) + (1 - alpha) * kl_mean(z_p, z_s)
        shared = beta * F.cross_entropy(z_s, batch.y) + (1 - beta) * kl_mean(z_s, z_p)
        return personal + shared

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        result = mutual_fit(
            Member(client.trainer, state["params"]),
            Member(self.shared, {**payload["shared"], **self.shared_buffers}),
            client.train_x,
            client.train_y,
            client.generator("train"),
            self.mutual_loss,
            clip_norm=self.hp.clip_norm,
            shuffle=self.hp.shuffle_train,
            drop_last=self.hp.drop_last,
        )
        shared = {k: result.second[k] for k in self.shared_names}
        return {"params": result.first}, {"shared": shared}

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        return state["params"]

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {"shared": {k: v.shape for k, v in payload["shared"].items()}}
