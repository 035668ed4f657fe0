"""Pre-trained encoder checkpoints: written by `fedpal pretrain` (or `fedpal run` with ``pretrain.method="mae"``)
and read through ``model.pretrained``.

The file is a plain ``torch.save`` dict: ``{"format", "tensors": {SplitModel name: tensor}, "meta": {...}}`` with
only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)`` (no pickled code runs).
Loading copies every tensor whose name and shape match and reports the rest, so one checkpoint initialises
``hart_alp`` (everything it holds) and plain ``hart`` (all but the ALP banks and GLUs) alike.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from fedpal.errors import UserError

log = logging.getLogger("fedpal")

FORMAT = "fedpal-pretrained-1"


class PretrainedLoad(NamedTuple):
    """What ``load_pretrained`` did: module tensors loaded, module tensors that kept their initialisation, and
    checkpoint tensors the module has no slot for."""

    loaded: list[str]
    kept: list[str]
    unused: list[str]


def save_pretrained(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (temporary file + rename); parent folders are created."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FORMAT, "tensors": tensors, "meta": meta}, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise UserError(f"cannot write pre-trained checkpoint {target}: {exc.strerror or exc}") from None
    return target


def read_pretrained(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint; any unreadable or foreign file is one UserError line."""
    source = Path(path)
    if not source.is_file():
        raise UserError(f"pre-trained checkpoint not found: {source} (config key 'model.pretrained')")
    try:
        blob = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, runtime) for a corrupt or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read pre-trained checkpoint {source}: {reason}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(blob.get("tensors"), dict):
        raise UserError(f"{source} is not a fedpal pre-trained checkpoint (written by `fedpal pretrain`)")
    return blob["tensors"], dict(blob.get("meta") or {})


def match_pretrained(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> PretrainedLoad:
    """Which checkpoint tensors fit ``module`` (same name and shape), without copying anything; ``source`` names
    the tensors in error messages.

    A name match with another shape (another width, bank size or window length) is an error rather than a skip:
    it means the checkpoint was made for a different model. So is a checkpoint that matches nothing at all.
    """
    slots = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for name, tensor in tensors.items():
        slot = slots.get(name)
        if slot is not None and tuple(slot.shape) != tuple(tensor.shape):
            raise UserError(
                f"{source} does not fit the model: '{name}' has shape {list(tensor.shape)} there but "
                f"{list(slot.shape)} in the model (same model.width, blocks, bank_sizes and window length?)"
            )
    loaded = [name for name in slots if name in tensors]
    if not loaded:
        raise UserError(
            f"{source} matches no tensor of the model; pre-trained encoders fit model.name hart or hart_alp"
        )
    kept = [name for name in slots if name not in tensors]
    unused = [name for name in tensors if name not in slots]
    return PretrainedLoad(loaded, kept, unused)


def load_pretrained(module: nn.Module, path: str | Path) -> PretrainedLoad:
    """Copy every checkpoint tensor whose name and shape match a parameter or buffer of ``module``, in place;
    see ``match_pretrained`` for what is an error."""
    tensors, _ = read_pretrained(path)
    report = match_pretrained(module, tensors, f"pre-trained checkpoint {path}")
    slots = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    with torch.no_grad():
        for name in report.loaded:
            slots[name].copy_(tensors[name])
    return report


def apply_pretrained(module: nn.Module, path: str | Path, label: str) -> PretrainedLoad:
    """``load_pretrained`` plus one log line saying what was loaded and what kept its initialisation."""
    report = load_pretrained(module, path)
    log.info(
        "model %s: %d tensors from %s, %d kept their initialisation (%s), %d checkpoint tensors unused",
        label,
        len(report.loaded),
        path,
        len(report.kept),
        ", ".join(sorted({k.rsplit(".", 1)[0] for k in report.kept})) or "none",
        len(report.unused),
    )
    return report
