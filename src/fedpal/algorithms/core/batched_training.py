"""Training many clients of one architecture at once: the same mini-batch steps as ``LocalTrainer.fit``, with the
clients' parameters stacked and every step a ``torch.func.vmap`` of one functional forward and backward pass.

Each client keeps its own batch order (the generator the engine derived for it), its own batch sizes (a final
partial batch is padded and masked, so its loss is the mean over its real samples) and its own number of steps
(a client that has finished is masked out of the update, and its optimizer state does not advance). The optimizer
is the run's SGD (momentum, weight decay) or Adam, written out over the stacked tensors with the formulas of
``torch.optim``. The results equal sequential training up to floating-point rounding (batched kernels sum in
another order); the conformance suite states the tolerance.

This is the GPU lever: at batch 10, one client's step is bound by kernel launches, and K clients cost one launch.
On a CPU, distinct clients' weights give matrix products little to share, so the gain there is small.
Only cross-entropy passes are batched, plain or with a ``FunctionalTerm`` (FedProx's proximal pull, MOON's
contrastive term, the prototype pull), which is evaluated inside the same ``vmap`` on each client's parameters,
padded batch, mask and context (no per-call options, the run's optimizer, every parameter trained), on models without
buffers or stochastic layers (``module_is_batchable``). ``train.grad_clip`` clips each client's gradients by that
client's own norm before its step. Eval-mode passes of
many clients' models (``predict_together``) are batched the same way: N personal models scoring one generalization
sample cost one batched pass per chunk instead of N.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from fedpal.algorithms.core.training import FitResult, FunctionalTerm, LocalTrainer, TermBatch, train_steps
from fedpal.common.tensors import Tensors


@dataclass
class FitRequest:
    """One client's plain local pass, as ``LocalTrainer.fit`` would run it."""

    params: Tensors
    x: torch.Tensor
    y: torch.Tensor
    generator: torch.Generator
    epochs: int | None = None
    lr: float | None = None
    shuffle: bool = True
    drop_last: bool = False
    term: FunctionalTerm | None = None  # requests trained together share the term's fn


def term_signature(term: FunctionalTerm | None) -> tuple[Any, ...] | None:
    """What requests trained together must share about their terms: the function, and the shapes of the tensors
    that are stacked (context) or gathered (rows)."""
    if term is None:
        return None
    context = tuple((k, v.shape, v.dtype) for k, v in term.context.items())
    rows = tuple((k, v.shape[1:], v.dtype) for k, v in term.rows.items())
    return (term.fn, context, rows)


def module_is_batchable(module: nn.Module) -> bool:
    """No buffers (running statistics, prototype banks), no stochastic layers and no recurrent layers (torch's vmap has
    no batching rule for the fused LSTM/GRU kernels: it would fall back to one client at a time, slower than the
    sequential executor): a pure function of parameters that stacks."""
    if any(True for _ in module.buffers()) or any(isinstance(m, nn.RNNBase) for m in module.modules()):
        return False
    stochastic = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
    return not any(isinstance(m, stochastic) or "Drop" in type(m).__name__ for m in module.modules())


def _optimizer_step(
    optimizer: str,
    params: Tensors,
    grads: Tensors,
    state: Tensors,
    lr: torch.Tensor,
    active: int,
    step: int,
    momentum: float,
    weight_decay: float,
) -> None:
    """Step ``step`` (1-based) of SGD or Adam, with torch.optim's formulas, for the first ``active`` clients (the
    clients are ordered by their number of steps, so the active ones are a prefix and every update is a view)."""
    for name, full in params.items():
        p = full[:active]
        shape = (-1,) + (1,) * (p.dim() - 1)
        rate = lr[:active].view(shape)
        g = grads[name]
        if weight_decay:
            g = g + weight_decay * p
        if optimizer == "adam":
            beta1, beta2, eps = 0.9, 0.999, 1e-8
            m = state.setdefault(f"m.{name}", torch.zeros_like(full))[:active]
            v = state.setdefault(f"v.{name}", torch.zeros_like(full))[:active]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
            p.sub_(rate / (1 - beta1**step) * m / denom)
            continue
        if momentum:
            buf = state.setdefault(f"b.{name}", torch.zeros_like(full))[:active]
            if step == 1:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g)
            g = buf
        p.sub_(rate * g)


def clip_each_client(grads: Tensors, max_norm: float) -> Tensors:
    """``train.grad_clip`` for stacked clients: each client's gradients (row i of every tensor) scaled so that their
    total L2 norm is at most ``max_norm``, by its own norm, with ``clip_grad_norm_``'s formula (coefficient
    max_norm / (norm + 1e-6), capped at 1)."""
    per_tensor = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()])
    total = torch.linalg.vector_norm(per_tensor, dim=0)  # [clients]
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return {name: g * coefficient.view((-1,) + (1,) * (g.dim() - 1)) for name, g in grads.items()}


