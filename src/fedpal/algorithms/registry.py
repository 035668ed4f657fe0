"""The one registry of algorithms: names map to classes; user code can register its own."""

from __future__ import annotations

import difflib

from fedpal.algorithms.base import Algorithm
from fedpal.errors import UserError

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make an algorithm available by its ``name``."""
    ALGORITHMS[cls.name] = cls
    return cls


def _load_builtins() -> None:
    # Importing the modules runs their @register_algorithm decorators.
    from fedpal.algorithms import (  # noqa: F401
        fedali,
        fedavg,
        fedavg_ft,
        feddistill,
        fedgh,
        fedkd,
        fedper,
        fedproto,
        fedprox,
        fedtgp,
        fml,
        lg_fedavg,
        local,
        moon,
        protonorm,
    )


def get_algorithm_class(name: str) -> type[Algorithm]:
    _load_builtins()
    if name not in ALGORITHMS:
        close = difflib.get_close_matches(name, list(ALGORITHMS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown algorithm '{name}'; known: {', '.join(sorted(ALGORITHMS))}{hint}")
    return ALGORITHMS[name]


def all_algorithms() -> dict[str, type[Algorithm]]:
    _load_builtins()
    return dict(sorted(ALGORITHMS.items()))
