"""Typed, validated experiment configuration.

A config is a TOML file plus ``--set key=value`` overrides. Every key has a documented default here; unknown
keys and wrong types are errors (with the closest valid key named), never silently ignored. The algorithm
section is validated against the chosen algorithm's own hyperparameter dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from fedpal.errors import ConfigError


@dataclass
class DataConfig:
    """Which dataset, how it is cut into clients, and how each client's data are split."""

    dataset: str = "mnist"  # see `fedpal datasets`
    # grouped: clients spread over the dataset's groups (multisource); latent: over k-means groups of a fixed
    # model's embedding (FedFomo's latent distributions)
    partition: Literal["iid", "dirichlet", "shards", "natural", "quantity", "grouped", "latent"] = "dirichlet"
    alpha: float = 0.1  # Dirichlet concentration of label skew (smaller = more skew)
    num_clients: int = 20  # clients in the federation (natural partition: 0 = one per user)
    unseen_clients: int = 0  # of those, hold out this many (seeded) from training; evaluated after adaptation
    min_samples: int = 10  # minimum samples per client (dirichlet, quantity)
    classes_per_client: int = 2  # shards partition: classes each client holds
    quantity_alpha: float = 1.0  # quantity partition: Dirichlet concentration of client sizes
    distributions: int = 5  # latent partition: k-means groups of the embedding
    embed_fraction: float = 0.1  # latent partition: class-stratified share that trains the embedder (no client has it)
    samples_per_source: int = 5000  # multisource dataset: images from each of its five sources
    # each training client validates and tests on another client's splits (a seeded derangement): FedFomo's
    # "target shift"; the client keeps its own training data
    target_shift: bool = False
    # IMU windows: each client is a device with its own rotation of the 3-axis sensors, per-channel gain and bias
    # (FedAli's device and placement shift; fedpal.data.device_shift), drawn from device_shift_seed, not the seed
    device_shift: bool = False
    device_shift_seed: int = 0
    device_shift_gain: float = 0.1  # spread s of the log-normal gain exp(s * z), z ~ N(0, 1), per channel
    device_shift_bias: float = 0.05  # standard deviation of the bias per channel, in the dataset's raw units
    train_fraction: float = 0.7  # per-client split, stratified by label
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    # stratified | chronological | auto (chronological when the data carry time order)
    split: Literal["auto", "stratified", "chronological"] = "auto"
    split_gap: int = 0  # chronological split: samples dropped at each boundary (overlapping windows)
    max_samples: int = 0  # class-stratified subsample of the dataset before partitioning; 0 = all
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    har_keep_transitions: bool = False  # HAPT: keep the 6 postural-transition classes (12 in all)
    min_text_chars: int = 1000  # shakespeare: speaking roles with fewer characters are left out
    # dataset task_stream (FedMosaic's tasks over time: 10 clients x 4 tasks; fedpal.data.task_stream):
    # dynamic: each client meets its 4 tasks one after another; static: all 4 pooled and shuffled from round 1
    task_regime: Literal["dynamic", "static"] = "dynamic"
    rounds_per_task: int = 3  # R: a task's training rows arrive in R slices, one per round (4R rounds see all)
    # what a client trains on each round: "memory" = every row arrived so far (the official replay store), "slice" =
    # only the rows that arrived this round
    task_local_data: Literal["memory", "slice"] = "memory"
    # how the adapter methods draw mini-batches from it: "uniform" (fresh permutations, as every other method draws)
    # or "priority" (the official sampler: least-used rows first, drawn between arrivals; fedpal.data.replay_priority)
    task_replay: Literal["uniform", "priority"] = "uniform"
    samples_per_task: int = 240  # training rows of each (client, task)
    task_val_ratio: float = 0.2  # validation rows of each (client, task), as a share of samples_per_task
    task_test_ratio: float = 0.4  # test rows of each (client, task), as a share of samples_per_task
    # rows of each source dataset reserved as its public block (pre-training, A/B alignment); no client gets them
    task_public_samples: int = 2000


