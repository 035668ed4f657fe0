"""The one registry of algorithms: names map to classes; user code can register its own.

Built-in methods register themselves with ``@register_algorithm`` in their own module. A method's module is named
after the method (``fedavg`` lives in ``weight_sharing/fedavg.py``), so looking one name up imports that module
alone; listing every algorithm imports every method module found under ``fedpal.algorithms``. No list of methods
is kept by hand.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from functools import cache

import fedpal.algorithms as algorithms_package
from fedpal.algorithms.core.contract import Algorithm
from fedpal.errors import UserError

ALGORITHMS: dict[str, type[Algorithm]] = {}

# Sub-packages that hold shared mechanics, not methods.
_NOT_METHODS = {"core"}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make an algorithm available by its ``name``."""
    ALGORITHMS[cls.name] = cls
    return cls


@cache
def _method_modules() -> dict[str, str]:
    """Module stem -> dotted module path of every built-in method module (found on disk, not imported)."""
    found: dict[str, str] = {}
    for family in pkgutil.iter_modules(algorithms_package.__path__):
        if not family.ispkg or family.name in _NOT_METHODS:
            continue
        package = importlib.import_module(f"{algorithms_package.__name__}.{family.name}")
        for module in pkgutil.iter_modules(package.__path__):
            found[module.name] = f"{package.__name__}.{module.name}"
    return found


def _import_all() -> None:
    for dotted in _method_modules().values():
        importlib.import_module(dotted)


def get_algorithm_class(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS and name in _method_modules():
        importlib.import_module(_method_modules()[name])
    if name not in ALGORITHMS:
        _import_all()
        close = difflib.get_close_matches(name, list(ALGORITHMS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown algorithm '{name}'; known: {', '.join(sorted(ALGORITHMS))}{hint}")
    return ALGORITHMS[name]


def all_algorithms() -> dict[str, type[Algorithm]]:
    _import_all()
    return dict(sorted(ALGORITHMS.items()))
