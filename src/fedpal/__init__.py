"""fedpal: personalized federated learning under heterogeneity, on one engine and one evaluation protocol.

``run``, ``resume`` and ``Result`` (and the ``api`` module) are imported on first use, so ``import fedpal`` (and
every CLI command that needs no training, ``--help`` first) does not pay for importing torch.
"""

import importlib
from typing import Any

__all__ = ["Result", "resume", "run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__ or name == "api":
        api = importlib.import_module("fedpal.api")  # not `from fedpal import api`: that would ask this hook again
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'fedpal' has no attribute {name!r}")