@dataclass
class ModelConfig:
    """Model family; every model is backbone -> feature of size feature_dim -> linear head."""

    name: str = "cnn"  # see `fedpal models` / the models registry
    feature_dim: int = 512  # D, the size of the feature the head reads
    hidden_dim: int = 200  # MLP hidden width
    family: str = ""  # heterogeneous models: a named family; client i runs its architecture i mod K ("" = name)
    # how a backbone reaches D: "pool" (adaptive average), "linear"; auto = pool in families
    projection: Literal["auto", "pool", "linear"] = "auto"
    width: int = 64  # HART: token width w (acc attention w/4, conv w/2, gyro attention w/4)
    blocks: int = 3  # HART: transformer blocks
    bank_sizes: list[int] = field(default_factory=list)  # hart_alp: prototypes per block; [] = 256, 128, 64, ...
    hart_quirks: bool = False  # HART: reproduce the official liteFormer's in-place softmax and reshapes literally
    pretrained: str = ""  # checkpoint from `fedpal pretrain` whose matching tensors initialise the model
    # FedMosaic's dual adapters on a mosaic trunk's block linear layers; the rest of the model is then frozen.
    # Rank r, scale alpha / r, Co-LoRA blocks K, dropout, the gate's training noise, and how the larger trunks'
    # Co-LoRA A, B start: "aligned" to the smallest trunk's on the federation's public inputs, or "random" (ablation)
    adapters: bool = False
    adapter_rank: int = 8
    adapter_alpha: float = 16.0
    adapter_blocks: int = 2
    adapter_dropout: float = 0.05
    adapter_gate_noise: bool = True
    adapter_init: Literal["aligned", "random"] = "aligned"
    # the A alignment's orthogonality term: between A's d_in columns (as coded) or its r rows
    adapter_align_ortho: Literal["columns", "rows"] = "columns"


@dataclass
class TrainConfig:
    """Rounds, client sampling and local optimisation."""

    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # clip each optimizer's total gradient norm to this before every step; 0 = off
    client_fraction: float = 1.0  # fraction of clients sampled each round
    clients_per_round: int = 0  # if > 0, overrides client_fraction with a count
    threads: int = 0  # torch intra-op threads; 0 = chosen from the model size and the cores (logged)


@dataclass
class EvalConfig:
    """When and how the single evaluation protocol runs (DESIGN §5)."""

    every: int = 1  # evaluate every k rounds (the last round is always evaluated)
    batch_size: int = 2048
    generalization_samples: int = 2000  # size of the fixed, class-stratified sample of pooled test data
    generalization_include_own: bool = False  # FedAli's definition (pool includes the client's own test data)
    generalization_clients: int = 0  # evaluate generalization for this many seeded clients; 0 = all
    report_best_by_test: bool = False  # also report the best round chosen on test data, labelled as such


@dataclass
class RunConfig:
    """How a run executes and what it writes."""

    checkpoint_every: int = 1  # write a checkpoint every k rounds (atomically); 0 = never
    progress: bool = True  # live progress line on stderr
    # where client work runs: auto (the default: workers from round 2 when they pay and change no number; logs its
    # pick), sequential (this process), processes (single-threaded workers), batched (an architecture's clients
    # trained together)
    executor: Literal["sequential", "processes", "batched", "auto"] = "auto"
    workers: int = 0  # processes executor: worker processes; 0 = one per core
    # trackers that also receive the metrics: "tensorboard", "mlflow" (local store in the run), "wandb" (offline)
    log_to: list[str] = field(default_factory=list)
    # where the data, models and client states live: cpu, or cuda (no per-step copies; not with processes)
    device: Literal["cpu", "cuda"] = "cpu"


