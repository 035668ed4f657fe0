"""Shared local-training mechanics that method files call, so a method reads like its pseudocode.

One ``LocalTrainer`` per architecture is reused for every client: a client's tensors are copied into the module
in place, trained, and read back (no per-client deepcopy, no per-client optimizer kept between rounds). Batches
are index slices of the client's resident tensors drawn from a generator the engine derived from
(seed, round, client id), so results do not depend on the order in which clients run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.common.tensors import Tensors


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
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
TermStats = dict[str, torch.Tensor]


@dataclass
class TermBatch:
    """One training step as a functional term sees it: no module, only tensors, so the same term runs on one
    client's live module and inside the batched executor's ``vmap`` over many clients.

    ``mask`` is 1 for real rows and 0 for padding (the batched executor pads every client's batch to one width;
    padding rows repeat a real sample, so they are finite but must not count). ``context`` holds the client's own
    tensors (a reference model, targets); ``rows`` the client's per-training-row tensors, already sliced to this
    batch. ``batched`` is True inside ``vmap``: there a term may not read values on the host (``bool``, ``int``) and
    ``epoch`` is a 0-d tensor; on the sequential path it is an ``int`` and every row is real.
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    mask: torch.Tensor
    epoch: int | torch.Tensor
    context: Mapping[str, torch.Tensor]
    rows: Mapping[str, torch.Tensor]
    batched: bool = False

    def real_mean(self, padded_mean: torch.Tensor) -> torch.Tensor:
        """A mean over all rows, padding rows contributing 0, as the mean over the real rows; unchanged (bit for
        bit) when no row can be padding."""
        if not self.batched:
            return padded_mean
        return padded_mean * (self.mask.numel() / self.mask.sum())


@dataclass(frozen=True)
class FunctionalTerm:
    """An extra loss term written as a function of the parameters, so the client-batched executor can train many
    clients' terms in one ``vmap``; anywhere else it is an ordinary ``ExtraLoss`` (pass it as ``extra_loss``).

    ``fn(params, batch) -> (loss, stats)``: ``params`` is the parameter dict ``functional_call`` uses (the live
    module's own parameters on the sequential path), ``stats`` a dict of per-step tensors (``{}`` for none), whose
    padding rows ``fn`` masks itself. ``after_step(stats, epoch)`` runs once per step outside ``vmap``, one client
    at a time, to accumulate them (prototype collection). Clients are trained together only when their ``fn`` are
    equal (make it a bound method of the algorithm, with per-client tensors in ``context`` and ``rows``, not a
    closure) and their context tensors have equal shapes.
    """

    fn: Callable[[Mapping[str, torch.Tensor], TermBatch], tuple[torch.Tensor, TermStats]]
    context: Mapping[str, torch.Tensor] = field(default_factory=dict)
    rows: Mapping[str, torch.Tensor] = field(default_factory=dict)
    after_step: Callable[[TermStats, int], None] | None = None

    def __call__(self, batch: Batch) -> torch.Tensor:
        """The sequential path: ``fn`` on the live module's parameters, every row real."""
        features = batch.features
        mask = torch.ones(batch.y.shape[0], dtype=features.dtype, device=features.device)
        rows = {name: value[batch.index] for name, value in self.rows.items()}
        view = TermBatch(batch.x, batch.y, batch.index, features, batch.logits, mask, batch.epoch, self.context, rows)
        loss, stats = self.fn(dict(batch.module.named_parameters()), view)
        if self.after_step is not None:
            self.after_step(stats, batch.epoch)
        return loss


