"""FedMosaic's task stream (spec fedmosaic.md §3 step 3, §5 "benchmark", §6): ten clients that each meet four tasks
one after another, built from real offline data. Dataset name ``task_stream``.

**Catalogue** (``TASKS``): 13 tasks over two modalities, each a source dataset, a label map (a class subset and/or a
relabelling such as digit parity) and an input transform (inversion or a 90-degree rotation: new visual domains).
The union label space puts task k's classes in one contiguous range after task k-1's; ``label_tasks[c]`` is the
task of class c and class names read ``"digits:3"``. Every sample is stored task-tagged
(``fedpal.data.tagged_inputs``: ``[task id, modality, payload]``, width 786), so all tasks share one float tensor.
There is no text task: Rotten Tomatoes has no registry loader (so no public split to pre-train the trunk's text path
on), and a tagged text row is 256 tokens, ~16x the attention cost of an image row at CPU scale.

**Scenario** (``SCENARIO``, fixed; ``data.num_clients`` must be 10): each client's four tasks in the order it meets
them. Clients i and i + 5 are partners: they share exactly two tasks (each holds its own, disjoint rows of them),
and any other two clients share at most one task; most pairs also share source datasets. A partner pair spans both
halves of the client list and both parities, so with two trunk sizes (clients 0-4 / 5-9, or ``model.family``'s
``i mod 2``) every related pair crosses architectures. ``client_groups[i]`` = i mod 5, the partner pair;
``task_overlap`` gives the graded ground truth.

**Rows.** Each source keeps a **public block** that no client gets (``public_rows``): for sources with natural
groups (HAPT users) whole groups, taken from the last group in sorted order until ``data.task_public_samples`` rows
are reached; otherwise a class-stratified sample of that many rows, drawn with a fixed seed. This is the rule of the
multi-task pre-training (``fedpal.pretraining.multitask``) for a source the federation does not draw from, so with
``pretrain.public_samples`` = ``data.task_public_samples`` (a checked config rule) the pre-training sees exactly these
blocks. ``public_x`` holds them as tagged rows (each row under one of its source's tasks that use its class, in
turn): the inputs of the adapters' A/B alignment. Client rows come from the rest, and no source row goes to two
clients or twice to one client: per (client, task), ``samples_per_task`` training rows and ``task_val_ratio`` /
``task_test_ratio`` times that many validation and test rows (at least one test row), class-stratified, in a fixed
order of the (client, task) slots and seeded per slot. HAPT slots take whole users (from a seeded order of the
non-public users) until their windows, split in time per (user, activity) with one window dropped at each boundary,
cover the three quotas; so no window overlaps another client's, the public block's, or the same client's other
split. HAPT windows are z-scored per channel group (accelerometer, gyroscope) with the public block's statistics, as
the pre-training normalises that block: no client statistic is needed, no test statistic is used.

**Regimes and rounds.** Rounds are the engine's: training rounds 1, 2, ...; round 0 (client initialisation) sees
round 1's data. With R = ``data.rounds_per_task``, training round t is step s = t - 1 of the stream.
``dynamic``: task k (k = 0..3) is met in steps [kR, (k+1)R), and in each of them the next contiguous 1/R of its
(shuffled) training rows arrives. ``static``: the four tasks' training rows are pooled, shuffled and cut into 4R
slices, one per step. From step 4R on everything has arrived. Every round a client trains on its **replay store**,
all training rows that have arrived so far (earlier tasks included), for every method alike: each client's training
rows are stored in arrival order, so the store of step s is a prefix, a view of the tensor (no copy). With
``data.task_local_data = "slice"`` (the spec's option) a client trains only on the rows that arrived this round.
Validation: the rows of the tasks met so far (static: all four from the start), again a prefix. Test: each client's
test rows of all four tasks (the same count per task), returned whole every round; the report picks the tasks met so
far through ``tasks_seen``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedpal.common.seeding import derive_seed
from fedpal.config import DataConfig, check_task_stream_ranges
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.data.public_block import public_block
from fedpal.data.sources import animal_mnist, fashion_mnist, hapt, mnist
from fedpal.data.sources.base import Dataset, DatasetOptions
from fedpal.data.sources.registry import load_dataset
from fedpal.data.splits import split_client
from fedpal.data.subsample import stratified_subsample
from fedpal.data.tagged_inputs import WIDTH, tag
from fedpal.errors import ConfigError, UserError

__all__ = [
    "SCENARIO",
    "TASKS",
    "StreamPlan",
    "StreamSchedule",
    "StreamTask",
    "TaskRows",
    "build_task_stream",
    "plan_task_stream",
    "public_rows",
    "public_task_data",
    "task_overlap",
]

DATASET = "task_stream"
TASKS_PER_CLIENT = 4
PARTNER_OFFSET = 5  # clients i and i + 5 share two tasks
SOURCE_WEIGHT = 0.5  # task_overlap: what a shared source dataset adds, beside 1 per shared task
WINDOW_GAP = 1  # HAPT: windows dropped at each boundary of a user's activity cut in time (50 % overlap)


@dataclass(frozen=True)
class StreamTask:
    """One task: a source dataset, its classes, how the source's labels map to them and how inputs change."""

    name: str
    source: str  # registry dataset name
    modality: str  # a tagged_inputs modality
    classes: tuple[str, ...]
    label_map: tuple[int, ...]  # source class -> task class; -1: rows of that class are not used
    transform: str = "none"  # "none", "invert" (255 - pixel), "rotate" (90 degrees counter-clockwise)