@dataclass
class AggregationConfig:
    """The rule at the engine's one reduction point, for every method (``fedpal.robustness``)."""

    # model updates (deltas from the last broadcast): mean (today's weighted mean, bit-identical), median,
    # trimmed_mean, krum, multikrum, bulyan, norm_bound
    rule: Literal["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "norm_bound"] = "mean"
    beta: float = 0.2  # trimmed_mean (and the prototype trimmed mean): fraction trimmed per side
    byzantine: int = 0  # krum, multikrum, bulyan: f, the malicious clients a round may hold
    select: int = 0  # multikrum: m, the replies averaged (0 = n - f)
    norm_bound: float = 0.0  # norm_bound: C, each client's update is scaled to L2 norm <= C
    # prototype payloads, per class over the clients that reported it: mean (today's), median, trimmed_mean
    prototype_rule: Literal["mean", "median", "trimmed_mean"] = "mean"


@dataclass
class AttackConfig:
    """Simulated malicious clients (``fedpal.attacks``): a fixed, seeded set of them, for robustness studies."""

    # none; on the model update a malicious client sends: sign_flip, gaussian, scale, alie, ipm; on prototype
    # payloads: proto_poison; on its training data: label_flip, backdoor
    type: Literal["none", "sign_flip", "gaussian", "scale", "alie", "ipm", "proto_poison", "label_flip", "backdoor"] = (
        "none"
    )
    fraction: float = 0.0  # of the training clients, malicious (round(fraction * n), drawn once from the seed)
    sigma: float = 200.0  # gaussian: the update is replaced by N(0, sigma^2)
    gamma: float = 0.0  # scale: the update is multiplied by gamma (0 = the number of clients in the round)
    epsilon: float = 0.1  # ipm: the update is -epsilon times the benign clients' mean update
    poison_fraction: float = 0.5  # backdoor: share of a malicious client's training samples given the trigger
    target: int = -1  # backdoor: the class triggered samples are labelled with (-1 = the last class)
    prototype_mode: Literal["negate", "random"] = "negate"  # proto_poison: minus the benign mean, or random


@dataclass
class AvailabilityConfig:
    """Unreliable clients on a virtual clock (``fedpal.attacks.unreliable``; nothing sleeps): per round and client,
    seeded, whether it is available to be sampled, whether its reply is lost after training, and when it arrives."""

    p_available: float = 1.0  # chance a client can be sampled in a round (the round samples among the available)
    p_drop: float = 0.0  # chance a sampled client trains but its reply never arrives
    latency_mu: float = 0.0  # log-normal latency of a reply, in virtual seconds: mean of its log
    latency_sigma: float = 0.0  # and the standard deviation of its log
    deadline: float = 0.0  # virtual seconds a round waits; later replies are dropped and counted (0 = no deadline)

    @property
    def active(self) -> bool:
        return self.p_available < 1 or self.p_drop > 0 or self.deadline > 0


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg; ``fedpal.privacy``): each reply's update clipped, Gaussian noise
    on the server's sum, an accountant (``pip install -e ".[dp]"``) reporting epsilon at delta."""

    clip: float = 0.0  # C: each reply's update (all its tensors jointly) clipped to L2 norm <= C (0 = no DP)
    noise_multiplier: float = 0.0  # z: noise std z * C on the sum of the round's clipped updates
    # C_p: each class prototype clipped to L2 norm <= C_p (features live on another scale than updates; 0 = clip)
    prototype_clip: float = 0.0
    adaptive_clip: bool = False  # move C each round toward target_quantile of the norms (clip = initial C)
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    delta: float = 1e-5
    max_epsilon: float = 0.0  # stop before a round that would pass it (0 = no limit)
    # how rounds pick clients, for the accountant: fedpal samples a fixed number without replacement
    sampling: Literal["without_replacement", "poisson"] = "without_replacement"
    # simulated secure aggregation of the clipped updates (quantized, pairwise masks that cancel in the sum; Flower's
    # SecAgg+ defaults): the server sees only their sum; its byte overhead is counted
    secure_aggregation: bool = False

    @property
    def active(self) -> bool:
        return self.clip > 0


