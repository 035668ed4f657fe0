"""pFedMe (Dinh, Tran and Nguyen, NeurIPS 2020, "Personalized Federated Learning with Moreau Envelopes"): each client
keeps a personal model theta_i = argmin_theta f_i(theta) + (lam/2)||theta - w_i||^2, solved approximately, while its
local copy w_i of the global model is pulled toward theta_i; the server moves the global model toward the mean of
the uploaded w_i with step beta.

A round on a client, as the authors' code runs it: w_i = w; then R local iterations, each drawing one batch D and

    K inner steps   theta <- theta - p_lr (grad f(theta; D) + lam (theta - w_i) + mu theta)
    then            w_i   <- w_i - eta lam (w_i - theta)

(theta is not reset between iterations; it starts from w at the start of the round). The client uploads w_i and
keeps theta_i, its personalized model. The server: w <- (1 - beta) w + beta * mean(w_i), the mean through the
engine's ``reduce``. ``docs/methods/perfedavg_pfedme.md`` gives the defaults (the official code's README) and every
difference from the paper, the official code and PFLlib.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.algorithms.core.contract import (
    AlgorithmSetup,
    ClientState,
    ClientView,
    Payload,
    Reduce,
    Reply,
    ServerState,
)
from fedpal.algorithms.core.global_model import GlobalModelServer
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import seeded_stochastic_layers, train_steps
from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError


@dataclass(frozen=True)
class PFedMeHyperparameters:
    lam: float = 15.0  # lambda: strength of the pull between theta_i and w_i (official README)
    personal_lr: float = 0.09  # p_lr: step size of the inner solve for theta (official README, DNN on MNIST)
    inner_steps: int = 5  # K: inner steps per local iteration, all on the iteration's batch (official README)
    eta: float = 0.005  # step size of the w_i update (official --learning_rate)
    mu: float = 0.001  # L2 term on theta in the inner steps (hard-wired in both codes' optimizer)
    beta: float = 1.0  # server step toward the mean of the w_i (official README; 1 = plain mean)
    local_iterations: int = 20  # R, one batch each (official); 0 = train.local_epochs passes (PFLlib)
    theta_start: Literal["global", "personal"] = "global"  # theta at round start: w (both codes) or last round's
    evaluate: Literal["personal", "local"] = "personal"  # theta_i, or w_i after its latest training
    weighting: Literal["samples", "uniform"] = "samples"  # server mean: by training samples (both codes) or uniform


def gradients(loss: torch.Tensor, parameters: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """d loss / d parameters, zeros for parameters the loss does not reach."""
    return list(torch.autograd.grad(loss, list(parameters), allow_unused=True, materialize_grads=True))


def personal_steps(
    parameters: Sequence[nn.Parameter],
    anchor: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    *,
    steps: int,
    lr: float,
    lam: float,
    mu: float,
    first_loss: torch.Tensor | None = None,
) -> None:
    """K steps of the inner solve on theta (``parameters``, in place):
    theta <- theta - lr (grad f(theta) + lam (theta - w_i) + mu theta), with ``anchor`` = w_i and ``loss_fn()`` the
    loss of the current theta on the iteration's batch (``first_loss`` may carry the first one, already computed)."""
    params = list(parameters)
    for k in range(steps):
        loss = first_loss if k == 0 and first_loss is not None else loss_fn()
        grads = gradients(loss, params)
        with torch.no_grad():
            for p, w, g in zip(params, anchor, grads, strict=True):
                p.sub_(lr * (g + lam * (p - w) + mu * p))


def pull_local(anchor: Sequence[torch.Tensor], parameters: Sequence[nn.Parameter], *, eta: float, lam: float) -> None:
    """w_i <- w_i - eta lam (w_i - theta), in place on ``anchor``."""
    with torch.no_grad():
        for w, p in zip(anchor, parameters, strict=True):
            w.sub_(eta * lam * (w - p))


def server_step(previous: Tensors, mean: Tensors, beta: float) -> Tensors:
    """(1 - beta) w + beta mean, in float64 and cast back (beta = 1 gives the mean, beta = 0 w, bit for bit); a
    tensor that is not floating point (a counter) takes the mean's value."""
    out: Tensors = {}
    for k, m in mean.items():
        w = previous[k]
        if not m.is_floating_point():
            out[k] = m
            continue
        out[k] = ((1.0 - beta) * w.double() + beta * m.double()).to(m.dtype)
    return out


