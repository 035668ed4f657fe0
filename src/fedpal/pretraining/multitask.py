"""Supervised multi-task pre-training of a FedMosaic trunk on public splits that no client holds.

The paper's clients start from frozen backbones that were pre-trained elsewhere; fedpal's trunks are pre-trained
once, centrally, here (spec fedmosaic.md §5, CPU column). Each dataset in ``pretrain.sources`` is one task family
with its own linear readout on the pooled trunk feature; every step takes one mini-batch of one source (the
sources' batches are interleaved in a seeded order, so every stretch of steps mixes modalities) and minimises the
cross-entropy of that source's readout. The trunk (all tokenizers the sources need, the blocks, the final norm) and
the readouts go into the checkpoint.

**The public split** of a source is a set of its rows that the federation of the pre-training config can never
hold, so it is disjoint from every client's training, validation and test data by construction:

* when the config's federation draws from the source (``data.dataset`` is the source), only rows outside it
  qualify: rows that ``data.max_samples`` subsampling leaves out (the federation partitions only the kept rows) and,
  for the ``natural`` partition, the groups (users, roles) after the first ``data.num_clients``, which that
  partition leaves out;
* when it does not, every row qualifies; a dataset composed of the source (``multisource``) is refused;
* from the qualifying rows: for a source with natural groups (HAPT users, Shakespeare roles), whole groups, taken
  from the last in sorted order until ``public_samples`` rows are reached (so a window never overlaps a client's
  window, and a later natural federation of fewer clients stays disjoint too); otherwise a class-stratified sample
  of ``public_samples`` rows. The draw uses a fixed seed, so the split depends on the run seed only through the
  federation it must avoid.

Sensor windows (sources with channel groups) are z-scored with the public split's own statistics, as the federation
z-scores its windows with its training clients' statistics: no client statistic reaches the pre-training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedpal.algorithms.core.training import batch_indices, train_steps
from fedpal.common.seeding import derive_seed
from fedpal.config import DataConfig, ExperimentConfig, PretrainConfig
from fedpal.data.public_block import public_block
from fedpal.data.sources.base import Dataset, DatasetOptions
from fedpal.data.sources.crowded import COMPOSITION
from fedpal.data.sources.registry import load_dataset
from fedpal.data.subsample import stratified_subsample
from fedpal.data.tagged_inputs import WIDTH as TAGGED_WIDTH
from fedpal.errors import UserError
from fedpal.models.mosaic_trunk import MODALITIES, MosaicTrunk, modality_of_shape
from fedpal.models.registry import build_model
from fedpal.pretraining.mae import PretrainResult

log = logging.getLogger("fedpal")

# Datasets built from other datasets' rows: a source they contain cannot be shown disjoint from their clients.
COMPOSITES: dict[str, tuple[str, ...]] = {"multisource": ("mnist", "fashion_mnist", "animal_mnist"), **COMPOSITION}
TRUNK_PREFIX = "backbone.trunk."  # the trunk's tensors carry their SplitModel names, so `model.pretrained` loads them
READOUT_PREFIX = "readouts."  # no SplitModel has these: plain loading reports them unused


@dataclass
class PublicSplit:
    """One source's public split: its rows (indices in the source's load order), inputs and labels."""

    source: str
    rows: np.ndarray
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    groups: list[int] = field(default_factory=list)  # the natural groups held out whole (grouped sources)

    @property
    def modality(self) -> str:
        return modality_of_shape(tuple(int(s) for s in self.x.shape[1:]))


@dataclass
class MultitaskResult(PretrainResult):
    """``PretrainResult`` (``windows`` = public samples) plus, per source, what it was pre-trained on."""

    public: dict[str, dict[str, Any]] = field(default_factory=dict)


def dataset_options(data: DataConfig) -> DatasetOptions:
    """The loader options of ``data`` (as the federation loads its dataset)."""
    return DatasetOptions(
        fashion_mnist_dir=data.fashion_mnist_dir,
        har_keep_transitions=data.har_keep_transitions,
        samples_per_source=data.samples_per_source,
        min_text_chars=data.min_text_chars,
    )


def federation_rows(name: str, source: Dataset, data: DataConfig, seed: int) -> np.ndarray | None:
    """A mask over the source's rows of those the federation of (``data``, ``seed``) may hold: what it keeps after
    subsampling, narrowed to the first ``num_clients`` groups under the natural partition. None when it holds none."""
    if name in COMPOSITES.get(data.dataset, ()):
        raise UserError(
            f"pretrain.sources: '{name}' is part of data.dataset '{data.dataset}', so no split of it can be shown "
            "to stay out of the clients; leave it out of pretrain.sources"
        )
    if data.dataset != name:
        return None
    keep = stratified_subsample(source.y, data.max_samples, np.random.default_rng(derive_seed(seed, "subsample")))
    held = np.zeros(len(source), dtype=bool)
    held[keep] = True
    if data.partition == "natural" and source.groups is not None and data.num_clients > 0:
        clients = np.unique(source.groups[keep])[: data.num_clients]
        held &= np.isin(source.groups, clients)
    return held


def public_rows(name: str, source: Dataset, data: DataConfig, seed: int, count: int) -> tuple[np.ndarray, list[int]]:
    """(sorted rows, groups held out whole) of the source's public split; see the module docstring for the rule."""
    held = federation_rows(name, source, data, seed)
    rows, taken = public_block(name, source, count, None if held is None else ~held)
    if rows.size == 0:
        hint = (
            "data.partition = 'natural' with data.num_clients below its number of groups"
            if source.groups is not None
            else "data.max_samples below its size"
        )
        raise UserError(
            f"pretrain.sources: the federation of this config may hold every row of '{name}', so it has no public "
            f"split; hold some out with {hint}, or leave it out of pretrain.sources"
        )
    return rows, taken