@dataclass
class FlowerConfig:
    """The Flower engine (``fedpal run --engine flower``, and the deployment's ServerApp): how rounds wait for nodes."""

    # simulation: virtual SuperNodes; client c lives on node c mod nodes (0 = one node per client)
    nodes: int = 0
    node_cpus: float = 1.0  # simulation: CPUs each virtual node's actor takes (1: one actor per core)
    round_timeout: float = 600.0  # seconds a round waits for replies; a node silent that long counts as failed
    message_ttl: float = 0.0  # seconds a message lives on the SuperLink; 0 = round_timeout + 60
    poll_interval: float = 0.1  # seconds between pulls for replies
    wait_for_nodes: float = 300.0  # seconds the run waits at the start until every client has a node
    # simulation: where nodes keep client states on disk ("" = flower_states/ in the run directory)
    state_dir: str = ""


@dataclass
class PretrainConfig:
    """Pre-training before federated training: FedAli's label-free MAE of the HART(+ALP) encoder, or FedMosaic's
    supervised multi-task pass of a mosaic trunk over public splits that no client holds."""

    # mae: masked-frame reconstruction; multitask: supervised pass of a mosaic trunk over public splits of
    # pretrain.sources (`fedpal run` pre-trains first with either)
    method: Literal["none", "mae", "multitask"] = "none"
    # the model whose encoder is pre-trained: hart/hart_alp (mae, shaped by [model]) or a mosaic trunk (multitask)
    model: Literal["hart", "hart_alp", "mosaic_small", "mosaic_large"] = "hart_alp"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3  # Adam
    mask_ratio: float = 0.5  # fraction of a window's frames hidden from the encoder (4 of 8)
    decoder_blocks: int = 1  # plain HART blocks (no ALP) in the throw-away decoder
    bank_beta: float = 0.99  # EMA decay of the ALP banks while pre-training (0.999 barely moves random banks)
    alp_lambda: float = 0.2  # ALP influence factor after the warm-up
    warmup_epochs: int = 1  # epochs with lambda = 0, so the banks fill with token statistics first
    # multitask: the datasets whose public splits (rows no client of this config can hold) pre-train the trunk
    sources: list[str] = field(default_factory=lambda: ["mnist", "fashion_mnist", "animal_mnist", "hapt"])
    public_samples: int = 2000  # multitask: samples of each source's public split (grouped sources: whole groups)


@dataclass
class ExperimentConfig:
    """The whole resolved configuration of one run."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    availability: AvailabilityConfig = field(default_factory=AvailabilityConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    algorithm: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    # [train] values the algorithm recommended because the config left them unset (for the run log; their values
    # are in ``train`` like any other, so the written config reproduces the run)
    recommended_applied: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def algorithm_name(self) -> str:
        return str(self.algorithm["name"])

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["recommended_applied"]
        return out


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "run": RunConfig,
    "aggregation": AggregationConfig,
    "attack": AttackConfig,
    "availability": AvailabilityConfig,
    "privacy": PrivacyConfig,
    "flower": FlowerConfig,
    "pretrain": PretrainConfig,
}


def _closest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def all_keys() -> list[str]:
    """Every valid dotted key except the algorithm's own hyperparameters."""
    keys = ["seed", "algorithm.name"]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in fields(cls)]
    return keys


def coerce(value: Any, expected: Any, key: str) -> Any:
    """Check a value against a field type; ints are accepted where floats are expected, and a ``Literal`` field
    takes exactly one of its choices (the one place where choices are checked, for every section and method)."""
    if get_origin(expected) is Literal:
        choices = get_args(expected)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        listed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"config key '{key}' must be one of {listed}, got {value!r}")
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"config key '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}")


