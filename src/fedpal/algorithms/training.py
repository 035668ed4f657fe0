"""Shared local-training mechanics that method files call, so a method reads like its pseudocode.

One ``LocalTrainer`` per architecture is reused for every client: a client's tensors are copied into the module
in place, trained, and read back (no per-client deepcopy, no per-client optimizer kept between rounds). Batches
are index slices of the client's resident tensors drawn from a generator the engine derived from
(seed, round, client id), so results do not depend on the order in which clients run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

Tensors = dict[str, torch.Tensor]


@dataclass
class Batch:
    """One training step as an extra loss term sees it: the module, the batch and its forward pass.

    ``index`` holds the batch's positions in the client's training split, so a term can keep per-sample or
    per-class statistics (prototype collection during training) without a second forward pass.
    """

    module: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    epoch: int


ExtraLoss = Callable[[Batch], torch.Tensor]


def split_forward(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) in one pass for a backbone/head model; a plain module's logits double as features."""
    backbone = getattr(module, "backbone", None)
    head = getattr(module, "head", None)
    if backbone is None or head is None:
        logits = module(x)
        return logits, logits
    features = backbone(x)
    return features, head(features)


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation settings (from the `train` config section)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class FitResult:
    params: Tensors
    steps: int
    mean_loss: float


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator, *, epochs: int, shuffle: bool = True, drop_last: bool = False
) -> Iterator[tuple[int, torch.Tensor]]:
    """(epoch, positions) of every mini-batch: a fresh permutation per epoch (or the split's order), walked in
    slices; ``drop_last`` skips a final partial batch unless it is the only one."""
    last_start = n - batch_size if drop_last and n >= batch_size else n - 1
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, last_start + 1, batch_size):
            yield epoch, order[start : start + batch_size]


class LocalTrainer:
    """Loads tensors into one reusable module, trains it on index-sliced batches, reads tensors back."""

    def __init__(self, module: nn.Module, settings: TrainSettings) -> None:
        self.module = module
        self.settings = settings
        self._slots: Tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        self.steps = 0
        self.eval_batch_size = 2048

    def load(self, params: Tensors) -> None:
        """Copy a client's (or the server's) tensors into the shared module in place."""
        with torch.no_grad():
            for name, slot in self._slots.items():
                slot.copy_(params[name])

    def snapshot(self) -> Tensors:
        """Read the module's tensors back as an independent dict."""
        return {name: slot.detach().clone() for name, slot in self._slots.items()}

    def make_optimizer(
        self, lr: float | None = None, parameters: list[nn.Parameter] | None = None
    ) -> torch.optim.Optimizer:
        s = self.settings
        rate = s.lr if lr is None else lr
        params = list(self.module.parameters()) if parameters is None else parameters
        if s.optimizer == "adam":
            return torch.optim.Adam(params, lr=rate, weight_decay=s.weight_decay)
        return torch.optim.SGD(params, lr=rate, momentum=s.momentum, weight_decay=s.weight_decay)

    def fit(
        self,
        params: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        *,
        epochs: int | None = None,
        lr: float | None = None,
        extra_loss: ExtraLoss | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        trainable: Callable[[nn.Module], list[nn.Parameter]] | None = None,
        rng_seed: int | None = None,
    ) -> FitResult:
        """Run ``epochs`` passes of mini-batch training from ``params``; cross-entropy plus an optional term.

        ``shuffle=False`` keeps the split's order every epoch (HtFLlib's unshuffled loaders); ``drop_last`` skips
        a final partial batch (unless it is the only one); ``trainable`` picks the parameters the optimizer moves.
        ``rng_seed`` seeds torch's global generator for the pass (dropout, drop-path) and restores it afterwards,
        so stochastic layers give the same draws whatever order clients run in.
        """
        if rng_seed is None:
            return self._fit(params, x, y, generator, epochs, lr, extra_loss, shuffle, drop_last, trainable)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng_seed)
            return self._fit(params, x, y, generator, epochs, lr, extra_loss, shuffle, drop_last, trainable)

    def _fit(
        self,
        params: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        epochs: int | None,
        lr: float | None,
        extra_loss: ExtraLoss | None,
        shuffle: bool,
        drop_last: bool,
        trainable: Callable[[nn.Module], list[nn.Parameter]] | None,
    ) -> FitResult:
        self.load(params)
        module = self.module
        module.train()
        optimizer = self.make_optimizer(lr, None if trainable is None else trainable(module))
        losses: list[torch.Tensor] = []
        batches = batch_indices(
            x.shape[0],
            self.settings.batch_size,
            generator,
            epochs=self.settings.epochs if epochs is None else epochs,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        for epoch, idx in batches:
            xb, yb = x[idx], y[idx]
            optimizer.zero_grad(set_to_none=True)
            if extra_loss is None:
                logits = module(xb)
                loss = F.cross_entropy(logits, yb)
            else:
                features, logits = split_forward(module, xb)
                loss = F.cross_entropy(logits, yb)
                loss = loss + extra_loss(Batch(module, xb, yb, idx, features, logits, epoch))
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())  # no tensor op per step; summed once at the end
        steps = len(losses)
        self.steps += steps
        mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        return FitResult(self.snapshot(), steps, mean_loss)

    @torch.inference_mode()
    def predict(self, params: Tensors, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Logits of a parameter set on ``x`` in large batches."""
        batch_size = batch_size or self.eval_batch_size
        self.load(params)
        self.module.eval()
        if x.shape[0] == 0:
            return torch.zeros(0, getattr(self.module, "num_classes", 0))
        return torch.cat([self.module(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])

    @torch.inference_mode()
    def features_and_logits(
        self, params: Tensors, x: torch.Tensor, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode features and logits of a parameter set on ``x``, from one forward pass."""
        batch_size = batch_size or self.eval_batch_size
        self.load(params)
        self.module.eval()
        if x.shape[0] == 0:
            dim = getattr(self.module, "feature_dim", 0)
            return torch.zeros(0, dim), torch.zeros(0, getattr(self.module, "num_classes", 0))
        parts = [split_forward(self.module, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        return torch.cat([f for f, _ in parts]), torch.cat([lg for _, lg in parts])


def clone_tensors(params: Tensors) -> Tensors:
    return {k: v.detach().clone() for k, v in params.items()}


def weighted_average(items: list[tuple[Tensors, float]]) -> Tensors:
    """Sum of w_i * params_i / sum of w_i, accumulated in place (no stacking of all replies)."""
    total = float(sum(w for _, w in items))
    if total <= 0:
        raise ValueError("weighted_average needs a positive total weight")
    first, _ = items[0]
    out = {
        k: torch.zeros_like(v, dtype=torch.float32 if not v.is_floating_point() else v.dtype) for k, v in first.items()
    }
    for params, weight in items:
        for k, acc in out.items():
            acc.add_(params[k], alpha=weight / total)
    return {k: v.to(first[k].dtype) for k, v in out.items()}


def squared_distance(module: nn.Module, reference: Tensors) -> torch.Tensor:
    """||w - w_ref||^2 over the module's trainable parameters (FedProx's proximal term)."""
    terms = [(p - reference[name]).pow(2).sum() for name, p in module.named_parameters()]
    return torch.stack(terms).sum()