def zscore_channel_groups(x: np.ndarray, channel_groups: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """One mean and std per channel group, from these windows alone."""
    out = x.astype(np.float32, copy=True)
    for group in channel_groups:
        idx = list(group)
        values = x[:, idx]
        out[:, idx] = (values - float(values.mean())) / (float(values.std()) or 1.0)
    return out


def public_split(name: str, data: DataConfig, seed: int, count: int) -> PublicSplit:
    """Load a source and cut its public split for the federation of (``data``, ``seed``)."""
    source = load_dataset(name, dataset_options(data))
    rows, groups = public_rows(name, source, data, seed, count)
    x = source.inputs(rows)
    if source.channel_groups:
        x = zscore_channel_groups(x, source.channel_groups)
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32 if x.dtype.kind == "f" else np.int64))
    modality_of_shape(tuple(inputs.shape[1:]))  # a shape no tokenizer takes fails here, before any training
    labels = torch.from_numpy(source.y[rows].astype(np.int64))
    return PublicSplit(name, rows, inputs, labels, source.num_classes, groups)


def trunk_size(model: str) -> str:
    """'mosaic_small' -> 'small'."""
    return model.removeprefix("mosaic_")


def pretrain_multitask(
    splits: list[PublicSplit],
    size: str,
    p: PretrainConfig,
    seed: int,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> MultitaskResult:
    """Train a trunk of ``size`` (with every tokenizer the splits need) and one readout per split; deterministic
    given (splits, settings, seed). ``on_epoch(epoch, loss, seconds)`` after every epoch (1-based); the loss is the
    mean cross-entropy over all public samples of the epoch."""
    if not splits:
        raise UserError("multi-task pre-training needs at least one source")
    started = time.perf_counter()
    modalities = [m for m in MODALITIES if m in {s.modality for s in splits}]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "pretrain", "init"))
        trunk = MosaicTrunk(size, modalities)
        readouts = nn.ModuleDict({s.source: nn.Linear(trunk.width, s.num_classes) for s in splits})
    model = nn.ModuleDict({"trunk": trunk, "readouts": readouts})
    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr)
    shuffle = torch.Generator().manual_seed(derive_seed(seed, "pretrain", "shuffle"))
    total = sum(len(s.y) for s in splits)
    losses: list[float] = []
    epoch_seconds: list[float] = []
    source_losses: dict[str, list[float]] = {s.source: [] for s in splits}
    model.train()
    for epoch in range(p.epochs):
        epoch_started = time.perf_counter()
        plan = [
            (k, idx)
            for k, s in enumerate(splits)
            for _, idx in batch_indices(len(s.y), p.batch_size, shuffle, epochs=1)
        ]
        plan = [plan[int(i)] for i in torch.randperm(len(plan), generator=shuffle, device="cpu")]  # runs on the CPU

        def loss_of(step: int, idx: torch.Tensor, plan: list[tuple[int, torch.Tensor]] = plan) -> torch.Tensor:
            split = splits[plan[step][0]]
            return F.cross_entropy(readouts[split.source](trunk(split.x[idx])), split.y[idx])

        result = train_steps(((step, idx) for step, (_, idx) in enumerate(plan)), loss_of, [optimizer])
        sums = [0.0] * len(splits)
        for loss, (k, idx) in zip(result.losses, plan, strict=True):
            sums[k] += float(loss) * idx.numel()
        for k, s in enumerate(splits):
            source_losses[s.source].append(sums[k] / len(s.y))
        losses.append(sum(sums) / total)
        epoch_seconds.append(time.perf_counter() - epoch_started)
        log.info("pretrain epoch %d/%d: multi-task cross-entropy %.5f", epoch + 1, p.epochs, losses[-1])
        if on_epoch is not None:
            on_epoch(epoch + 1, losses[-1], epoch_seconds[-1])
    tensors = {TRUNK_PREFIX + name: t.detach().clone() for name, t in trunk.state_dict().items()}
    tensors |= {READOUT_PREFIX + name: t.detach().clone() for name, t in readouts.state_dict().items()}
    public = {
        s.source: {
            "modality": s.modality,
            "samples": len(s.y),
            "classes": s.num_classes,
            "groups": s.groups,
            "rows": [int(r) for r in s.rows],
            "losses": source_losses[s.source],
        }
        for s in splits
    }
    return MultitaskResult(tensors, losses, total, time.perf_counter() - started, epoch_seconds, public)


