"""Per-FedAvg (Fallah, Mokhtari and Ozdaglar, NeurIPS 2020, "Personalized Federated Learning with Theoretical
Guarantees: A Model-Agnostic Meta-Learning Approach"): FedAvg on the MAML objective F_i(w) = f_i(w - alpha grad f_i(w)),
so that the global model is a starting point from which one local gradient step personalizes it.

Each of a client's tau local steps draws fresh batches D, D' (and D'' for the Hessian-free variant) and moves w by

    w~ = w - alpha grad f(w; D)
    FO: w <- w - beta grad f(w~; D')
    HF: w <- w - beta [grad f(w~; D') - alpha d],  d = (grad f(w + delta g; D'') - grad f(w - delta g; D'')) / (2 delta)

with g = grad f(w~; D') (d is a finite-difference Hessian-vector product). The server averages the uploaded models
(sample-weighted, through the engine's ``reduce``); a client's personalized model is the global model after one SGD
step of size alpha on one batch of its own training split. ``docs/methods/perfedavg_pfedme.md`` gives the defaults
and where they come from (the pFedMe authors' implementation) and every difference from the paper and PFLlib.
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
)
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import (
    FitResult,
    batch_stream,
    seeded_stochastic_layers,
    train_steps,
)
from fedpal.algorithms.weight_sharing.fedavg import FedAvg
from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError

Variant = Literal["fo", "hf"]
Weighting = Literal["samples", "uniform"]


@dataclass(frozen=True)
class PerFedAvgHyperparameters:
    variant: Variant = "fo"  # fo: first-order step; hf: Hessian-free step (finite-difference Hessian-vector product)
    alpha: float = 0.005  # personalization step size (pFedMe repo's --learning_rate)
    beta: float = 0.001  # meta step size (pFedMe repo README's --beta for PerAvg)
    delta: float = 1e-3  # finite-difference step of the HF variant
    local_steps: int = 20  # tau, steps per round (pFedMe repo); 0 = train.local_epochs passes over the split
    weighting: Weighting = "samples"  # server mean: by training samples (both codes) or uniform (the paper)


def gradients(loss: torch.Tensor, parameters: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """d loss / d parameters, zeros for parameters the loss does not reach."""
    return list(torch.autograd.grad(loss, list(parameters), allow_unused=True, materialize_grads=True))


def meta_step(
    parameters: Sequence[nn.Parameter],
    loss_on: Callable[[torch.Tensor], torch.Tensor],
    batches: Sequence[torch.Tensor],
    *,
    alpha: float,
    beta: float,
    variant: str = "fo",
    delta: float = 1e-3,
    first_loss: torch.Tensor | None = None,
) -> None:
    """One Per-FedAvg step on ``parameters`` (in place, from their current values w).

    ``loss_on(batch)`` is the loss of the module's current parameters on a batch; ``batches`` are D, D' and, for
    ``variant = "hf"``, D''. ``first_loss`` may carry f(w; D) already computed (the training loop's forward pass).
    """
    if len(batches) < (3 if variant == "hf" else 2):
        raise ValueError(f"a {variant} step needs {3 if variant == 'hf' else 2} batches, got {len(batches)}")
    params = list(parameters)
    start = [p.detach().clone() for p in params]
    g0 = gradients(loss_on(batches[0]) if first_loss is None else first_loss, params)
    with torch.no_grad():
        for p, w, g in zip(params, start, g0, strict=True):
            p.copy_(w - alpha * g)  # w~
    g1 = gradients(loss_on(batches[1]), params)
    direction = g1
    if variant == "hf":
        with torch.no_grad():
            for p, w, g in zip(params, start, g1, strict=True):
                p.copy_(w + delta * g)
        plus = gradients(loss_on(batches[2]), params)
        with torch.no_grad():
            for p, w, g in zip(params, start, g1, strict=True):
                p.copy_(w - delta * g)
        minus = gradients(loss_on(batches[2]), params)
        direction = [g - alpha * (gp - gm) / (2.0 * delta) for g, gp, gm in zip(g1, plus, minus, strict=True)]
    with torch.no_grad():
        for p, w, d in zip(params, start, direction, strict=True):
            p.copy_(w - beta * d)


def grouped(stream: Iterator[tuple[int, torch.Tensor]], size: int) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Consecutive batches of ``stream`` in groups of ``size`` (the epoch of a group is its first batch's)."""
    while True:
        group = list(islice(stream, size))
        if len(group) < size:
            return
        yield group[0][0], [idx for _, idx in group]


@register_algorithm
class PerFedAvg(FedAvg):
    name = "perfedavg"
    streamed_reply = ("params", "num_samples")
    batched_training = False  # its own two- or three-gradient step
    description = "FedAvg on a MAML objective, personalized by one local gradient step (Fallah et al., 2020)"
    Hyperparameters: ClassVar[type] = PerFedAvgHyperparameters
    personalized_is_global = False

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.local_steps < 0:
            raise ConfigError(
                f"algorithm.local_steps must be >= 0 (0 = train.local_epochs passes), got {hp.local_steps}"
            )
        if hp.variant == "hf" and hp.delta <= 0:
            raise ConfigError(f"algorithm.delta must be > 0 for the hf variant, got {hp.delta}")
        if setup.train.grad_clip > 0:  # w~ and the meta-update each follow other gradients: none is "the" gradient
            raise ConfigError("train.grad_clip is not supported by 'perfedavg' (its step combines several gradients)")
        super().__init__(hp, setup)

    @property
    def batches_per_step(self) -> int:
        return 3 if self.hp.variant == "hf" else 2

    def steps_of(self, client: ClientView) -> int:
        """tau: the configured steps, or as many as consume train.local_epochs passes over the client's split."""
        if self.hp.local_steps > 0:
            return int(self.hp.local_steps)
        per_pass = math.ceil(client.num_train / client.settings.batch_size)
        return max(1, client.settings.epochs * per_pass // self.batches_per_step) if per_pass else 0

    def train_locally(self, client: ClientView, payload: Payload, state: ClientState | None = None) -> FitResult:
        """tau Per-FedAvg steps from the global model, each on its own fresh batches, through ``train_steps``: the
        loop's forward pass gives f(w; D) and ``meta_step`` (its ``update``) takes the other gradients."""
        trainer, x, y = client.trainer, client.train_x, client.train_y
        module = trainer.module
        hp = self.hp
        with seeded_stochastic_layers(client.stochastic_seed("train"), x.device):
            trainer.load(payload["params"])
            module.train()
            parameters = list(module.parameters())
            count = self.steps_of(client) * self.batches_per_step
            stream = batch_stream(trainer, client.num_train, client.generator("train"), count, x.device)
            current: list[torch.Tensor] = []  # the step's batches D, D' (, D''), read by ``update``

            def steps() -> Iterator[tuple[int, torch.Tensor]]:
                for epoch, group in grouped(stream, self.batches_per_step):
                    current[:] = group
                    yield epoch, group[0]

            def loss_on(idx: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(module(x[idx]), y[idx])

            def update(loss: torch.Tensor) -> None:
                meta_step(
                    parameters,
                    loss_on,
                    current,
                    alpha=hp.alpha,
                    beta=hp.beta,
                    variant=hp.variant,
                    delta=hp.delta,
                    first_loss=loss,
                )

            result = train_steps(steps(), lambda epoch, idx: loss_on(idx), [], update=update)
            trainer.steps += result.steps
            return FitResult(trainer.snapshot(), result.steps, result.mean_loss)

    def adapt_unseen(self, client: ClientView, state: ClientState, payload: Payload) -> ClientState:
        """Nothing to keep: a new client personalizes the global model by the one step of evaluation."""
        return state

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        """The global model after one SGD step of size alpha on one training batch of the client (the first batch of
        a permutation drawn from the client's "perfedavg-eval" generator), in train mode as during training."""
        if client.num_train == 0 or self.hp.alpha == 0:
            return payload["params"]
        trainer, x, y = client.trainer, client.train_x, client.train_y
        module = trainer.module
        stream = batch_stream(trainer, client.num_train, client.generator("perfedavg-eval"), 1, x.device)
        with seeded_stochastic_layers(client.stochastic_seed("perfedavg-eval"), x.device):
            trainer.load(payload["params"])
            module.train()
            optimizer = torch.optim.SGD(module.parameters(), lr=self.hp.alpha)
            train_steps(stream, lambda epoch, idx: F.cross_entropy(module(x[idx]), y[idx]), [optimizer])
            return trainer.snapshot()
