"""Model families for heterogeneous-model FL (HtFL): which architecture each client trains.

A family is an ordered tuple of registered model names. As in HtFLlib, clients take them round-robin: client ``i``
gets ``architectures[i % K]``. Every member maps its input to a feature of the same size D (through the feature
projection, see `fedpal.models.projection`), so prototypes and heads are comparable across clients.
"""

from __future__ import annotations

import difflib

from fedpal.errors import UserError
from fedpal.models.registry import MODELS

FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "image5": (
        ("img_mlp", "img_cnn4", "img_cnn_deep", "img_resnet", "img_dsconv"),
        "five image architectures [C, H, W]: perceptron, thin FedAvgCNN, deep plain CNN, small ResNet, MobileNet-style",
    ),
    "mosaic": (
        ("mosaic_small", "mosaic_large"),
        "FedMosaic's two frozen transformer trunks (2 x 64 and 4 x 128) with tokenizers for images, IMU and text",
    ),
    "har3": (
        ("har_cnn1d", "har_resnet1d", "har_gru"),
        "three sensor-window architectures [channels, time]: 1-D CNN, 1-D ResNet, GRU",
    ),
}


def register_family(name: str, architectures: tuple[str, ...], description: str) -> None:
    """Make a user-defined family available by name; its architectures must already be registered models."""
    architectures = tuple(architectures)
    if not architectures:
        raise UserError(f"model family '{name}' needs at least one architecture")
    for arch in architectures:
        if arch not in MODELS:
            close = difflib.get_close_matches(arch, list(MODELS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"model family '{name}' names unknown model '{arch}'{hint}")
    FAMILIES[name] = (architectures, description)


def get_family(name: str) -> tuple[str, ...]:
    """The architectures of family ``name``, in client order."""
    if name not in FAMILIES:
        close = difflib.get_close_matches(name, list(FAMILIES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown model family '{name}'; known: {', '.join(sorted(FAMILIES))}{hint}")
    return FAMILIES[name][0]


def architecture_of(client_id: int, architectures: tuple[str, ...]) -> str:
    """Client ``client_id``'s architecture: ``architectures[client_id % K]`` (HtFLlib's round-robin assignment)."""
    if not architectures:
        raise ValueError("architecture_of needs at least one architecture")
    if client_id < 0:
        raise ValueError(f"client ids are non-negative, got {client_id}")
    return architectures[client_id % len(architectures)]
