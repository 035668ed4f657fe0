"""The client side of evaluation: what a client computes, on its own data, for the evaluator to summarise.

A client builds its personalized model from its own state and its evaluation payload and scores its own test and
validation splits (and, when asked, a probe set: the seeded sample of pooled test data that measures
generalization). It runs wherever the executor runs client work; the evaluator only reads the scores, on the CPU:
a client on a GPU sends them back in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpal.algorithms.core.contract import Algorithm, ClientState, ClientView, Payload


@dataclass
class ClientPredictions:
    """Class scores [n, C] of a client's personalized model, per inference mode."""

    test: dict[str, torch.Tensor]  # its own test split
    val: torch.Tensor  # its own validation split, primary mode
    probe: dict[str, torch.Tensor] | None  # the generalization sample, when the evaluator asked for it


def host_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors on the CPU, in one device-to-host copy when they share a dtype (score matrices do); the same
    tensors when they are on the CPU already."""
    if all(t.device.type == "cpu" for t in tensors):
        return tensors
    if len({t.dtype for t in tensors}) > 1:
        return [t.cpu() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape) for part, t in zip(parts, tensors, strict=True)]


def predict_client(
    algorithm: Algorithm,
    view: ClientView,
    state: ClientState,
    payload: Payload,
    test_x: torch.Tensor,
    val_x: torch.Tensor,
    probe_x: torch.Tensor | None,
) -> ClientPredictions:
    """The client's scores on its splits (and on ``probe_x``), scored where its data live, returned on the CPU."""
    params = algorithm.personalized_params(view, state, payload)
    test = algorithm.predict_scores(view, state, payload, params, test_x)
    probe = algorithm.predict_scores(view, state, payload, params, probe_x) if probe_x is not None else {}
    val = algorithm.predict_scores(view, state, payload, params, val_x)[algorithm.inference_modes()[0]]
    moved = host_tensors([*test.values(), *probe.values(), val])
    test_host = dict(zip(test, moved[: len(test)], strict=True))
    probe_host = dict(zip(probe, moved[len(test) : -1], strict=True))
    return ClientPredictions(test_host, moved[-1], probe_host if probe_x is not None else None)
