"""Dual adapters on the mosaic trunks, as a run builds them (``model.adapters = true``): every block linear layer
of the trunk is wrapped (`add_dual_adapters`), everything else in the model is frozen, and in a run with trunks of
several sizes the larger trunks' Co-LoRA A, B are aligned once to the smallest trunk's on public inputs, so P and Q
mean the same thing in every architecture (specs/fedmosaic.md §3 step 0).

The adapters are drawn from a generator seeded per architecture, so every client of one architecture starts from
the same adapter state (the official code's one init per architecture, copied).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fedpal.config import ModelConfig
from fedpal.errors import UserError
from fedpal.models.adapter_alignment import AlignmentReport, AlignmentSettings, align_to_reference
from fedpal.models.adapters import AdapterSettings, add_dual_adapters
from fedpal.models.mosaic_trunk import MosaicTrunk, trunks_in

log = logging.getLogger("fedpal")


def the_trunk(model: nn.Module) -> MosaicTrunk:
    trunks = trunks_in(model)
    if len(trunks) != 1:
        raise UserError(
            f"model.adapters needs a model with one mosaic trunk (mosaic_small, mosaic_large); "
            f"{type(model).__name__} has {len(trunks)}"
        )
    return trunks[0]


def add_trunk_adapters(model: nn.Module, settings: AdapterSettings, seed: int) -> list[str]:
    """Wrap the trunk's block linear layers (qkv, out, up, down of every block) in dual adapters and freeze the
    rest of ``model``; Co-LoRA layers by the trunk's depth. Returns the wrapped layers' names."""
    trunk = the_trunk(model)
    prefix = next(name for name, m in model.named_modules() if m is trunk)
    targets = rf"{prefix}\.blocks\.\d+\.(attn\.(qkv|out)|mlp\.(up|down))" if prefix else r"blocks\.\d+\..*"
    return add_dual_adapters(model, targets, settings, num_layers=trunk.depth, seed=seed)


def trunk_size_key(model: nn.Module) -> tuple[int, int]:
    """(width, depth): the smallest trunk is the reference."""
    trunk = the_trunk(model)
    return trunk.width, trunk.depth


def align_trunks(
    modules: dict[str, nn.Module], public_x: torch.Tensor, settings: AlignmentSettings | None = None
) -> dict[str, AlignmentReport]:
    """Align every larger architecture's Co-LoRA A, B to the smallest one's in place, on ``public_x`` (the
    reference itself is unchanged); one log line per aligned architecture."""
    reference_name = min(modules, key=lambda name: (trunk_size_key(modules[name]), name))
    reference = modules[reference_name]
    reports = {}
    for name, module in modules.items():
        if name == reference_name or trunk_size_key(module) == trunk_size_key(reference):
            continue
        report = align_to_reference(module, reference, public_x, settings)
        log.info(
            "adapters of %s aligned to %s on %d public inputs: A error %.4g -> %.4g, B mismatch %.4g -> %.4g",
            name,
            reference_name,
            public_x.shape[0],
            report.a_mse_before,
            report.a_mse_after,
            report.b_mismatch_before,
            report.b_mismatch_after,
        )
        reports[name] = report
    return reports


def adapter_settings(model: ModelConfig) -> AdapterSettings:
    """The adapter shape a run's ``[model]`` section asks for."""
    return AdapterSettings(
        rank=model.adapter_rank,
        alpha=model.adapter_alpha,
        dropout=model.adapter_dropout,
        num_blocks=model.adapter_blocks,
        gate_noise=model.adapter_gate_noise,
    )