@register_algorithm
class PFedMe(GlobalModelServer):
    name = "pfedme"
    streamed_reply = ("params", "num_samples")
    description = "Moreau-envelope personal models pulled toward local copies of a global model (Dinh et al., 2020)"
    Hyperparameters: ClassVar[type] = PFedMeHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.inner_steps < 1 or hp.local_iterations < 0:
            raise ConfigError(
                "algorithm.inner_steps must be >= 1 and algorithm.local_iterations >= 0 (0 = train.local_epochs "
                f"passes), got {hp.inner_steps} and {hp.local_iterations}"
            )
        if hp.beta < 0:
            raise ConfigError(f"algorithm.beta must be >= 0, got {hp.beta}")
        if setup.train.grad_clip > 0:  # K inner proximal steps, then the pull of w_i: no single optimizer step
            raise ConfigError("train.grad_clip is not supported by 'pfedme' (its step is an inner proximal solve)")
        super().__init__(hp, setup)

    # ---- server
    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        if not replies:
            return state
        mean = self.average(state, replies, reduce)
        return {**state, "params": server_step(state["params"], mean, self.hp.beta)}

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"params": state["params"]} for cid in client_ids}  # for clients that have not trained yet

    # ---- client
    def iterations_of(self, client: ClientView) -> int:
        """R: the configured iterations, or one per batch of train.local_epochs passes over the client's split."""
        if self.hp.local_iterations > 0:
            return int(self.hp.local_iterations)
        return client.settings.epochs * math.ceil(client.num_train / client.settings.batch_size)

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        """R local iterations through ``train_steps``: the loop's forward pass gives f(theta; D) for the first inner
        step, and its ``update`` runs the K inner steps on that batch and then the w_i update."""
        hp = self.hp
        trainer, x, y = client.trainer, client.train_x, client.train_y
        module = trainer.module
        start = state["theta"] if hp.theta_start == "personal" and "theta" in state else payload["params"]
        with seeded_stochastic_layers(client.stochastic_seed("train"), x.device):
            trainer.load(start)
            module.train()
            names = [name for name, _ in module.named_parameters()]
            parameters = list(module.parameters())
            local = [payload["params"][name].detach().clone() for name in names]  # w_i
            n, batch_size = client.num_train, client.settings.batch_size
            count = self.iterations_of(client) if n else 0
            passes = math.ceil(count / math.ceil(n / batch_size)) if count else 0
            stream = islice(trainer.batches(n, client.generator("train"), epochs=passes, device=x.device), count)
            current: list[torch.Tensor] = []  # the iteration's batch, read by ``update``

            def iterations() -> Iterator[tuple[int, torch.Tensor]]:
                for epoch, idx in stream:
                    current[:] = [idx]
                    yield epoch, idx

            def loss_of(epoch: int, idx: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(module(x[idx]), y[idx])

            def update(loss: torch.Tensor) -> None:
                idx = current[0]
                personal_steps(
                    parameters,
                    local,
                    lambda: loss_of(0, idx),
                    steps=hp.inner_steps,
                    lr=hp.personal_lr,
                    lam=hp.lam,
                    mu=hp.mu,
                    first_loss=loss,
                )
                pull_local(local, parameters, eta=hp.eta, lam=hp.lam)

            result = train_steps(iterations(), loss_of, [], update=update)
            trainer.steps += result.steps * hp.inner_steps  # theta's K steps per iteration
            theta = trainer.snapshot()
        # w_i: its parameters, and the buffers (normalisation statistics) the passes left in the module
        local_by_name = dict(zip(names, local, strict=True))
        uploaded = {k: local_by_name[k] if k in local_by_name else v.clone() for k, v in theta.items()}
        new_state: ClientState = {"theta": theta}
        if hp.evaluate == "local":
            new_state["local"] = uploaded
        return new_state, {"params": uploaded, "num_samples": client.num_train}

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        key = "theta" if self.hp.evaluate == "personal" else "local"
        params: Tensors = state[key] if key in state else payload["params"]
        return params
