"""The pre-training stage of a run: pre-train from a config, record how, and reuse a run directory's file.

``fedpal run`` with ``pretrain.method = "mae"`` and no ``model.pretrained`` pre-trains first and writes
``pretrained.pt`` into the run directory; ``config.toml`` keeps the user's config (method "mae", no path), and a
resumed run finds the file there and reuses it instead of pre-training again.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from fedpal.config import ExperimentConfig
from fedpal.data.client_data import FederatedData
from fedpal.errors import UserError
from fedpal.models.families import get_family
from fedpal.models.registry import build_model
from fedpal.pretraining.checkpoint import match_pretrained, read_pretrained, save_pretrained
from fedpal.pretraining.mae import (
    PretrainResult,
    encoder_tensors,
    model_options,
    pretrain_mae,
    pretraining_windows,
)
from fedpal.pretraining.multitask import MultitaskResult, checkpoint_template, pretrain_public_multitask

PRETRAINED_FILE = "pretrained.pt"


def needs_pretraining(config: ExperimentConfig) -> bool:
    """True when a run must pre-train first: a pre-training method requested and no checkpoint given."""
    return config.pretrain.method in ("mae", "multitask") and not config.model.pretrained


def fingerprint(config: ExperimentConfig) -> dict[str, Any]:
    """Everything a pre-training result depends on; a run directory's file is reused only when this matches."""
    return {
        "seed": config.seed,
        "data": dataclasses.asdict(config.data),
        "model": model_options(config.model),
        "pretrain": dataclasses.asdict(config.pretrain),
    }


def same_settings(stored: Any, current: Any, default: Any) -> bool:
    """A stored fingerprint matches the current one: equal on every key both have, and every key only the current
    one has (added to fedpal after the file was made) at its default, so a resumed run keeps its pre-trained file
    across such additions."""
    if not isinstance(current, dict):
        return bool(stored == current)
    if not isinstance(stored, dict) or set(stored) - set(current):
        return False
    default = default if isinstance(default, dict) else {}
    return all(
        same_settings(stored[key], value, default.get(key)) if key in stored else value == default.get(key)
        for key, value in current.items()
    )


def run_pretraining(config: ExperimentConfig, data: FederatedData, progress: bool = False) -> PretrainResult:
    """The config's pre-training: MAE on the training clients' training windows, or the multi-task pass on public
    splits that no client of ``data`` holds (``data`` itself is not read then)."""
    if config.pretrain.method not in ("mae", "multitask"):
        raise ValueError(f"pretrain.method is '{config.pretrain.method}', not 'mae' or 'multitask'")
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)

    # a task stream's multi-task pre-training runs two phases of pretrain.epochs each (the trunk, then the readout)
    phases = 2 if config.pretrain.method == "multitask" and config.data.dataset == "task_stream" else 1
    total = phases * config.pretrain.epochs

    def report(epoch: int, loss: float, seconds: float) -> None:
        sys.stderr.write(f"fedpal: pre-training epoch {epoch}/{total}: loss {loss:.5f} ({seconds:.1f} s)\n")

    if config.pretrain.method == "multitask":
        return pretrain_public_multitask(config, report if progress else None)
    return pretrain_mae(
        pretraining_windows(data), config.model, config.pretrain, config.seed, report if progress else None
    )


def metadata(config: ExperimentConfig, result: PretrainResult) -> dict[str, Any]:
    """Plain-typed record of how a checkpoint was made (loads with ``weights_only=True``)."""
    public = {"public": result.public} if isinstance(result, MultitaskResult) else {}
    return {
        **public,
        "method": config.pretrain.method,
        "model": config.pretrain.model,
        "windows": result.windows,
        "epochs": config.pretrain.epochs,
        "losses": [float(v) for v in result.losses],
        "epoch_seconds": [float(v) for v in result.epoch_seconds],
        "seconds": float(result.seconds),
        "fingerprint": fingerprint(config),
        "config": config.to_dict(),
    }


def check_fits_run(config: ExperimentConfig, data: FederatedData, modules: list[nn.Module]) -> None:
    """Fail now, not after the pre-training, when its checkpoint could not initialise the run's models (a
    non-HART model.name, say): the same matching as loading, on a freshly built pre-training model."""
    if config.pretrain.method == "multitask" and config.model.family:  # one checkpoint per member, in run order
        for architecture, target in zip(pretrained_architectures(config), modules, strict=True):
            member = dataclasses.replace(config.pretrain, model=cast(Any, architecture))
            match_pretrained(target, checkpoint_template(dataclasses.replace(config, pretrain=member)), architecture)
        return
    if config.pretrain.method == "multitask":
        tensors = checkpoint_template(config)
    else:
        with torch.random.fork_rng(devices=[]):
            m = config.model
            module = build_model(
                config.pretrain.model, data.input_shape, 2, m.feature_dim, m.hidden_dim, "linear", model_options(m)
            )
        tensors = encoder_tensors(module)
    for target in modules:
        match_pretrained(target, tensors, f"a '{config.pretrain.model}' encoder (pretrain.model)")


def pretrain_to_file(
    config: ExperimentConfig, data: FederatedData, path: Path, progress: bool = False
) -> PretrainResult:
    """Pre-train and write the checkpoint atomically to ``path``."""
    result = run_pretraining(config, data, progress)
    save_pretrained(path, result.tensors, metadata(config, result))
    return result


def pretrained_architectures(config: ExperimentConfig) -> list[str]:
    """The models a run pre-trains: ``pretrain.model``, or, for multi-task pre-training of a model family (the
    mosaic trunks of FedMosaic's mixed-size runs), every member of the family, one checkpoint each."""
    if config.pretrain.method == "multitask" and config.model.family:
        members = list(dict.fromkeys(get_family(config.model.family)))
        others = [m for m in members if m not in ("mosaic_small", "mosaic_large")]
        if others:
            raise UserError(
                f"multi-task pre-training trains mosaic trunks; model.family '{config.model.family}' also has "
                f"{', '.join(others)}"
            )
        return members
    return [config.pretrain.model]


def checkpoint_name(architecture: str | None) -> str:
    """``pretrained.pt``, or ``pretrained_{architecture}.pt`` in a family's run."""
    return PRETRAINED_FILE if architecture is None else f"pretrained_{architecture}.pt"


def with_run_pretraining(
    config: ExperimentConfig, data: FederatedData, directory: Path, progress: bool = False
) -> ExperimentConfig:
    """The config the simulator runs with: ``model.pretrained`` pointing at ``directory/pretrained.pt`` (for a
    family's multi-task pre-training ``directory/pretrained_{arch}.pt``, one per member, which the run loads by
    architecture), made now unless a file made from the same settings is already there (a resumed run)."""
    architectures = pretrained_architectures(config)
    per_architecture = config.pretrain.method == "multitask" and bool(config.model.family)
    for architecture in architectures:
        made = config
        if per_architecture:
            trunk = cast(Any, architecture)  # a mosaic trunk's name (checked above)
            made = dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, model=trunk))
        path = Path(directory) / checkpoint_name(architecture if per_architecture else None)
        reuse = False
        if path.is_file():
            _, meta = read_pretrained(path)
            reuse = same_settings(meta.get("fingerprint"), fingerprint(made), fingerprint(ExperimentConfig()))
        if not reuse:
            pretrain_to_file(made, data, path, progress)
    target = Path(directory) / (checkpoint_name("{arch}") if per_architecture else PRETRAINED_FILE)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=str(target)))
