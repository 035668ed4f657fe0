"""Ditto (Li, Hu, Beirami and Smith, ICML 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization"): a global model trained by FedAvg, and beside it, on every client, a personal model v_i pulled
toward the global one, v_i = argmin f_i(v) + (lam / 2) ||v - w||^2.

A round on a client, as the authors' code runs it (``flearn/trainers_MTL/ditto.py``): on each mini-batch, the
personal step v_i <- v_i - lr (grad f_i(v_i) + lam (v_i - w^t)) with w^t the global model the round started from
(it does not move during the round), and the global step w_i <- w_i - lr grad f_i(w_i) on the same batch. The two
steps never read each other's tensors, so fedpal runs them as two passes over the same batch walk (the same
generator purpose): v_i's pass with the proximal term, then w_i's plain pass. The client uploads w_i and keeps v_i;
the server averages the w_i (sample-weighted by default, see ``docs/methods/ditto_fedrep_fedbabu_fedala.md``).
The personalized model is v_i; the global model is reported as the global row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from fedpal.algorithms.core.contract import (
    AlgorithmSetup,
    ClientState,
    ClientView,
    Payload,
    Reply,
)
from fedpal.algorithms.core.global_model import GlobalModelServer
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import FunctionalTerm, TermBatch, TermStats, parameter_distance
from fedpal.common.tensors import Tensors, clone_tensors
from fedpal.errors import ConfigError


@dataclass(frozen=True)
class DittoHyperparameters:
    lam: float = 1.0  # lambda of the personal objective f_i(v) + (lam/2)||v - w||^2 (authors' FMNIST script; PFLlib 0)
    weighting: Literal["samples", "uniform"] = "samples"  # server mean of the w_i (see the method doc)


@register_algorithm
class Ditto(GlobalModelServer):
    name = "ditto"
    streamed_reply = ("params", "num_samples")
    batched_training = True  # two plain passes, the personal one with a functional proximal term
    description = "FedAvg global model plus personal models pulled toward it by (lam/2)||v - w||^2 (Li et al., 2021)"
    Hyperparameters: ClassVar[type] = DittoHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.lam < 0:
            raise ConfigError(f"algorithm.lam must be >= 0, got {hp.lam}")
        super().__init__(hp, setup)

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        """v_i starts as the initial model, which is also the first global model (the authors' code)."""
        return {"v": client.own_initial_params()}

    def proximal_term(self, params: Mapping[str, torch.Tensor], batch: TermBatch) -> tuple[torch.Tensor, TermStats]:
        """(lam/2)||v - w^t||^2, w^t (the round-start global model) in the client's context."""
        return 0.5 * self.hp.lam * parameter_distance(params, batch.context), {}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        global_start = payload["params"]
        personal = client.fit(state["v"], extra_loss=FunctionalTerm(self.proximal_term, context=global_start))
        shared = client.fit(global_start)  # the same batches: the same generator purpose
        return {"v": personal.params}, {"params": shared.params, "num_samples": client.num_train}

    def adapt_unseen(self, client: ClientView, state: ClientState, payload: Payload) -> ClientState:
        """A client that joins after training starts its personal model from the global model it joins with (the
        training clients' v_i started from the first global model), then runs one round of Ditto."""
        state, _ = self.local_update(client, {"v": clone_tensors(payload["params"])}, payload)
        return state

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        return state["v"]