def task_stream_model(config: ExperimentConfig) -> nn.Module:
    """``pretrain.model`` as a task stream's run builds it (every tokenizer, a task token per task, the feature
    projection of ``[model]``, the readout over the union of the tasks' classes), seeded for pre-training."""
    from fedpal.data.task_stream import TASKS
    from fedpal.engine.assembly import model_architectures

    _, projection = model_architectures(config)
    label_tasks = [k for k, task in enumerate(TASKS) for _ in task.classes]
    m = config.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "pretrain", "init"))
        return build_model(
            config.pretrain.model,
            (TAGGED_WIDTH,),
            len(label_tasks),
            m.feature_dim,
            m.hidden_dim,
            projection,
            {"label_tasks": label_tasks, "tasks": len(TASKS)},
        )


def native_tasks() -> list[int]:
    """The task stream's tasks that are a source's own classification, untransformed (digits, clothing, animals,
    activities): what a backbone pre-trained elsewhere would know. The others (parity, kinds, inverted and
    rotated images, motion subsets) are new to the trunk."""
    from fedpal.data.task_stream import TASKS

    return [
        k
        for k, task in enumerate(TASKS)
        if task.transform == "none" and task.label_map == tuple(range(len(task.classes)))
    ]


def pretrain_task_stream(
    config: ExperimentConfig, on_epoch: Callable[[int, float, float], None] | None = None
) -> MultitaskResult:
    """Pre-training of a task stream's model on public data no client holds (`public_task_data`), in two phases of
    ``pretrain.epochs`` shuffled Adam passes each:

    1. the whole model (trunk, task tokens, feature projection, readout) on the **native** tasks only
       (`native_tasks`), as a backbone pre-trained on its sources' own labels;
    2. with everything else frozen, the readout of **every** task (a linear probe of the trunk's features), so each
       task has an answer head but the trunk's features were never tuned for the new tasks.

    The clients then start from all of it, frozen, and train only their adapters: on the new tasks (new label
    groupings, new visual domains) the adapters and what clients share have something to add. The losses are the
    phase-1 epochs, then the phase-2 epochs."""
    from fedpal.data.task_stream import TASKS, public_task_data

    p = config.pretrain
    started = time.perf_counter()
    x, y = public_task_data(config.data)
    tasks = x[:, 0].long()
    native = torch.isin(tasks, torch.tensor(native_tasks(), device=tasks.device))
    model = task_stream_model(config)
    shuffle = torch.Generator().manual_seed(derive_seed(config.seed, "pretrain", "shuffle"))
    losses: list[float] = []
    epoch_seconds: list[float] = []
    model.train()
    phases = [
        ("native tasks, whole model", torch.nonzero(native).squeeze(1), list(model.parameters())),
        ("every task, readout only", torch.arange(len(y), device=y.device), list(model.head.parameters())),  # type: ignore[union-attr]
    ]
    for phase, (what, rows, parameters) in enumerate(phases):
        model.requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(parameters, lr=p.lr)
        for epoch in range(p.epochs):
            epoch_started = time.perf_counter()
            batches = ((e, rows[idx]) for e, idx in batch_indices(len(rows), p.batch_size, shuffle, epochs=1))
            result = train_steps(batches, lambda _, idx: F.cross_entropy(model(x[idx]), y[idx]), [optimizer])
            losses.append(result.mean_loss)
            epoch_seconds.append(time.perf_counter() - epoch_started)
            log.info("pretrain (%s) epoch %d/%d: cross-entropy %.5f", what, epoch + 1, p.epochs, losses[-1])
            if on_epoch is not None:
                on_epoch(phase * p.epochs + epoch + 1, losses[-1], epoch_seconds[-1])
    model.requires_grad_(True)
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
    public = {
        task.name: {
            "modality": task.modality,
            "samples": int((tasks == k).sum()),
            "classes": len(task.classes),
            "native": k in native_tasks(),
        }
        for k, task in enumerate(TASKS)
    }
    return MultitaskResult(tensors, losses, len(y), time.perf_counter() - started, epoch_seconds, public)


