"""Parameter sets as plain dicts of tensors: what messages, states and modules exchange."""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]


def clone_tensors(params: Tensors) -> Tensors:
    """Independent, detached copies (a state or message must never alias a module's live tensors)."""
    return {k: v.detach().clone() for k, v in params.items()}
