"""MOON (Li, He and Song, CVPR 2021, "Model-Contrastive Federated Learning"): FedAvg whose local loss pulls the
representation of the model being trained toward the global model's and pushes it away from the client's own
previous local model's:

    loss = CE + mu * l_con,   l_con = -log( e^{sim(z, z_glob)/tau} / (e^{sim(z, z_glob)/tau} + e^{sim(z, z_prev)/tau}) )

with sim the cosine similarity and z the backbone output. The global and previous models are frozen and run in
eval mode, as in the official code (QinbinLi/MOON calls ``.eval()`` on both) and FedAli's (Keras ``predict``).
Frozen eval-mode features of a sample do not change during local training, so they are computed once per
local update for the whole training split, as FedAli's code does, and indexed by each batch's positions.

First participation: a client has no previous model yet. The official code's pool is empty in round 1, so its
contrastive logits hold only the positive and the term is 0; taking the global model as the previous one makes
l_con = log 2 whatever z is, a zero gradient again. Both leave plain cross-entropy, which is what runs here (exactly,
without the rounding noise the constant term's backward would add). Only parameters travel, as in FedAvg; the
previous model never leaves the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from fedpal.algorithms.core.contract import AlgorithmSetup, ClientState, ClientView, Payload
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import FitResult, FunctionalTerm, TermBatch, TermStats
from fedpal.algorithms.weight_sharing.fedavg import FedAvg, FedAvgHyperparameters
from fedpal.errors import ConfigError

IGNORED = -100  # cross-entropy's default ignore_index: a label that leaves its row out


@dataclass(frozen=True)
class MoonHyperparameters(FedAvgHyperparameters):
    mu: float = 1.0  # weight of the model-contrastive term (official default and FedAli's value)
    tau: float = 0.5  # temperature (official default and FedAli's value)


def moon_contrastive(
    z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, tau: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of l_con: cross-entropy of [sim(z, z_glob), sim(z, z_prev)] / tau with the global as
    the positive, which is how the official code writes -log(e^a / (e^a + e^b)) stably. Rows whose ``mask`` is 0
    (a batched pass's padding) are left out of the mean through the cross-entropy's ignored label."""
    logits = torch.stack([F.cosine_similarity(z, z_glob, dim=1), F.cosine_similarity(z, z_prev, dim=1)], dim=1)
    positive = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    if mask is not None:
        positive = positive.masked_fill(mask == 0, IGNORED)
    return F.cross_entropy(logits / tau, positive, ignore_index=IGNORED)


@register_algorithm
class Moon(FedAvg):
    name = "moon"
    batched_training = True  # the contrastive term reads only the batch's features and precomputed rows
    description = "FedAvg with a model-contrastive term on representations (Li, He and Song, 2021)"
    Hyperparameters = MoonHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.mu < 0 or hp.tau <= 0:
            raise ConfigError(f"algorithm.mu must be >= 0 and algorithm.tau > 0, got mu = {hp.mu}, tau = {hp.tau}")
        super().__init__(hp, setup)

    @property
    def keeps_local_model(self) -> bool:
        return True  # the trained model is the next round's previous model z_prev comes from

    def train_locally(self, client: ClientView, payload: Payload, state: ClientState | None = None) -> FitResult:
        global_params = payload["params"]
        previous = (state or {}).get("params")
        if previous is None:  # first participation: previous = global makes the term a constant (log 2)
            return client.fit(global_params)
        # Features come from the client's own trainer before the fit reloads it: no extra module is needed.
        z_glob = client.trainer.features_and_logits(global_params, client.train_x)[0]
        z_prev = client.trainer.features_and_logits(previous, client.train_x)[0]
        term = FunctionalTerm(self.contrastive_term, rows={"z_glob": z_glob, "z_prev": z_prev})
        return client.fit(global_params, extra_loss=term)

    def contrastive_term(self, params: Mapping[str, torch.Tensor], batch: TermBatch) -> tuple[torch.Tensor, TermStats]:
        """mu * l_con of the batch's features against its rows of the frozen global and previous features."""
        contrastive = moon_contrastive(
            batch.features, batch.rows["z_glob"], batch.rows["z_prev"], self.hp.tau, batch.mask
        )
        return self.hp.mu * contrastive, {}
