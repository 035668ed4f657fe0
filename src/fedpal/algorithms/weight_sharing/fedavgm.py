"""FedAvgM (Hsu, Qi and Brown, 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification"): FedAvg whose server applies momentum to the round's pseudo-gradient.

Clients are FedAvg's (E local epochs from the global model, sample counts sent with the trained model). The server
takes the sample-weighted mean m of the replies through the engine's ``reduce``, so the pseudo-gradient is
Delta = sum_i (n_i / n)(w - w_i) = w - m, and then

    v <- beta * v + Delta,        w <- w - server_lr * v        (v starts at zero).

The step is evaluated in float64 as ``m - server_lr * beta * v_old + (1 - server_lr) * Delta``, which is the same
number algebraically and makes beta = 0, server_lr = 1 return m itself: FedAvg, bit for bit. Tensors that are not
floating point (integer buffers) take FedAvg's mean. NVlabs/FedFomo's baseline overwrites v with each client's
weighted delta and steps once per client; that is not reproduced (``docs/methods/fedavgm_cfl.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedpal.algorithms.core.averaging import mean_of_replies
from fedpal.algorithms.core.contract import AlgorithmSetup, Reduce, Reply, ServerState
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.weight_sharing.fedavg import FedAvg, FedAvgHyperparameters
from fedpal.common.tensors import Tensors, clone_tensors
from fedpal.errors import UserError


@dataclass(frozen=True)
class FedAvgMHyperparameters(FedAvgHyperparameters):
    beta: float = 0.9  # server momentum; 0 = FedAvg (with server_lr 1)
    server_lr: float = 1.0  # server step size on the momentum (the paper: 1)


def zero_momentum(params: Tensors) -> Tensors:
    """v = 0 for every floating tensor of the model, kept in float64."""
    return {
        k: torch.zeros(v.shape, dtype=torch.float64, device=v.device)
        for k, v in params.items()
        if v.is_floating_point()
    }


def momentum_step(
    params: Tensors, mean: Tensors, momentum: Tensors, beta: float, server_lr: float
) -> tuple[Tensors, Tensors]:
    """(w_next, v_next) from the global model w, the clients' weighted mean m and the momentum v (float64)."""
    new_params: Tensors = {}
    new_momentum: Tensors = {}
    for k, w in params.items():
        if k not in momentum:  # integer buffers: FedAvg's mean
            new_params[k] = mean[k]
            continue
        m = mean[k].to(torch.float64)
        delta = w.to(torch.float64) - m  # the pseudo-gradient w - m
        v_old = momentum[k]
        new_momentum[k] = beta * v_old + delta
        # w - lr (beta v_old + delta), written around m so beta = 0, lr = 1 gives m exactly
        new_params[k] = (m - (server_lr * beta) * v_old + (1.0 - server_lr) * delta).to(w.dtype)
    return new_params, new_momentum


@register_algorithm
class FedAvgM(FedAvg):
    name = "fedavgm"
    description = "FedAvg with server momentum on the pseudo-gradient (Hsu, Qi and Brown, 2019)"
    Hyperparameters = FedAvgMHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        if not 0.0 <= hp.beta < 1.0:
            raise UserError(f"algorithm.beta must be in [0, 1), got {hp.beta}")
        if hp.server_lr <= 0.0:
            raise UserError(f"algorithm.server_lr must be positive, got {hp.server_lr}")

    def init_server(self) -> ServerState:
        params = clone_tensors(self.setup.initial_params)
        return {"params": params, "momentum": zero_momentum(params)}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        if not replies:
            return state
        mean = mean_of_replies(state, replies, reduce)
        new_params, new_momentum = momentum_step(
            state["params"], mean, state["momentum"], self.hp.beta, self.hp.server_lr
        )
        return {**state, "params": new_params, "momentum": new_momentum}

    def server_diagnostics(self, server: ServerState) -> dict[str, float]:
        """||v||: the size of the server's momentum."""
        momentum = server["momentum"]
        if not momentum:
            return {}
        return {"momentum_norm": float(sum(v.square().sum() for v in momentum.values()) ** 0.5)}
