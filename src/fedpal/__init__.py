"""fedpal: personalized federated learning under heterogeneity, on one engine and one evaluation protocol."""

from fedpal.api import Result, resume, run

__all__ = ["Result", "resume", "run"]
__version__ = "0.1.0"