def choices_of(cls: type, name: str) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` field of a config or hyperparameter dataclass (for help texts)."""
    return get_args(get_type_hints(cls)[name])


def build_dataclass(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate a config dataclass from a dict, rejecting unknown keys and wrong types."""
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            # Match the name inside the section: the shared "section." prefix would make any key look close.
            match = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{match[0]}'?" if match else ""
            raise ConfigError(f"unknown config key '{where}'{hint}")
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}" if prefix else key)
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    """Parse a --set value as a TOML value; bare words (mnist, inf, nan) are strings."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", text) and text not in ("true", "false"):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


Overrides = Sequence[str] | Mapping[str, Any]


def apply_overrides(raw: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    """Apply overrides with dotted keys to a raw config dict: ``"key=value"`` strings (the CLI's ``--set``, values
    parsed as TOML) or a mapping ``{"algorithm.mu": 0.1}`` (the Python API, values taken as they are)."""
    if isinstance(overrides, Mapping):
        pairs = [(str(key), value) for key, value in overrides.items()]
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"an override must be key=value, got '{item}'")
            key, text = item.split("=", 1)
            pairs.append((key, parse_value(text.strip())))
    for key, value in pairs:
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{key}' does not name a section")
            node = child
        node[parts[-1]] = value
    return raw


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw nested dict into an ExperimentConfig (algorithm hyperparameters included)."""
    from fedpal.algorithms.core.registry import get_algorithm_class

    valid_top = ["seed", "algorithm", "algorithms", *SECTIONS]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in valid_top:
            if key in _algorithm_names():  # `--set fedprox.mu=0.1`
                inner = next(iter(value), "KEY") if isinstance(value, dict) else "KEY"
                raise ConfigError(
                    f"unknown config key '{key}': hyperparameters of {key} are set as 'algorithms.{key}.{inner}' "
                    f"(kept for whenever {key} runs) or as 'algorithm.{inner}' with algorithm.name = \"{key}\""
                )
            raise ConfigError(f"unknown config key '{key}'{_closest(key, all_keys() + valid_top)}")
        if key == "seed":
            kwargs["seed"] = coerce(value, int, "seed")
        elif key == "algorithm":
            if not isinstance(value, dict):
                raise ConfigError("config key 'algorithm' must be a table with at least 'name'")
            kwargs["algorithm"] = dict(value)
        elif key == "algorithms":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ConfigError(
                    "config key 'algorithms' must hold one table per algorithm, e.g. [algorithms.fedprox]"
                )
            for alg_name, table in value.items():  # validate every table, not only the chosen one
                build_dataclass(get_algorithm_class(alg_name).Hyperparameters, table, f"algorithms.{alg_name}")
        else:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' must be a table")
            kwargs[key] = build_dataclass(SECTIONS[key], value, key)
    algorithm = dict(kwargs.get("algorithm", {"name": "fedavg"}))
    name = algorithm.pop("name", "fedavg")
    if not isinstance(name, str):
        raise ConfigError("config key 'algorithm.name' must be a string")
    # [algorithms.<name>] holds per-algorithm defaults (handy for `fedpal compare`); [algorithm] overrides them.
    algorithm = {**raw.get("algorithms", {}).get(name, {}), **algorithm}
    algorithm_cls = get_algorithm_class(name)
    user_train = raw.get("train", {})
    applied = {k: v for k, v in algorithm_cls.recommended_training.items() if k not in user_train}
    if applied:
        kwargs["train"] = build_dataclass(TrainConfig, {**user_train, **applied}, "train")
    kwargs["recommended_applied"] = applied
    hp_cls = algorithm_cls.Hyperparameters
    known = {f.name for f in fields(hp_cls)}
    for key in algorithm:
        owners = [] if key in known else _algorithms_with(key)
        if owners:
            raise ConfigError(
                f"config key 'algorithm.{key}' is a hyperparameter of {', '.join(owners)}, not of {name}; "
                f"set algorithm.name, or keep it under [algorithms.{owners[0]}] for the runs of {owners[0]}"
            )
    hp = build_dataclass(hp_cls, algorithm, "algorithm")
    kwargs["algorithm"] = {"name": name, **dataclasses.asdict(hp)}
    config = ExperimentConfig(**kwargs)
    check_ranges(config)
    return config


def _algorithm_names() -> list[str]:
    from fedpal.algorithms.core.registry import all_algorithms

    return sorted(all_algorithms())


def _algorithms_with(hyperparameter: str) -> list[str]:
    """The algorithms that have a hyperparameter of this name (for the error of a key given to the wrong one)."""
    from fedpal.algorithms.core.registry import all_algorithms

    return sorted(
        n for n, cls in all_algorithms().items() if hyperparameter in {f.name for f in fields(cls.Hyperparameters)}
    )


def partition_title(data: DataConfig) -> str:
    """'mnist: dirichlet (α = 0.1)' — the partition with the parameter that sets its skew, for plot titles."""
    detail = {
        "dirichlet": f" (α = {data.alpha:g})",
        "shards": f" ({data.classes_per_client} classes per client)",
        "quantity": f" (α = {data.quantity_alpha:g})",
        "latent": f" ({data.distributions} distributions)",
    }.get(data.partition, "")
    return f"{data.dataset}: {data.partition}{detail}"


def check_ranges(config: ExperimentConfig) -> None:
    """Catch values that type-check but cannot work, before any data are loaded."""
    d, t, e = config.data, config.train, config.eval
    check_pretrain_ranges(config.pretrain)
    positive = {
        "train.rounds": t.rounds,
        "train.local_epochs": t.local_epochs,
        "train.batch_size": t.batch_size,
        "eval.every": e.every,
        "eval.batch_size": e.batch_size,
        "model.feature_dim": config.model.feature_dim,
        "model.hidden_dim": config.model.hidden_dim,
        "model.width": config.model.width,
        "model.blocks": config.model.blocks,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    sizes = config.model.bank_sizes
    if not isinstance(sizes, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in sizes):
        raise ConfigError(f"config key 'model.bank_sizes' must be a list of positive integers, got {sizes!r}")
    from fedpal.engine.tracking import TRACKERS

    log_to = config.run.log_to
    if not isinstance(log_to, list) or any(t not in TRACKERS for t in log_to) or len(set(log_to)) < len(log_to):
        raise ConfigError(
            f"config key 'run.log_to' takes a list of distinct trackers from {', '.join(TRACKERS)}; got {log_to!r}"
        )
    if config.run.workers < 0:
        raise ConfigError(f"config key 'run.workers' must be >= 0 (0 = one per core), got {config.run.workers}")
    agg = config.aggregation
    if not 0 <= agg.beta < 0.5:
        raise ConfigError(f"config key 'aggregation.beta' must be in [0, 0.5), got {agg.beta}")
    if agg.byzantine < 0 or agg.select < 0:
        raise ConfigError("config keys 'aggregation.byzantine' and 'aggregation.select' must be >= 0")
    if agg.rule == "norm_bound" and agg.norm_bound <= 0:
        raise ConfigError("aggregation.rule = 'norm_bound' needs aggregation.norm_bound > 0 (the bound C)")
    at = config.attack
    if not 0 <= at.fraction <= 1 or not 0 <= at.poison_fraction <= 1:
        raise ConfigError("config keys 'attack.fraction' and 'attack.poison_fraction' must lie in [0, 1]")
    if at.type != "none" and at.fraction == 0:
        raise ConfigError(f"attack.type = '{at.type}' needs attack.fraction > 0 (the share of malicious clients)")
    av = config.availability
    if not (0 <= av.p_available <= 1 and 0 <= av.p_drop <= 1):
        raise ConfigError("config keys 'availability.p_available' and 'availability.p_drop' must lie in [0, 1]")
    if av.latency_sigma < 0 or av.deadline < 0:
        raise ConfigError("config keys 'availability.latency_sigma' and 'availability.deadline' must be >= 0")
    pv = config.privacy
    if min(pv.clip, pv.noise_multiplier, pv.max_epsilon, pv.prototype_clip) < 0:
        raise ConfigError(
            "config keys 'privacy.clip', 'privacy.noise_multiplier', 'privacy.max_epsilon', 'privacy.prototype_clip' "
            "must be >= 0"
        )
    if pv.secure_aggregation and not pv.active:
        raise ConfigError("privacy.secure_aggregation needs privacy.clip > 0: masked sums need bounded updates")
    if pv.noise_multiplier > 0 and not pv.active:
        raise ConfigError("privacy.noise_multiplier needs privacy.clip > 0: noise is calibrated to the clipping bound")
    if pv.active and (agg.rule != "mean" or agg.prototype_rule != "mean"):
        raise ConfigError(
            "[privacy] (noise calibrated to a sum, secure aggregation revealing only the sum) needs "
            f"aggregation.rule = 'mean', not '{agg.rule if agg.rule != 'mean' else agg.prototype_rule}'"
        )
    if not 0 < pv.delta < 1:
        raise ConfigError(f"config key 'privacy.delta' must lie in (0, 1), got {pv.delta}")
    fl = config.flower
    for key in ("round_timeout", "poll_interval", "node_cpus"):
        if getattr(fl, key) <= 0:
            raise ConfigError(f"config key 'flower.{key}' must be > 0, got {getattr(fl, key)}")
    for key in ("nodes", "message_ttl", "wait_for_nodes"):
        if getattr(fl, key) < 0:
            raise ConfigError(f"config key 'flower.{key}' must be >= 0, got {getattr(fl, key)}")
    if t.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be > 0, got {t.lr}")
    if t.grad_clip < 0:
        raise ConfigError(f"config key 'train.grad_clip' must be >= 0 (0 = no clipping), got {t.grad_clip}")
    if not 0 < t.client_fraction <= 1:
        raise ConfigError(f"config key 'train.client_fraction' must be in (0, 1], got {t.client_fraction}")
    if d.partition != "natural" and d.num_clients < 1:
        raise ConfigError(f"config key 'data.num_clients' must be >= 1, got {d.num_clients}")
    if d.unseen_clients < 0 or 0 < d.num_clients <= d.unseen_clients:
        raise ConfigError(
            f"config key 'data.unseen_clients' must be >= 0 and below data.num_clients ({d.num_clients}) so that "
            f"some clients train, got {d.unseen_clients}"
        )
    if d.alpha <= 0 or d.quantity_alpha <= 0:
        raise ConfigError("config keys 'data.alpha' and 'data.quantity_alpha' must be > 0")
    if d.device_shift_gain < 0 or d.device_shift_bias < 0:
        raise ConfigError("config keys 'data.device_shift_gain' and 'data.device_shift_bias' must be >= 0")
    if d.min_text_chars < 0:
        raise ConfigError(f"config key 'data.min_text_chars' must be >= 0, got {d.min_text_chars}")
    check_task_stream_ranges(d)
    if (
        d.dataset == "task_stream"
        and config.pretrain.method == "multitask"
        and (config.pretrain.public_samples != d.task_public_samples)
    ):
        raise ConfigError(
            f"pretrain.public_samples ({config.pretrain.public_samples}) must equal data.task_public_samples "
            f"({d.task_public_samples}) with data.dataset 'task_stream': then the pre-training's public rows are "
            "exactly the blocks that no client of the stream holds"
        )
    fractions = (d.train_fraction, d.val_fraction, d.test_fraction)
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6 or d.train_fraction == 0 or d.test_fraction == 0:
        raise ConfigError(
            "config keys 'data.train_fraction', 'data.val_fraction', 'data.test_fraction' must be >= 0, "
            f"sum to 1 and train/test must be > 0; got {fractions}"
        )


def check_task_stream_ranges(d: DataConfig) -> None:
    """The task-stream keys that type-check but cannot work (checked whatever the dataset, like the other keys)."""
    checks = [
        ("rounds_per_task", d.rounds_per_task >= 1, "must be >= 1", d.rounds_per_task),
        ("samples_per_task", d.samples_per_task >= 1, "must be >= 1", d.samples_per_task),
        ("task_val_ratio", d.task_val_ratio >= 0, "must be >= 0", d.task_val_ratio),
        ("task_test_ratio", d.task_test_ratio > 0, "must be > 0", d.task_test_ratio),
        ("task_public_samples", d.task_public_samples >= 1, "must be >= 1", d.task_public_samples),
    ]
    for key, ok, rule, value in checks:
        if not ok:
            raise ConfigError(f"config key 'data.{key}' {rule}, got {value}")
    if d.task_replay == "priority" and d.task_local_data != "memory":
        raise ConfigError(
            "data.task_replay = 'priority' samples the replay store: it needs data.task_local_data = 'memory'"
        )


def check_pretrain_ranges(p: PretrainConfig) -> None:
    """The [pretrain] values that type-check but cannot work (mask_ratio is checked against Z when it runs)."""
    checks = [
        ("epochs", p.epochs >= 1, "must be >= 1", p.epochs),
        ("batch_size", p.batch_size >= 1, "must be >= 1", p.batch_size),
        ("lr", p.lr > 0, "must be > 0", p.lr),
        ("mask_ratio", 0 < p.mask_ratio < 1, "must be in (0, 1)", p.mask_ratio),
        ("decoder_blocks", p.decoder_blocks >= 1, "must be >= 1", p.decoder_blocks),
        ("bank_beta", 0 <= p.bank_beta <= 1, "must be in [0, 1]", p.bank_beta),
        ("alp_lambda", 0 <= p.alp_lambda <= 1, "must be in [0, 1]", p.alp_lambda),
        ("warmup_epochs", p.warmup_epochs >= 0, "must be >= 0", p.warmup_epochs),
    ]
    for key, ok, rule, value in checks:
        if not ok:
            raise ConfigError(f"config key 'pretrain.{key}' {rule}, got {value}")
    trunk = p.model.startswith("mosaic_")
    if p.method == "multitask" and not trunk:
        raise ConfigError(
            f"pretrain.method 'multitask' pre-trains a mosaic trunk: set pretrain.model to 'mosaic_small' or "
            f"'mosaic_large', got '{p.model}'"
        )
    if p.method == "mae" and trunk:
        raise ConfigError(f"pretrain.method 'mae' pre-trains 'hart' or 'hart_alp', not '{p.model}'")
    sources = p.sources
    if not isinstance(sources, list) or not all(isinstance(s, str) and s for s in sources):
        raise ConfigError(f"config key 'pretrain.sources' must be a list of dataset names, got {sources!r}")
    if len(set(sources)) < len(sources) or (p.method == "multitask" and not sources):
        raise ConfigError(f"config key 'pretrain.sources' must name distinct datasets (at least one), got {sources}")
    if p.public_samples < 1:
        raise ConfigError(f"config key 'pretrain.public_samples' must be >= 1, got {p.public_samples}")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning every failure into one ConfigError line."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a file: {p}") from None
    except PermissionError:
        raise ConfigError(f"config file is not readable: {p}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None


def load_config(path: str | Path | None = None, overrides: Overrides | None = None) -> ExperimentConfig:
    """Load, override and validate a config."""
    raw = read_toml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides or []))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: dict[str, Any]) -> str:
    """Write a nested dict of scalars and lists (one level of tables) as TOML."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"
