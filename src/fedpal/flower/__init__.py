"""The Flower engine: fedpal's round driver on Flower's Grid, client work in Flower ClientApps (``pip install -e
".[flower]"``). Only modules of this package import ``flwr``, and only when they are imported themselves, so the core
package runs without it; ``require_flower`` says in one line how to install it."""

from __future__ import annotations

import importlib.util
import os

from fedpal.errors import UserError

INSTALL = 'pip install -e ".[flower]"'

# Flower calls home (telemetry, update checks) and installs app dependencies at run time unless told not to.
QUIET_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def require_flower(what: str = "--engine flower") -> None:
    """Fail in one line, naming the install command, when flwr is not installed."""
    if importlib.util.find_spec("flwr") is None:
        raise UserError(f"{what} needs Flower, which is not installed: {INSTALL}")


def quiet_flower() -> None:
    """No telemetry, no update checks, no run-time installs in this process and the ones it starts."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