def _same(names: Sequence[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    return tuple(names), tuple(range(len(names)))


_DIGITS = _same(mnist.CLASS_NAMES)
_CLOTHES = _same(fashion_mnist.CLASS_NAMES)
_ANIMALS = _same(animal_mnist.CLASS_NAMES)
_ACTIVITIES = _same(hapt.ACTIVITY_NAMES)

TASKS: tuple[StreamTask, ...] = (
    StreamTask("digits", "mnist", "image", *_DIGITS),
    StreamTask("digit_parity", "mnist", "image", ("even", "odd"), tuple(d % 2 for d in range(10))),
    StreamTask("inverted_digits", "mnist", "image", *_DIGITS, transform="invert"),
    StreamTask("rotated_digits", "mnist", "image", *_DIGITS, transform="rotate"),
    StreamTask("clothing", "fashion_mnist", "image", *_CLOTHES),
    StreamTask("rotated_clothing", "fashion_mnist", "image", *_CLOTHES, transform="rotate"),
    # T-shirt, pullover, coat, shirt: tops; trouser, dress; sandal, sneaker, ankle boot: footwear; bag
    StreamTask(
        "clothing_kind",
        "fashion_mnist",
        "image",
        ("top", "trouser_dress", "footwear", "bag"),
        (0, 1, 0, 1, 0, 2, 0, 2, 3, 2),
    ),
    StreamTask("animals", "animal_mnist", "image", *_ANIMALS),
    StreamTask("inverted_animals", "animal_mnist", "image", *_ANIMALS, transform="invert"),
    # bear, elephant, giraffe, zebra: wild; cow, horse, sheep: farm; bird, cat, dog: pet
    StreamTask("animal_kind", "animal_mnist", "image", ("wild", "farm", "pet"), (0, 2, 2, 1, 2, 0, 0, 1, 1, 0)),
    StreamTask("activities", "hapt", "imu", *_ACTIVITIES),
    StreamTask("moving_or_static", "hapt", "imu", ("moving", "static"), (0, 0, 0, 1, 1, 1)),
    StreamTask("locomotion", "hapt", "imu", ("walking", "upstairs", "downstairs"), (0, 1, 2, -1, -1, -1)),
)
TASK_IDS = {task.name: k for k, task in enumerate(TASKS)}

# Each client's tasks in the order it meets them. Partners (i, i + 5) share two tasks, other pairs at most one.
SCENARIO: tuple[tuple[str, ...], ...] = (
    ("digits", "inverted_animals", "activities", "inverted_digits"),
    ("clothing", "digits", "moving_or_static", "digit_parity"),
    ("animals", "inverted_animals", "digit_parity", "clothing_kind"),
    ("locomotion", "digit_parity", "rotated_clothing", "rotated_digits"),
    ("inverted_digits", "locomotion", "clothing_kind", "clothing"),
    ("digits", "clothing_kind", "animal_kind", "activities"),
    ("clothing", "inverted_animals", "rotated_clothing", "moving_or_static"),
    ("animals", "inverted_digits", "animal_kind", "digit_parity"),
    ("locomotion", "animals", "digits", "rotated_clothing"),
    ("inverted_digits", "moving_or_static", "rotated_digits", "clothing_kind"),
)
CLIENT_TASKS: tuple[tuple[int, ...], ...] = tuple(tuple(TASK_IDS[name] for name in tasks) for tasks in SCENARIO)
NUM_CLIENTS = len(SCENARIO)


def task_offsets() -> np.ndarray:
    """First union class of every task, and the total number of classes last: [len(TASKS) + 1]."""
    return np.concatenate([[0], np.cumsum([len(t.classes) for t in TASKS])]).astype(np.int64)


# --- sources and their public blocks


def stream_options(cfg: DataConfig) -> DatasetOptions:
    """The loader options of the stream's sources (HAPT's six activities; only the Fashion-MNIST path is the user's)."""
    return DatasetOptions(fashion_mnist_dir=cfg.fashion_mnist_dir)


@functools.lru_cache(maxsize=8)
def _source(name: str, options: DatasetOptions) -> Dataset:
    """A source dataset, loaded once per process (a benchmark builds one stream per run; the arrays are only read)."""
    return load_dataset(name, options)


def _public_block(name: str, source: Dataset, count: int) -> np.ndarray:
    """Sorted rows of the source's public block (`fedpal.data.public_block`, every row allowed): the multi-task
    pre-training's rule for a source the federation does not draw from."""
    return public_block(name, source, count)[0]


def public_rows(source_name: str, count: int, options: DatasetOptions | None = None) -> np.ndarray:
    """The public block of a source, as sorted rows of the source's own indexing (``load_dataset(source_name)``):
    ``count`` rows (grouped sources: whole groups reaching ``count``) that no client of any task stream built with
    ``data.task_public_samples = count`` holds. For the pre-training and the A/B alignment (spec §5: 2,000 rows)."""
    return _public_block(source_name, _source(source_name, options or DatasetOptions()), count)


# --- which rows each client holds


@dataclass(frozen=True)
class TaskRows:
    """The source rows one client holds of one task: training rows in arrival order, validation and test rows."""

    task: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    groups: tuple[int, ...] = ()  # grouped sources (HAPT): the users the rows come from


@dataclass(frozen=True)
class StreamPlan:
    """Where every client's samples come from, before any tensor is made."""

    tasks: list[list[TaskRows]]  # [client][position], positions in the order the client meets its tasks
    public: dict[str, np.ndarray]  # source -> its public block
    # per client: its training rows in arrival order, as positions in the task-by-task concatenation of `tasks`
    arrival: list[np.ndarray]
    regime: str
    rounds_per_task: int


def part_quotas(cfg: DataConfig) -> tuple[int, int, int]:
    """Training, validation and test rows of one (client, task); ratios round half up, at least one test row."""
    val = int(np.floor(cfg.task_val_ratio * cfg.samples_per_task + 0.5))
    test = max(1, int(np.floor(cfg.task_test_ratio * cfg.samples_per_task + 0.5)))
    return cfg.samples_per_task, val, test


def check_stream_config(cfg: DataConfig) -> None:
    """The config rules of the built-in scenario, one ConfigError line each."""
    check_task_stream_ranges(cfg)
    if cfg.num_clients != NUM_CLIENTS:
        raise ConfigError(
            f"data.dataset '{DATASET}' is a fixed scenario of {NUM_CLIENTS} clients; set data.num_clients = "
            f"{NUM_CLIENTS}, got {cfg.num_clients}"
        )
    if cfg.unseen_clients > 0:
        raise ConfigError(f"data.dataset '{DATASET}' has no held-out clients; set data.unseen_clients = 0")
    if cfg.target_shift:
        raise ConfigError(f"data.target_shift does not apply to data.dataset '{DATASET}'; set it to false")
    if cfg.har_keep_transitions:
        raise ConfigError(f"data.dataset '{DATASET}' uses HAPT's six activities; set data.har_keep_transitions = false")


def _take(candidates: np.ndarray, labels: np.ndarray, quota: int, rng: np.random.Generator) -> np.ndarray:
    """A class-stratified sample of exactly ``quota`` of the candidate rows."""
    if quota == 0:
        return candidates[:0]
    return candidates[stratified_subsample(labels[candidates], quota, rng)]


def _draw_rows(
    source: Dataset, task: StreamTask, free: np.ndarray, quotas: tuple[int, ...], rng: np.random.Generator
) -> list[np.ndarray]:
    """Train, val and test rows of one slot from the free rows of the task's classes, class-stratified."""
    candidates = np.flatnonzero(free & (np.asarray(task.label_map)[source.y] >= 0))
    parts = []
    for quota in quotas:
        if candidates.size < quota:
            raise UserError(
                f"task stream: '{task.source}' has {candidates.size} unused rows left for task '{task.name}', "
                f"{quota} needed; lower data.samples_per_task or data.task_public_samples"
            )
        part = _take(candidates, source.y, quota, rng)
        parts.append(part)
        candidates = np.setdiff1d(candidates, part, assume_unique=True)
    return parts


def _draw_users(
    source: Dataset, task: StreamTask, queue: list[int], quotas: tuple[int, int, int], rng: np.random.Generator
) -> tuple[list[np.ndarray], tuple[int, ...]]:
    """Train, val and test rows of one slot of a grouped source: whole users from the front of ``queue`` until their
    windows, cut in time per (user, class) with gaps, cover every quota; then a class-stratified sample of each part."""
    assert source.groups is not None and source.order is not None
    usable = np.asarray(task.label_map)[source.y] >= 0
    user_class = source.groups * source.num_classes + source.y  # each (user, class) is cut in time on its own
    train, val, test = (q / sum(quotas) for q in quotas)
    taken: list[int] = []
    while queue:
        taken.append(queue.pop(0))
        rows = np.flatnonzero(usable & np.isin(source.groups, taken))
        parts = split_client(rows, user_class, (train, val, test), rng, order=source.order, gap=WINDOW_GAP)
        if all(part.size >= quota for part, quota in zip(parts, quotas, strict=True)):
            return [_take(part, source.y, q, rng) for part, q in zip(parts, quotas, strict=True)], tuple(taken)
    raise UserError(
        f"task stream: '{task.source}' has too few users left for task '{task.name}'; lower data.samples_per_task "
        "or data.task_public_samples"
    )


def plan_task_stream(cfg: DataConfig, seed: int) -> StreamPlan:
    """Which source rows every client holds of each of its tasks, and in which order its training rows arrive."""
    check_stream_config(cfg)
    quotas = part_quotas(cfg)
    options = stream_options(cfg)
    names = sorted({TASKS[k].source for tasks in CLIENT_TASKS for k in tasks})
    sources = {name: _source(name, options) for name in names}
    public = {name: _public_block(name, sources[name], cfg.task_public_samples) for name in names}
    free = {}
    queues: dict[str, list[int]] = {}
    for name, source in sources.items():
        free[name] = np.ones(len(source), dtype=bool)
        free[name][public[name]] = False
        if source.groups is not None:
            users = np.setdiff1d(np.unique(source.groups), source.groups[public[name]])
            rng = np.random.default_rng(derive_seed(seed, "users", name))
            queues[name] = [int(u) for u in rng.permutation(users)]
    plan: list[list[TaskRows]] = []
    for cid, tasks in enumerate(CLIENT_TASKS):  # a fixed order of slots, each seeded on its own
        held = []
        for position, k in enumerate(tasks):
            task, source = TASKS[k], sources[TASKS[k].source]
            rng = np.random.default_rng(derive_seed(seed, "stream", cid, position))
            groups: tuple[int, ...] = ()
            if source.groups is None:
                parts = _draw_rows(source, task, free[task.source], quotas, rng)
            else:
                parts, groups = _draw_users(source, task, queues[task.source], quotas, rng)
            for part in parts:
                free[task.source][part] = False
            train = rng.permutation(parts[0])  # the order in which the task's training rows arrive
            held.append(TaskRows(k, train, parts[1], parts[2], groups))
        plan.append(held)
    total = TASKS_PER_CLIENT * quotas[0]
    if cfg.task_regime == "static":  # the four tasks pooled and shuffled
        arrival = [
            np.random.default_rng(derive_seed(seed, "arrival", cid)).permutation(total) for cid in range(NUM_CLIENTS)
        ]
    else:  # task after task
        arrival = [np.arange(total) for _ in range(NUM_CLIENTS)]
    return StreamPlan(plan, public, arrival, cfg.task_regime, cfg.rounds_per_task)


# --- what a client holds in each round


def _slices(total: int, count: int) -> np.ndarray:
    """Sizes of ``count`` contiguous slices of ``total`` rows (equal up to one, the larger first)."""
    return np.array([len(s) for s in np.array_split(np.arange(total), count)], dtype=np.int64)


@dataclass(frozen=True)
class StreamSchedule:
    """Each client's data in each round: a prefix of its training rows (arrival order: the replay store) and of its
    validation rows (task order: the tasks met so far), and its whole test split. Holds only counts, so it pickles
    with the data to worker processes and works on the data wherever they are (CPU or GPU)."""

    train_counts: tuple[tuple[int, ...], ...]  # [client][step]: rows of the replay store
    val_counts: tuple[tuple[int, ...], ...]  # [client][step]: validation rows of the tasks met
    tasks_met: tuple[tuple[int, ...], ...]  # [client][step]: how many of the client's tasks it has met
    client_tasks: tuple[tuple[int, ...], ...]
    replay: bool = True  # train on the whole replay store (official), or only on the step's newly arrived rows

    @staticmethod
    def _at(counts: tuple[int, ...], round: int) -> int:
        """The count of ``round``'s step (round 0, initialisation, is step 0 like round 1; after the last: all)."""
        return counts[min(max(round - 1, 0), len(counts) - 1)]

    def __call__(self, cid: int, round: int, data: ClientData) -> ClientData:
        counts = self.train_counts[cid]
        n = self._at(counts, round)
        m = self._at(self.val_counts[cid], round)
        first = 0
        if not self.replay:  # the rows of this round's step (past the last step: the last step's again)
            step = min(max(round, 1), len(counts))
            first = counts[step - 2] if step > 1 else 0
        train_x, train_y = data.train_x[first:n], data.train_y[first:n]
        return ClientData(train_x, train_y, data.val_x[:m], data.val_y[:m], data.test_x, data.test_y)

    def tasks_seen(self, cid: int, round: int) -> list[int]:
        """The tasks client ``cid`` has met by ``round``, in the order it met them."""
        return list(self.client_tasks[cid][: self._at(self.tasks_met[cid], round)])


def stream_schedule(plan: StreamPlan) -> StreamSchedule:
    """The counts of every client at every step s = 0 .. 4R - 1 of the plan's regime."""
    r = plan.rounds_per_task
    steps = TASKS_PER_CLIENT * r
    train_counts, val_counts, tasks_met = [], [], []
    for held in plan.tasks:
        train = np.array([len(t.train) for t in held])
        val = np.concatenate([[0], np.cumsum([len(t.val) for t in held])])
        if plan.regime == "static":
            train_counts.append(tuple(int(c) for c in np.cumsum(_slices(int(train.sum()), steps))))
            val_counts.append((int(val[-1]),) * steps)
            tasks_met.append((TASKS_PER_CLIENT,) * steps)
            continue
        arrived = np.concatenate([_slices(int(n), r) for n in train])  # task k's slices are steps kR .. kR + R - 1
        met = [min(TASKS_PER_CLIENT, s // r + 1) for s in range(steps)]
        train_counts.append(tuple(int(c) for c in np.cumsum(arrived)))
        val_counts.append(tuple(int(val[k]) for k in met))
        tasks_met.append(tuple(met))
    client_tasks = tuple(tuple(t.task for t in held) for held in plan.tasks)
    return StreamSchedule(tuple(train_counts), tuple(val_counts), tuple(tasks_met), client_tasks)


# --- tensors


def _transformed(raw: np.ndarray, transform: str) -> np.ndarray:
    if transform == "invert":
        return 255 - raw  # uint8 pixels
    if transform == "rotate":
        return np.rot90(raw, k=1, axes=(-2, -1))
    return raw


class _Inputs:
    """Task-tagged rows and union labels of source rows, HAPT windows z-scored with the public block's statistics."""

    def __init__(self, sources: dict[str, Dataset], public: dict[str, np.ndarray]) -> None:
        self.sources = sources
        self.offsets = task_offsets()
        self.stats: dict[str, list[tuple[list[int], float, float]]] = {}
        for name, source in sources.items():
            if source.channel_groups:
                x = source.inputs(public[name])
                self.stats[name] = [
                    (list(g), float(x[:, list(g)].mean()), float(x[:, list(g)].std()) or 1.0)
                    for g in source.channel_groups
                ]

    def rows(self, k: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        task = TASKS[k]
        source = self.sources[task.source]
        raw = _transformed(source.x[rows], task.transform)
        x = source.decode(raw) if source.decode is not None else raw.astype(np.float32)
        for channels, mean, std in self.stats.get(task.source, []):
            x[:, channels] = (x[:, channels] - mean) / std
        tagged = tag(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), k, task.modality)
        labels = self.offsets[k] + np.asarray(task.label_map, dtype=np.int64)[source.y[rows]]
        return tagged, torch.from_numpy(labels)


def _public_inputs(public: dict[str, np.ndarray], inputs: _Inputs) -> torch.Tensor:
    """Every source's public block as tagged rows: each row under one of its source's tasks that use its class, the
    eligible tasks taken in turn, so every task's token and input transform appear (no labels: the alignment needs
    none)."""
    parts = []
    for name, rows in public.items():
        source = inputs.sources[name]
        tasks = [k for k, task in enumerate(TASKS) if task.source == name]
        chosen = np.empty(rows.size, dtype=np.int64)
        for i, label in enumerate(source.y[rows]):
            eligible = [k for k in tasks if TASKS[k].label_map[label] >= 0]
            chosen[i] = eligible[i % len(eligible)]
        parts += [inputs.rows(k, rows[chosen == k])[0] for k in tasks if (chosen == k).any()]
    return torch.cat(parts)


def public_task_data(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled public data of every task (tagged rows, union labels): each task's source's public block under
    that task (its classes, its transform), so a source's block appears once per task drawn from it. The multi-task
    pre-training of the trunk, its task tokens and the task readout runs on it; no client holds any of these rows."""
    options = stream_options(cfg)
    names = sorted({task.source for task in TASKS})
    sources = {name: _source(name, options) for name in names}
    public = {name: _public_block(name, sources[name], cfg.task_public_samples) for name in names}
    inputs = _Inputs(sources, public)
    parts = []
    for k, task in enumerate(TASKS):
        rows = public[task.source]
        used = rows[np.asarray(task.label_map, dtype=np.int64)[sources[task.source].y[rows]] >= 0]
        parts.append(inputs.rows(k, used))
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def build_task_stream(cfg: DataConfig, seed: int) -> FederatedData:
    """The task-stream federation of ``cfg`` (see the module docstring): one tensor of tagged rows, client by client
    (training rows in arrival order, validation and test rows task by task), every split a view of it."""
    plan = plan_task_stream(cfg, seed)
    options = stream_options(cfg)
    inputs = _Inputs({name: _source(name, options) for name in plan.public}, plan.public)
    sizes = [sum(len(t.train) + len(t.val) + len(t.test) for t in held) for held in plan.tasks]
    x_all = torch.empty(sum(sizes), WIDTH, dtype=torch.float32)
    y_all = torch.empty(sum(sizes), dtype=torch.int64)
    clients = []
    start = 0
    for held, arrival in zip(plan.tasks, plan.arrival, strict=True):
        bounds = [start]
        for split in ("train", "val", "test"):
            made = [inputs.rows(t.task, getattr(t, split)) for t in held]
            x = torch.cat([m[0] for m in made])
            y = torch.cat([m[1] for m in made])
            if split == "train":
                order = torch.from_numpy(arrival)
                x, y = x[order], y[order]
            x_all[bounds[-1] : bounds[-1] + len(y)] = x
            y_all[bounds[-1] : bounds[-1] + len(y)] = y
            bounds.append(bounds[-1] + len(y))
        a, b, c, d = bounds
        clients.append(ClientData(x_all[a:b], y_all[a:b], x_all[b:c], y_all[b:c], x_all[c:d], y_all[c:d]))
        start = d
    schedule = replace(stream_schedule(plan), replay=cfg.task_local_data == "memory")
    offsets = task_offsets()
    return FederatedData(
        dataset=DATASET,
        num_classes=int(offsets[-1]),
        class_names=tuple(f"{task.name}:{name}" for task in TASKS for name in task.classes),
        input_shape=(WIDTH,),
        clients=clients,
        client_ids=list(range(NUM_CLIENTS)),
        schedule=schedule,
        client_groups=[cid % PARTNER_OFFSET for cid in range(NUM_CLIENTS)],
        label_tasks=[k for k, task in enumerate(TASKS) for _ in task.classes],
        task_names=tuple(task.name for task in TASKS),
        task_sources=tuple(task.source for task in TASKS),
        client_tasks=[list(tasks) for tasks in schedule.client_tasks],
        tasks_seen=schedule.tasks_seen,
        public_x=_public_inputs(plan.public, inputs),
    )


def task_overlap(data: FederatedData) -> np.ndarray:
    """Ground-truth relatedness of the clients of a task stream, [n, n]: the number of tasks two clients share plus
    0.5 per source dataset they share (a shared task counts for its source too); the diagonal is a client with
    itself. Symmetric; for the rank correlation with a method's relevance weights (off-diagonal entries)."""
    if not data.client_tasks:
        raise UserError(f"task_overlap needs a task stream (data.dataset '{DATASET}'), got '{data.dataset}'")
    tasks = [set(t) for t in data.client_tasks]
    sources = [{data.task_sources[k] for k in t} for t in tasks]
    n = len(tasks)
    overlap = np.zeros((n, n))
    for i, j in itertools.product(range(n), repeat=2):
        overlap[i, j] = len(tasks[i] & tasks[j]) + SOURCE_WEIGHT * len(sources[i] & sources[j])
    return overlap
