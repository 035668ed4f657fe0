"""FedGH (Yi et al., 2023, "FedGH: Heterogeneous Federated Learning with Generalized Global Header"), as in HtFLlib.

Clients send per-class mean features (prototypes) of their own backbones; the server trains one global head on
those (prototype, label) pairs and every client adopts it. A head fitted to all clients' feature clusters is a
decision rule that generalises across data and architectures, and adopting it pulls the personal backbones
toward features that rule can read, while no backbone weight is ever shared.

HtFLlib (`clientgh.py`, `servergh.py`, `main.py`, `total.sh`):
- the server head starts as client 0's head and persists across rounds;
- before training (and before evaluation) every client replaces its head by the global head; it then trains the
  whole model with CE, and afterwards computes prototypes in an **eval-mode, no-grad pass** over its training data
  (the mean feature of each class it holds) and uploads them;
- the server trains the head with CE on all uploaded (prototype, label) pairs: ``server_epochs`` passes over the
  shuffled pairs in batches of the client batch size, plain SGD at ``server_lr`` (0.01); the benchmark scripts use
  ``-se 1`` (main.py's shared default, 100, is FedGen's generator setting);
- the evaluated model is the client's own backbone with the latest global head.

Departure: HtFLlib's prototype pass reuses the drop_last train loader, so the last partial batch's samples miss
the prototypes (and a client smaller than one batch sends none); here the pass covers all training samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.algorithms.core import prototypes
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
from fedpal.algorithms.core.training import batch_indices, train_steps
from fedpal.common.seeding import derive_seed
from fedpal.common.tensors import Tensors, clone_tensors

HEAD_KEYS = ("head.weight", "head.bias")


@dataclass(frozen=True)
class FedGHHyperparameters:
    server_epochs: int = 1  # passes of server head training per round (HtFLlib scripts -se 1)
    server_lr: float = 0.01  # SGD learning rate of the server head (HtFLlib -slr 0.01)
    server_batch_size: int = 0  # batch of (prototype, label) pairs; 0 = train.batch_size (HtFLlib uses -lbs)
    shuffle_train: bool = False  # HtFLlib's train loader is unshuffled (fixed order every epoch)
    drop_last: bool = True  # HtFLlib's train loader drops the last partial batch (a lone partial batch is kept)


@register_algorithm
class FedGH(Algorithm):
    name = "fedgh"
    batched_training = True
    description = "server trains a global head on clients' class prototypes; clients adopt it (Yi et al., 2023)"
    reads_replies_directly = ("protos", "mask")  # its server trains the head on each client's prototypes
    Hyperparameters = FedGHHyperparameters
    supports_heterogeneous_models = True

    def __init__(self, hp: FedGHHyperparameters, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        num_classes, dim = setup.initial_params["head.weight"].shape
        self.head = nn.Linear(int(dim), int(num_classes)).to(setup.device)  # the server's reusable head module

    # ---- server
    def init_server(self) -> ServerState:
        return {"head": clone_tensors({k: self.setup.initial_params[k] for k in HEAD_KEYS})}  # client 0's head

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"head": state["head"]} for cid in client_ids}

    def train_head(self, head: Tensors, protos: torch.Tensor, labels: torch.Tensor, round: int) -> Tensors:
        """``server_epochs`` passes of SGD with CE over the shuffled (prototype, label) pairs."""
        module = self.head
        with torch.no_grad():
            module.weight.copy_(head["head.weight"])
            module.bias.copy_(head["head.bias"])
        optimizer = torch.optim.SGD(module.parameters(), lr=self.hp.server_lr)
        generator = torch.Generator().manual_seed(derive_seed(self.setup.seed, round, "fedgh-server-head"))
        bs = self.hp.server_batch_size or self.setup.train.batch_size
        batches = batch_indices(protos.shape[0], bs, generator, epochs=self.hp.server_epochs, device=protos.device)
        train_steps(batches, lambda _, idx: F.cross_entropy(module(protos[idx]), labels[idx]), [optimizer])
        return {"head.weight": module.weight.detach().clone(), "head.bias": module.bias.detach().clone()}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        """The head is trained on every (prototype, label) pair, so the method reads the replies explicitly."""
        pairs = [(r["protos"], r["mask"].nonzero().squeeze(1)) for _, r in sorted(replies.items())]
        pairs = [(p, y) for p, y in pairs if y.numel() > 0]
        if not pairs:
            return state
        for p, y in pairs:
            if p.shape[0] != y.numel():
                raise ValueError("fedgh reply: one prototype per class in the mask is required")
        protos = torch.cat([p for p, _ in pairs]).float()
        labels = torch.cat([y for _, y in pairs])
        return {**state, "head": self.train_head(state["head"], protos, labels, round)}

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        return {"params": client.own_initial_params()}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        start = {**state["params"], **payload["head"]}
        result = client.fit(start, shuffle=self.hp.shuffle_train, drop_last=self.hp.drop_last)
        features, _ = client.trainer.features_and_logits(result.params, client.train_x)
        protos, mask = prototypes.present_means(
            *prototypes.class_sums(features, client.train_y, self.setup.num_classes)
        )
        return {"params": result.params}, {"protos": protos, "mask": mask}

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return self.configure(state, round, client_ids)  # HtFLlib sends the global head before evaluating

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        return {**state["params"], **payload["head"]}

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {"mask": torch.Size([self.setup.num_classes])}