def pretrain_public_multitask(
    config: ExperimentConfig, on_epoch: Callable[[int, float, float], None] | None = None
) -> MultitaskResult:
    """The config's multi-task pre-training: for a task stream its tasks' public data (`pretrain_task_stream`);
    otherwise public splits of ``pretrain.sources`` for its federation, then ``pretrain_multitask`` with
    ``pretrain.model``'s size."""
    if config.data.dataset == "task_stream":
        return pretrain_task_stream(config, on_epoch)
    p = config.pretrain
    splits = [public_split(name, config.data, config.seed, p.public_samples) for name in p.sources]
    return pretrain_multitask(splits, trunk_size(p.model), p, config.seed, on_epoch)


def checkpoint_template(config: ExperimentConfig) -> dict[str, torch.Tensor]:
    """Tensors named and shaped as a multi-task checkpoint's trunk (every tokenizer), without loading any data:
    what `fedpal run` matches against the run's models before it spends time pre-training. A task stream's
    checkpoint holds the whole model (`task_stream_model`)."""
    if config.data.dataset == "task_stream":
        return dict(task_stream_model(config).state_dict())
    with torch.random.fork_rng(devices=[]):
        trunk = MosaicTrunk(trunk_size(config.pretrain.model), MODALITIES)
    return {TRUNK_PREFIX + name: t for name, t in trunk.state_dict().items()}


def readout(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A source's pre-trained readout as a SplitModel head (``head.weight``, ``head.bias``), for a model whose
    feature is the pooled trunk output (``model.projection = "pool"``, ``model.feature_dim`` = the trunk width)."""
    prefix = f"{READOUT_PREFIX}{source}."
    found = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
    if set(found) != {"weight", "bias"}:
        names = sorted({n[len(READOUT_PREFIX) :].rsplit(".", 1)[0] for n in tensors if n.startswith(READOUT_PREFIX)})
        raise UserError(f"the checkpoint has no readout for '{source}'; it has: {', '.join(names) or 'none'}")
    return {"head.weight": found["weight"], "head.bias": found["bias"]}
