"""FedDistill / FD (Jeong et al., 2018, "Communication-Efficient On-Device Machine Learning"), as in HtFLlib.

Clients share only per-class mean logits, a C x C table whatever the architecture: the server averages them into
a global "soft label" per class, and each client regularises its own model toward the global logits of each
sample's class, so knowledge crosses architectures at a cost independent of the model size.

HtFLlib (`clientfd.py`, `serverfd.py`, formerly `clientdistill.py`):
- the client collects the logits of every training batch it steps on (train mode, every local epoch, before that
  batch's update) and uploads their mean for each class it saw;
- the server averages each class's logit vectors **uniformly over the clients** that hold the class, and keeps
  only this round's table (a class no client sent this round has no global logit next round);
- loss = CE(z, y) + lam * D(z, t), where row i of the target t is the global logit of y_i, or the sample's own
  detached logits when class y_i has no global logit (round 1: CE only). ``lam`` = 1 (main.py and scripts).
- the evaluated model is the client's own model after its last local training.

The distillation term D changed over HtFLlib's history; ``distill_loss`` picks it:
- "mse" (default): ``nn.MSELoss`` (mean over B*C) between logits and target, the form HtFLlib used until
  April 2024 (FedTGP-era results) and the one the FD paper's logit regulariser reads as;
- "ce_softmax": cross-entropy against softmax(target), HtFLlib April 2024 - November 2025;
- "ce_logits": cross-entropy with the raw target logits as "probabilities", HtFLlib's current code (the target rows
  are not normalised, so this is not a distillation loss in the usual sense; kept for reproducing it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
from fedpal.algorithms.core.prototypes import present_means
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import Batch
from fedpal.common.tensors import Tensors


@dataclass(frozen=True)
class FedDistillHyperparameters:
    lam: float = 1.0  # weight of the distillation term (HtFLlib -lam 1, main.py and scripts)
    distill_loss: Literal["mse", "ce_softmax", "ce_logits"] = "mse"  # see the module docstring
    shuffle_train: bool = False  # HtFLlib's train loader is unshuffled (fixed order every epoch)
    drop_last: bool = True  # HtFLlib's train loader drops the last partial batch (a lone partial batch is kept)


def distill_term(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """D(z, t) of the FD loss for a batch of logits z and target rows t (HtFLlib's reductions)."""
    if kind == "mse":
        return F.mse_loss(logits, targets)
    if kind == "ce_softmax":
        return F.cross_entropy(logits, targets.softmax(dim=1))
    return F.cross_entropy(logits, targets)  # "ce_logits": raw logits as soft targets


@register_algorithm
class FedDistill(Algorithm):
    name = "feddistill"
    description = "clients share per-class mean logits; local CE + lam * distance to the global logits (FD, 2018)"
    reads_replies_directly = ("logits", "mask")  # per-class logits summed without noise
    Hyperparameters = FedDistillHyperparameters
    supports_heterogeneous_models = True

    def __init__(self, hp: FedDistillHyperparameters, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)

    # ---- server
    def empty_table(self) -> dict[str, torch.Tensor]:
        c = self.setup.num_classes
        device = self.setup.device
        return {"logits": torch.zeros(0, c, device=device), "mask": torch.zeros(c, dtype=torch.bool, device=device)}

    def init_server(self) -> ServerState:
        return self.empty_table()  # no global logits before the first round

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"logits": state["logits"], "mask": state["mask"]} for cid in client_ids}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        """Per-class means over the clients holding each class: read explicitly, not reduced as a whole."""
        if not replies:
            return state
        c = self.setup.num_classes
        sums = torch.zeros(c, c, dtype=torch.float64, device=self.setup.device)
        holders = torch.zeros(c, dtype=torch.int64, device=self.setup.device)
        for reply in replies.values():
            classes = reply["mask"].nonzero().squeeze(1)
            if reply["logits"].shape[0] != classes.numel():
                raise ValueError("feddistill reply: one logit row per class in the mask is required")
            sums.index_add_(0, classes, reply["logits"].double())
            holders[classes] += 1
        means, mask = present_means(sums, holders)  # uniform over the clients holding each class
        return {"logits": means.float(), "mask": mask}

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        return {"params": client.own_initial_params()}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        c = self.setup.num_classes
        mask: torch.Tensor = payload["mask"]
        device = client.device
        table = torch.zeros(c, c, device=device)
        table[mask] = payload["logits"]
        has_global = mask.any().item()
        sums = torch.zeros(c, c, device=device)
        counts = torch.zeros(c, dtype=torch.int64, device=device)
        lam, kind = self.hp.lam, self.hp.distill_loss

        def collect_and_distill(batch: Batch) -> torch.Tensor:
            detached = batch.logits.detach()
            sums.index_add_(0, batch.y, detached)
            counts.add_(torch.bincount(batch.y, minlength=c))
            if not has_global:
                return batch.logits.new_zeros(())
            targets = torch.where(mask[batch.y].unsqueeze(1), table[batch.y], detached)
            return lam * distill_term(batch.logits, targets, kind)

        result = client.fit(
            state["params"], extra_loss=collect_and_distill, shuffle=self.hp.shuffle_train, drop_last=self.hp.drop_last
        )
        means, held = present_means(sums, counts)
        return {"params": result.params}, {"logits": means, "mask": held}

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        return state["params"]

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {"mask": payload["mask"].shape}
