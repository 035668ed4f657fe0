"""The two-model training step of mutual-learning methods (FML, FedKD): two modules see the same batch.

A client trains its personal model and a shared model together: every step slices one batch from the client's
resident tensors (drawn exactly as `LocalTrainer.fit` draws them), runs both forward passes, and lets the method
combine the two outputs into one total loss. Every module (and an optional extra one, FedKD's hidden-state map
W_h) takes an optimizer step along the gradient of that total. This is what HtFLlib's FML and FedKD clients do
with two ``backward`` calls (``loss.backward(retain_graph=True); loss_g.backward()``): the gradients of both
losses accumulate in every module, so each module follows the gradient of their sum. Each module's gradient is
clipped to its own norm first, as HtFLlib does against divergence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.algorithms.core.training import LocalTrainer, TrainSettings, split_forward, train_steps
from fedpal.common.seeding import derive_seed
from fedpal.common.tensors import Tensors


@dataclass
class MutualBatch:
    """One step as the method's loss sees it: the batch and both models' (features, logits)."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    epoch: int
    features_a: torch.Tensor
    logits_a: torch.Tensor
    features_b: torch.Tensor
    logits_b: torch.Tensor
    extra: nn.Module | None  # the extra module (FedKD's W_h), in the graph


MutualLoss = Callable[[MutualBatch], torch.Tensor]


@dataclass
class MutualFitResult:
    first: Tensors
    second: Tensors
    extra: Tensors  # empty when there is no extra module
    steps: int
    mean_loss: float


@dataclass
class Member:
    """One module taking part in a mutual step: its trainer, the tensors it starts from and its learning rate."""

    trainer: LocalTrainer
    params: Tensors
    lr: float | None = None  # None = the trainer's TrainSettings.lr


def mutual_fit(
    first: Member,
    second: Member,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    loss_fn: MutualLoss,
    *,
    epochs: int | None = None,
    extra: Member | None = None,
    clip_norm: float = 0.0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> MutualFitResult:
    """Train two modules (plus an optional third) jointly on the same index-sliced batches.

    Batches are drawn as in `LocalTrainer.fit` (same generator use, ``shuffle``/``drop_last`` meaning), so with
    the same generator both modules see the batches a plain fit would. ``loss_fn`` returns the total loss whose
    gradient every module follows; ``clip_norm > 0`` clips each module's gradient norm separately, and so does the
    run's ``train.grad_clip`` (the first trainer's settings; each module has its own optimizer). The steps are
    counted on the first trainer (the client's own architecture, which the engine counts).
    """
    if first.trainer is second.trainer or (extra is not None and extra.trainer in (first.trainer, second.trainer)):
        raise ValueError("mutual_fit needs a distinct module (trainer) for each member")
    members = [first, second] + ([extra] if extra is not None else [])
    optimizers = []
    for member in members:
        member.trainer.load(member.params)
        member.trainer.module.train()
        optimizers.append(member.trainer.make_optimizer(member.lr))
    module_a, module_b = first.trainer.module, second.trainer.module
    extra_module = extra.trainer.module if extra is not None else None

    def loss_of(epoch: int, idx: torch.Tensor) -> torch.Tensor:
        xb, yb = x[idx], y[idx]
        features_a, logits_a = split_forward(module_a, xb)
        features_b, logits_b = split_forward(module_b, xb)
        return loss_fn(MutualBatch(xb, yb, idx, epoch, features_a, logits_a, features_b, logits_b, extra_module))

    clip = [(list(m.trainer.module.parameters()), clip_norm) for m in members] if clip_norm > 0 else []
    batches = first.trainer.batches(x.shape[0], generator, epochs, shuffle, drop_last, x.device)
    result = train_steps(batches, loss_of, optimizers, clip=clip, grad_clip=first.trainer.settings.grad_clip)
    steps = result.steps
    first.trainer.steps += steps
    mean_loss = result.mean_loss
    return MutualFitResult(
        first.trainer.snapshot(),
        second.trainer.snapshot(),
        extra.trainer.snapshot() if extra is not None else {},
        steps,
        mean_loss,
    )


def kl_mean(input_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``nn.KLDivLoss()(log_softmax(input), softmax(target))`` as HtFLlib calls it: KL(target || input) summed
    per element and averaged over **all B*C elements** (reduction "mean", not "batchmean"), temperature 1, and
    the target not detached (its model receives this term's gradient too)."""
    return F.kl_div(
        F.log_softmax(input_logits, dim=1), F.log_softmax(target_logits, dim=1), reduction="none", log_target=True
    ).mean()


def shared_architecture(requested: str, architectures: tuple[str, ...]) -> str:
    """The shared model's architecture: ``requested``, or "" = the run's first architecture (HtFLlib builds the
    shared model as ``BaseHeadSplit(args, 0)``, client 0's architecture, unless a separate global model is named)."""
    if requested:
        return requested
    if not architectures:
        raise ValueError("no architectures in the setup to take the shared model from")
    return architectures[0]


def build_shared_trainer(
    build_module: Callable[[str], nn.Module] | None, name: str, settings: TrainSettings, seed: int
) -> LocalTrainer:
    """A fresh, seeded module of architecture ``name`` in its own trainer (never one of the clients' trainers)."""
    if build_module is None:
        raise ValueError("the algorithm setup cannot build modules (AlgorithmSetup.build_module is None)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "shared-model-init"))
        return LocalTrainer(build_module(name), settings)  # the setup's builder puts it on the run's device


def parameter_names(module: nn.Module) -> list[str]:
    """Names of a module's parameters (what HtFLlib's FML/FedKD exchange; buffers are not sent)."""
    return [name for name, _ in module.named_parameters()]