def split_forward(
    module: nn.Module, x: torch.Tensor, options: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) in one pass for a backbone/head model; a plain module's logits double as features.
    ``options`` are keyword arguments of the backbone's forward (per-call settings such as FedAli's ALP)."""
    kwargs = dict(options or {})
    backbone = getattr(module, "backbone", None)
    head = getattr(module, "head", None)
    if backbone is None or head is None:
        logits = module(x, **kwargs)
        return logits, logits
    features = backbone(x, **kwargs)
    return features, head(features)


# (module, inputs, forward options) -> (features, logits) of one pass: where a model is split into the two
SplitForward = Callable[[nn.Module, torch.Tensor, Mapping[str, Any] | None], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation settings (from the `train` config section)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    # clip the total gradient norm of each optimizer's parameters to this before every step; 0 = off
    grad_clip: float = 0.0


@dataclass
class FitResult:
    params: Tensors
    steps: int
    mean_loss: float
    # the pass's optimizer, so a method can keep its state (moments, a preconditioner) in the client's state
    optimizer: torch.optim.Optimizer | None = None


def batch_indices(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    epochs: int,
    shuffle: bool = True,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[int, torch.Tensor]]:
    """(epoch, positions) of every mini-batch: a fresh permutation per epoch (or the split's order), walked in
    slices; ``drop_last`` skips a final partial batch unless it is the only one.

    The permutation is drawn on the CPU generator whatever the device, so a seed gives the same batches on every
    device; it goes to ``device`` (the data's) once per epoch, and the batches are slices of it there."""
    last_start = n - batch_size if drop_last and n >= batch_size else n - 1
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(device) if shuffle else torch.arange(n, device=device)
        for start in range(0, last_start + 1, batch_size):
            yield epoch, order[start : start + batch_size]


@dataclass
class LoopResult:
    """What a pass of the loop did: its steps and their (detached) losses."""

    losses: list[torch.Tensor]

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def mean_loss(self) -> float:
        return float(torch.stack(self.losses).mean()) if self.losses else float("nan")


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors an optimizer moves, over all its parameter groups."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def clip_gradients(optimizers: Sequence[torch.optim.Optimizer], max_norm: float) -> None:
    """``train.grad_clip``: scale each optimizer's gradients so that their total L2 norm (over every parameter that
    optimizer moves) is at most ``max_norm``; ``max_norm <= 0`` leaves them alone. A method with its own step
    (``train_steps``' ``update``) calls this between its backward pass and its optimizer's step."""
    if max_norm <= 0:
        return
    for optimizer in optimizers:
        torch.nn.utils.clip_grad_norm_(optimizer_parameters(optimizer), max_norm)


def train_steps(
    batches: Iterable[tuple[int, torch.Tensor]],
    loss_of: Callable[[int, torch.Tensor], torch.Tensor],
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    clip: Sequence[tuple[Iterable[nn.Parameter], float]] = (),
    grad_clip: float = 0.0,
    update: Callable[[torch.Tensor], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> LoopResult:
    """The one mini-batch loop of the package: local, mutual, server-side and pre-training passes all run here.

    For each (epoch, positions) of ``batches``: clear the gradients, ``loss_of(epoch, positions)`` (the forward
    pass and the loss), then the step. The default step is backward, clipping each parameter group of ``clip`` to
    its own norm (a method's own clip), clipping each optimizer's gradients to the total norm ``grad_clip`` (the
    run's ``train.grad_clip``; 0 = off), and every optimizer's step; ``update(loss)`` replaces it for a method with
    its own step (a preconditioned step whose optimizer state lives in the client's state), which then clips
    itself (``clip_gradients``), so ``grad_clip`` with ``update`` is refused. ``after_step`` runs after each step.
    """
    if update is not None and grad_clip > 0:
        raise ValueError("train_steps: a method's own step (update) clips its gradients itself; pass grad_clip=0")
    losses: list[torch.Tensor] = []
    for epoch, idx in batches:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss = loss_of(epoch, idx)
        if update is not None:
            update(loss)
        else:
            loss.backward()
            for parameters, max_norm in clip:
                torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            clip_gradients(optimizers, grad_clip)
            for optimizer in optimizers:
                optimizer.step()
        if after_step is not None:
            after_step()
        losses.append(loss.detach())  # no tensor op per step; reduced once at the end
    return LoopResult(losses)


def batch_stream(
    trainer: LocalTrainer, n: int, generator: torch.Generator, count: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """``count`` consecutive mini-batches of the run's batch size, walking fresh permutations of the split (one per
    pass, drawn only when reached) as a data loader restarted when exhausted would."""
    if n == 0 or count <= 0:
        return iter(())
    passes = math.ceil(count / math.ceil(n / trainer.settings.batch_size))
    return islice(trainer.batches(n, generator, epochs=passes, device=device), count)


def seeded_stochastic_layers(
    rng_seed: int | None, device: torch.device | str = "cpu"
) -> contextlib.AbstractContextManager[object]:
    """Seed torch's global generator (dropout, drop-path) for one pass and restore it afterwards, so stochastic
    layers draw the same whatever order clients run in; ``None`` leaves the global generator alone. On a CUDA
    ``device`` (where the layers then draw) that device's generator is restored as well."""
    if rng_seed is None:
        return contextlib.nullcontext()
    device = torch.device(device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=cuda))
    # Only the generators the pass draws from: torch.manual_seed would also queue seeds for every accelerator
    # backend, capturing a stack trace each time (1.2 ms per client per pass, 15% of a 1,000-client MLP round).
    torch.default_generator.manual_seed(rng_seed)
    for index in cuda:
        torch.cuda.default_generators[index].manual_seed(rng_seed)
    return stack


class LocalTrainer:
    """Loads tensors into one reusable module, trains it on index-sliced batches, reads tensors back.

    The trainer never changes how its module is configured: what differs between calls (epochs, learning rate,
    extra loss, trainable parameters, forward options such as FedAli's ALP settings) travels with the call.
    """

    def __init__(self, module: nn.Module, settings: TrainSettings) -> None:
        self.module = module
        self.settings = settings
        self._slots: Tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        self.steps = 0
        self.eval_batch_size = 2048
        self.split: SplitForward = split_forward  # what extra terms and features_and_logits read as features

    @contextlib.contextmanager
    def features_from(self, split: SplitForward) -> Iterator[None]:
        """Within the block, read features at another split of the same forward pass (FedAli's FedProto reads
        HART's pooled encoder output); the logits stay the model's own."""
        previous, self.split = self.split, split
        try:
            yield
        finally:
            self.split = previous

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

    def batches(
        self,
        n: int,
        generator: torch.Generator,
        epochs: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The batch walk of a local pass with this trainer's batch size and (default) epochs; positions on
        ``device``, the device of the data they index."""
        s = self.settings
        return batch_indices(
            n,
            s.batch_size,
            generator,
            epochs=s.epochs if epochs is None else epochs,
            shuffle=shuffle,
            drop_last=drop_last,
            device=device,
        )

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
        forward_options: Mapping[str, Any] | None = None,
        optimizer_factory: OptimizerFactory | None = None,
    ) -> FitResult:
        """Run ``epochs`` passes of mini-batch training from ``params``; cross-entropy plus an optional term.

        ``extra_loss(batch)`` is the term; a ``FunctionalTerm`` is one the client-batched executor can also run for
        many clients at once (here it is evaluated on the module's own parameters).
        ``shuffle=False`` keeps the split's order every epoch (HtFLlib's unshuffled loaders); ``drop_last`` skips
        a final partial batch (unless it is the only one); ``trainable`` picks the parameters the optimizer moves;
        ``forward_options`` are keyword arguments of this call's forward passes (FedAli's ALP settings);
        ``optimizer_factory(parameters)`` builds the pass's optimizer instead of the run's SGD/Adam (a method's own
        step, e.g. a preconditioned one restored from the client's state; it is returned in the result).
        ``rng_seed`` seeds torch's global generator for the pass (dropout, drop-path) and restores it afterwards,
        so stochastic layers give the same draws whatever order clients run in.
        """
        with seeded_stochastic_layers(rng_seed, x.device):
            self.load(params)
            module = self.module
            module.train()
            parameters = list(module.parameters()) if trainable is None else trainable(module)
            if optimizer_factory is not None:
                optimizer = optimizer_factory(parameters)
            else:
                optimizer = self.make_optimizer(lr, parameters)
            options = dict(forward_options or {})

            def loss_of(epoch: int, idx: torch.Tensor) -> torch.Tensor:
                xb, yb = x[idx], y[idx]
                if extra_loss is None:
                    return F.cross_entropy(module(xb, **options), yb)
                features, logits = self.split(module, xb, options)
                loss = F.cross_entropy(logits, yb)
                return loss + extra_loss(Batch(module, xb, yb, idx, features, logits, epoch))

            batches = self.batches(x.shape[0], generator, epochs, shuffle, drop_last, x.device)
            result = train_steps(batches, loss_of, [optimizer], grad_clip=self.settings.grad_clip)
            self.steps += result.steps
            return FitResult(self.snapshot(), result.steps, result.mean_loss, optimizer)

    @torch.inference_mode()
    def predict(
        self,
        params: Tensors,
        x: torch.Tensor,
        batch_size: int | None = None,
        forward_options: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Logits of a parameter set on ``x`` in large batches."""
        batch_size = batch_size or self.eval_batch_size
        self.load(params)
        self.module.eval()
        if x.shape[0] == 0:
            return torch.zeros(0, getattr(self.module, "num_classes", 0), device=x.device)
        options = dict(forward_options or {})
        return torch.cat([self.module(x[i : i + batch_size], **options) for i in range(0, x.shape[0], batch_size)])

    @torch.inference_mode()
    def features_and_logits(
        self,
        params: Tensors,
        x: torch.Tensor,
        batch_size: int | None = None,
        forward_options: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode features and logits of a parameter set on ``x``, from one forward pass."""
        batch_size = batch_size or self.eval_batch_size
        self.load(params)
        self.module.eval()
        if x.shape[0] == 0 and self.split is not split_forward:
            return self.split(self.module, x, forward_options)
        if x.shape[0] == 0:
            dim = getattr(self.module, "feature_dim", 0)
            classes = getattr(self.module, "num_classes", 0)
            return torch.zeros(0, dim, device=x.device), torch.zeros(0, classes, device=x.device)
        parts = [
            self.split(self.module, x[i : i + batch_size], forward_options) for i in range(0, x.shape[0], batch_size)
        ]
        return torch.cat([f for f, _ in parts]), torch.cat([lg for _, lg in parts])


def squared_distance(module: nn.Module, reference: Tensors) -> torch.Tensor:
    """||w - w_ref||^2 over the module's trainable parameters (FedProx's proximal term)."""
    return parameter_distance(dict(module.named_parameters()), reference)


def parameter_distance(params: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """||w - w_ref||^2 of a parameter dict, summed in its key order: the module's order for
    ``dict(module.named_parameters())``, so the functional and the module form give the same bits."""
    terms = [(p - reference[name]).pow(2).sum() for name, p in params.items()]
    return torch.stack(terms).sum()
