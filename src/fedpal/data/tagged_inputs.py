"""Task-tagged inputs: samples of several modalities and tasks in one float tensor, so a federation of multimodal,
multi-task clients (FedMosaic's task stream) fits the engine's one ``x`` per split.

Each row is ``[task id, modality code, payload...]``: the payload is the sample flattened and zero-padded to
``PAYLOAD`` values (a 1 x 28 x 28 image: 784 values; a 6 x 128 IMU window: 768; up to 256 character ids of text,
stored as floats). The task id is what an instruction tells a multimodal LLM in the paper's benchmark: which task
the sample belongs to, so a model can condition on it (a task token) and answer with that task's readout.
Only models that know the format (the mosaic trunks) read it; ``untag`` gives the pieces back.
"""

from __future__ import annotations

import math

import torch

from fedpal.errors import UserError

HEADER = 2  # task id, modality code
PAYLOAD = 784
WIDTH = HEADER + PAYLOAD
MODALITY_CODES = {"image": 0, "imu": 1, "text": 2}
SHAPES: dict[str, tuple[int, ...]] = {"image": (1, 28, 28), "imu": (6, 128), "text": (256,)}


def tag(x: torch.Tensor, task: int, modality: str) -> torch.Tensor:
    """Rows ``[task, modality code, x flattened, zeros]`` of samples ``x`` [N, *SHAPES[modality]]."""
    if modality not in MODALITY_CODES:
        raise UserError(f"unknown modality '{modality}'; known: {', '.join(MODALITY_CODES)}")
    if tuple(x.shape[1:]) != SHAPES[modality]:
        raise UserError(f"{modality} samples must have shape {list(SHAPES[modality])}, got {list(x.shape[1:])}")
    n, size = x.shape[0], math.prod(SHAPES[modality])
    rows = torch.zeros(n, WIDTH, dtype=torch.float32, device=x.device)
    rows[:, 0] = float(task)
    rows[:, 1] = float(MODALITY_CODES[modality])
    rows[:, HEADER : HEADER + size] = x.reshape(n, size).to(torch.float32)
    return rows


def is_tagged(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.is_floating_point() and x.shape[1] == WIDTH


def untag(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(task ids [N] long, modality codes [N] long, payloads [N, PAYLOAD])."""
    if not is_tagged(rows):
        raise UserError(f"task-tagged inputs are float rows of width {WIDTH}, got shape {list(rows.shape)}")
    return rows[:, 0].long(), rows[:, 1].long(), rows[:, HEADER:]


def payload_as(payload: torch.Tensor, modality: str) -> torch.Tensor:
    """The payloads of one modality's rows in that modality's own shape (text as long character ids)."""
    shape = SHAPES[modality]
    values = payload[:, : math.prod(shape)].reshape(payload.shape[0], *shape)
    return values.long() if modality == "text" else values