def _prefixed(params: Tensors, prefix: str) -> Tensors:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def _split_call(module: nn.Module, p: Tensors, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional (features, logits), as ``split_forward``: a plain module's logits double as features."""
    backbone, head = getattr(module, "backbone", None), getattr(module, "head", None)
    if backbone is None or head is None:
        logits = functional_call(module, p, (x,))
        return logits, logits
    features = functional_call(backbone, _prefixed(p, "backbone."), (x,))
    return features, functional_call(head, _prefixed(p, "head."), (features,))


def fit_together(trainer: LocalTrainer, requests: list[FitRequest]) -> list[FitResult]:
    """Train every request's parameters on its own data, all at once; results in request order.

    With a term (every request's ``fn`` equal), the loss of each client is its masked cross-entropy plus ``fn`` on
    its parameters, padded batch, mask, context and rows; after each step the term's stats go to each active
    client's ``after_step`` in request order, with that client's epoch.
    """
    module = trainer.module
    settings = trainer.settings
    names = [name for name, _ in module.named_parameters()]
    device = requests[0].x.device
    walks = [
        list(trainer.batches(r.x.shape[0], r.generator, r.epochs, r.shuffle, r.drop_last, device)) for r in requests
    ]
    # Longest schedule first: at step s the clients still training are a prefix, so no step computes a finished one.
    order = sorted(range(len(requests)), key=lambda i: (-len(walks[i]), i))
    requests = [requests[i] for i in order]
    schedules = [walks[i] for i in order]
    k = len(requests)
    steps = len(schedules[0]) if schedules else 0
    width = max((idx.numel() for s in schedules for _, idx in s), default=1)
    offsets = torch.tensor([0, *itertools.accumulate(r.x.shape[0] for r in requests)][:-1], device=device)
    x_all = torch.cat([r.x for r in requests])
    y_all = torch.cat([r.y for r in requests])
    params = {n: torch.stack([r.params[n].detach() for r in requests]) for n in names}
    dtype = params[names[0]].dtype
    lrs = torch.tensor([settings.lr if r.lr is None else r.lr for r in requests], dtype=dtype, device=device)
    state: Tensors = {}
    losses: list[list[torch.Tensor]] = [[] for _ in range(k)]
    terms = [r.term for r in requests]
    term = terms[0]

    def loss_one(p: Tensors, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(functional_call(module, p, (x,)), y, reduction="none")
        return (ce * mask).sum() / mask.sum().clamp_min(1)

    if term is None:
        grad_fn: Callable[..., Any] = vmap(grad_and_value(loss_one))
    else:
        if any(t is None or t.fn != term.fn for t in terms):
            raise ValueError("fit_together: requests trained together need the same term function")
        term_fn = term.fn

        def loss_with_term(
            p: Tensors,
            x: torch.Tensor,
            y: torch.Tensor,
            mask: torch.Tensor,
            index: torch.Tensor,
            epoch: torch.Tensor,
            context: Tensors,
            rows: Tensors,
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            features, logits = _split_call(module, p, x)
            ce = F.cross_entropy(logits, y, reduction="none")
            loss = (ce * mask).sum() / mask.sum().clamp_min(1)
            extra, stats = term_fn(p, TermBatch(x, y, index, features, logits, mask, epoch, context, rows, True))
            return loss + extra, {name: value.detach() for name, value in stats.items()}

        # A tensor every client shares (FedProx's reference, sent to all) is broadcast instead of stacked.
        shared = {n: all(t.context[n] is term.context[n] for t in terms if t is not None) for n in term.context}
        context = {
            n: term.context[n] if shared[n] else torch.stack([t.context[n] for t in terms if t is not None])
            for n in term.context
        }
        context_dims = {n: None if shared[n] else 0 for n in term.context}
        row_values = {n: torch.cat([t.rows[n] for t in terms if t is not None]) for n in term.rows}
        epochs = torch.tensor(
            [[e for e, _ in schedule] + [0] * (steps - len(schedule)) for schedule in schedules], device=device
        )
        grad_fn = vmap(grad_and_value(loss_with_term, has_aux=True), in_dims=(0, 0, 0, 0, 0, 0, context_dims, 0))
    pending: dict[str, Any] = {}

    def loss_of(_: int, position: torch.Tensor) -> torch.Tensor:
        """Step ``position`` of every client still training: its batch (padded, masked), gradients and loss."""
        s = int(position)
        active = sum(1 for schedule in schedules if len(schedule) > s)
        index = torch.zeros(active, width, dtype=torch.long, device=device)  # filled on the device: no copies
        mask = torch.zeros(active, width, dtype=dtype, device=device)
        for i in range(active):
            idx = schedules[i][s][1]
            index[i, : idx.numel()] = idx
            mask[i, : idx.numel()] = 1.0
        rows = index + offsets[:active].unsqueeze(1)
        p = {n: params[n][:active] for n in names}
        stats: dict[str, torch.Tensor] = {}
        if term is None:
            grads, loss = grad_fn(p, x_all[rows], y_all[rows], mask)
        else:
            ctx = {n: v if shared[n] else v[:active] for n, v in context.items()}
            batch_rows = {n: v[rows] for n, v in row_values.items()}
            args = (p, x_all[rows], y_all[rows], mask, index, epochs[:active, s], ctx, batch_rows)
            grads, (loss, stats) = grad_fn(*args)
        for i in range(active):
            losses[i].append(loss[i].detach())
        pending.update(grads=grads, active=active, step=s + 1, stats=stats)
        return loss.sum()

    def update(_: torch.Tensor) -> None:
        grads = pending["grads"]
        if settings.grad_clip > 0:  # each client by its own gradient norm, as its sequential pass would
            grads = clip_each_client(grads, settings.grad_clip)
        _optimizer_step(
            settings.optimizer,
            params,
            grads,
            state,
            lrs,
            pending["active"],
            pending["step"],
            settings.momentum,
            settings.weight_decay,
        )

    def after_step() -> None:
        """Each active client's share of the term's stats, clients in request order."""
        s = pending["step"] - 1
        for i in sorted(range(pending["active"]), key=lambda i: order[i]):
            client_term = terms[i]
            if client_term is not None and client_term.after_step is not None:
                client_term.after_step({n: v[i] for n, v in pending["stats"].items()}, schedules[i][s][0])

    module.train()
    positions = ((0, torch.tensor(s)) for s in range(steps))  # step numbers, read back with int(): CPU
    # the package's one loop, with a functional step
    train_steps(positions, loss_of, [], update=update, after_step=None if term is None else after_step)
    results: list[FitResult] = [FitResult({}, 0, float("nan"))] * k
    for i, original in enumerate(order):
        trained = {n: params[n][i].clone() for n in names}
        mean = float(torch.stack(losses[i]).mean()) if losses[i] else float("nan")
        results[original] = FitResult(trained, len(losses[i]), mean)
    trainer.steps += sum(len(s) for s in schedules)
    return results


@dataclass
class PredictRequest:
    """One client's eval-mode pass: logits (or features and logits, ``split``) of ``params`` on ``x``."""

    params: Tensors
    x: torch.Tensor
    split: bool = False


def predict_together(trainer: LocalTrainer, requests: list[PredictRequest]) -> list[Any]:
    """Every request's outputs from batched eval-mode passes, in request order: logits, or (features, logits).

    Requests that share their input (the generalization sample every client scores) run as one ``vmap`` over the
    stacked parameters with the input broadcast; others are padded to the longest input. Rows are chunked so that
    clients x rows stays within the trainer's evaluation batch.
    """
    module = trainer.module
    names = [name for name, _ in module.named_parameters()]
    split = requests[0].split

    def forward(p: Tensors, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split_call(module, p, x)

    k = len(requests)
    stacked = {n: torch.stack([r.params[n] for r in requests]) for n in names}
    shared = all(r.x is requests[0].x for r in requests)
    sizes = [r.x.shape[0] for r in requests]
    rows = max(sizes, default=0)
    chunk = max(1, trainer.eval_batch_size // k)
    module.eval()
    with torch.inference_mode():
        if shared:
            x_all = requests[0].x
            run = vmap(forward, in_dims=(0, None))
        else:
            first = requests[0].x
            x_all = torch.zeros(k, rows, *first.shape[1:], dtype=first.dtype, device=first.device)
            for i, r in enumerate(requests):
                x_all[i, : r.x.shape[0]] = r.x
            run = vmap(forward, in_dims=(0, 0))
        features, logits = [], []
        for start in range(0, rows, chunk):
            part = x_all[start : start + chunk] if shared else x_all[:, start : start + chunk]
            f, lg = run(stacked, part)
            features.append(f)
            logits.append(lg)
        num_classes = getattr(module, "num_classes", 0)
        dim = getattr(module, "feature_dim", num_classes)
        device = requests[0].x.device
        all_features = torch.cat(features, dim=1) if features else torch.zeros(k, 0, dim, device=device)
        all_logits = torch.cat(logits, dim=1) if logits else torch.zeros(k, 0, num_classes, device=device)
    out: list[Any] = []
    for i, n in enumerate(sizes):
        logits_i = all_logits[i, :n].clone()
        out.append((all_features[i, :n].clone(), logits_i) if split else logits_i)
    return out
