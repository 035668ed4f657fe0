"""Assembling a run, once: the data, one reusable module per architecture (seeded, pre-trained weights loaded) and
the algorithm with its typed hyperparameters. The round driver and every executor take an ``Assembly``; nothing
here runs a round.

``run.device``: modules are built and initialised on the CPU (so a seed gives the same initial tensors on every
device), then moved with the data, once; initial tensors are read after the move, so client states, payloads and
replies are born on the run's device. Pre-training (``fedpal.pretraining``) runs on the CPU before this.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from fedpal.algorithms.core.contract import Algorithm, AlgorithmSetup, ClientView
from fedpal.algorithms.core.registry import get_algorithm_class
from fedpal.algorithms.core.training import LocalTrainer, TrainSettings
from fedpal.common.seeding import derive_seed
from fedpal.common.tensors import Tensors
from fedpal.config import ExperimentConfig, build_dataclass
from fedpal.data.client_data import FederatedData
from fedpal.engine.attack_simulation import with_poisoned_data
from fedpal.engine.device import run_device
from fedpal.engine.threads import apply_threads
from fedpal.errors import ConfigError
from fedpal.models.adapted_trunk import adapter_settings, add_trunk_adapters, align_trunks
from fedpal.models.adapter_alignment import AlignmentSettings
from fedpal.models.families import architecture_of, get_family
from fedpal.models.registry import build_model
from fedpal.pretraining.checkpoint import apply_pretrained


def model_architectures(config: ExperimentConfig) -> tuple[tuple[str, ...], str]:
    """The architectures clients run (client i runs entry i mod K) and how backbones reach the feature size."""
    m = config.model
    if m.family:
        architectures = get_family(m.family)
        projection = "pool" if m.projection == "auto" else m.projection
    else:
        architectures = (m.name,)
        projection = "linear" if m.projection == "auto" else m.projection
    return architectures, projection


def build_algorithm(
    config: ExperimentConfig, data: FederatedData, *, align_adapters: bool = True
) -> tuple[Algorithm, dict[str, LocalTrainer]]:
    """One reusable module and trainer per architecture, and the algorithm with its typed hyperparameters.
    ``align_adapters=False`` skips the once-only A/B alignment of a mixed-size adapter run (a check that only
    needs the modules' shapes, before a pre-training that replaces their weights anyway)."""
    cls = get_algorithm_class(config.algorithm_name)
    hp_values = {k: v for k, v in config.algorithm.items() if k != "name"}
    hp = build_dataclass(cls.Hyperparameters, hp_values, "algorithm")
    architectures, projection = model_architectures(config)
    if len(set(architectures)) > 1 and not cls.supports_heterogeneous_models:
        raise ConfigError(
            f"algorithm '{cls.name}' shares model weights and needs one architecture, but model.family "
            f"'{config.model.family}' has {len(set(architectures))}; use a heterogeneous-model method or unset it"
        )
    m = config.model
    if cls.requires_adapters and not m.adapters:
        raise ConfigError(
            f"algorithm '{cls.name}' trains adapters on a frozen trunk: set model.adapters = true with a mosaic trunk "
            "(model.name = 'mosaic_small' or 'mosaic_large', or model.family = 'mosaic')"
        )
    if config.data.task_replay == "priority" and not (cls.requires_adapters and config.data.dataset == "task_stream"):
        raise ConfigError(
            "data.task_replay = 'priority' is the adapter methods' sampler of a task stream's replay store "
            f"(data.dataset = 'task_stream'); '{cls.name}' on '{config.data.dataset}' draws uniformly"
        )
    device = run_device(config.run)

    def build_module(name: str) -> nn.Module:
        options = {"width": m.width, "blocks": m.blocks, "bank_sizes": m.bank_sizes, "hart_quirks": m.hart_quirks}
        options |= {"label_tasks": data.label_tasks, "tasks": len(data.task_names)}  # task streams only
        return build_model(name, data.input_shape, data.num_classes, m.feature_dim, m.hidden_dim, projection, options)

    adapters = adapter_settings(m)
    co_lora = cls.adapter_layout == "co_lora"
    if not co_lora:  # the method's layout: ordinary LoRA in every layer, model.adapter_blocks unused
        adapters = replace(adapters, num_blocks=0)

    def adapted(module: nn.Module, name: str) -> nn.Module:
        """The module with model.adapters' dual adapters (seeded per architecture), or as it is."""
        if m.adapters:
            add_trunk_adapters(module, adapters, derive_seed(config.seed, "adapters", name))
        return module

    def build_module_on_device(name: str) -> nn.Module:
        """A method's extra module (FML's and FedKD's shared model, FedMosaic's reference), initialised on the CPU,
        then moved."""
        return adapted(build_module(name), name).to(device)

    t = config.train
    settings = TrainSettings(t.local_epochs, t.batch_size, t.lr, t.optimizer, t.momentum, t.weight_decay, t.grad_clip)
    trainers: dict[str, LocalTrainer] = {}
    for name in dict.fromkeys(architectures):  # seeded initialisation without touching the caller's global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "model-init", *([name] if m.family else [])))
            module = build_module(name)
        if m.pretrained:  # before any snapshot, so every method (FedAli and baselines) starts from it
            apply_pretrained(module, m.pretrained.replace("{arch}", name), name)  # one file per architecture
        module = adapted(module, name)  # after the pre-trained weights, which name the layers it wraps
        # Moved before the trainer reads its slots: moving a module replaces its buffers by new tensors.
        trainers[name] = LocalTrainer(module.to(device), settings)
        trainers[name].eval_batch_size = config.eval.batch_size
    if align_adapters and m.adapters and co_lora and m.adapter_init == "aligned" and len(trainers) > 1:
        if data.public_x is None:
            raise ConfigError(
                "model.adapter_init = 'aligned' aligns the trunks on public inputs, which this federation does not "
                "have (data.dataset = 'task_stream' has them); use model.adapter_init = 'random' otherwise"
            )
        alignment = AlignmentSettings(ortho=m.adapter_align_ortho)
        align_trunks({name: t.module for name, t in trainers.items()}, data.public_x.to(device), alignment)
    starts = {name: t.snapshot() for name, t in trainers.items()}
    setup = AlgorithmSetup(
        data.num_classes,
        settings,
        starts[architectures[0]],
        config.seed,
        feature_dim=m.feature_dim,
        architectures=architectures,
        build_module=build_module_on_device,
        rounds=config.train.rounds,
        device=device,
        num_clients=data.num_clients,
        architecture_params=starts,
        task_replay=config.data.task_replay,
    )
    return cls(hp, setup), trainers


@dataclass
class Assembly:
    """Everything a run is made of, built once; ``view`` gives a client's view of one round."""

    config: ExperimentConfig
    data: FederatedData
    algorithm: Algorithm
    trainers: dict[str, LocalTrainer]  # one reusable module per architecture
    initial_params: dict[str, Tensors]  # seeded (or pre-trained) initial tensors per architecture

    @property
    def architectures(self) -> tuple[str, ...]:
        return self.algorithm.setup.architectures

    def local_steps(self) -> int:
        """Optimizer steps taken so far by the clients' modules (the engine's step counter)."""
        return sum(t.steps for t in self.trainers.values())

    def view(self, cid: int, round: int) -> ClientView:
        """Client ``cid``'s view in ``round``; ids from num_clients on are the held-out clients."""
        c = self.data.client_at(cid, round)
        arch = architecture_of(cid, self.architectures)
        return ClientView(
            cid,
            round,
            self.config.seed,
            c.train_x,
            c.train_y,
            c.val_x,
            c.val_y,
            self.trainers[arch],
            arch,
            self.initial_params[arch],
        )


def assemble(config: ExperimentConfig, data: FederatedData) -> Assembly:
    """Build a run's modules and algorithm (with any pre-trained weights loaded) from a config and its data, and
    put the data on the run's device (``data`` itself is left where it is)."""
    device = run_device(config.run)  # fails in one line before anything is built or moved
    data = with_poisoned_data(config, data)  # an [attack] on training data: the malicious clients', once
    algorithm, trainers = build_algorithm(config, data)
    largest = max(sum(p.numel() for p in t.module.parameters()) for t in trainers.values())
    apply_threads(config.train.threads, largest)
    initial = dict(algorithm.setup.architecture_params)  # the snapshots the algorithm was given, not a second copy
    return Assembly(config, data.to(device), algorithm, trainers, initial)
