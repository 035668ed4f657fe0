"""The device a run's tensors live on (``run.device``), checked once before anything is built or moved.

On ``cuda`` the federation's data, every module and therefore every client state and message are on the GPU from
the start: in a round no data, parameters or batch indices cross between host and device (only scalars the code
branches on, and the evaluator's scores, one copy per client). Worker processes (``run.executor = "processes"``)
exchange CPU tensors through pipes and shared memory, so they are a CPU tool.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedpal.config import RunConfig
from fedpal.errors import UserError

PROCESSES_NEED_CPU = (
    "run.executor = 'processes' runs CPU worker processes and cannot use run.device = 'cuda'; "
    "use 'batched', 'sequential' or 'auto'"
)


def run_device(run: RunConfig, cuda_available: Callable[[], bool] | None = None) -> torch.device:
    """``run.device`` as a torch device, or one UserError line when this machine or executor cannot use it.

    ``cuda_available`` replaces ``torch.cuda.is_available`` (tests on machines without a GPU).
    """
    if run.device == "cuda":
        available = cuda_available() if cuda_available is not None else torch.cuda.is_available()
        if not available:
            raise UserError(
                "run.device = 'cuda' but torch finds no usable CUDA device (torch.cuda.is_available() is False); "
                "install a CUDA build of torch or set run.device = 'cpu'"
            )
        if run.executor == "processes":
            raise UserError(PROCESSES_NEED_CPU)
    return torch.device(run.device)
