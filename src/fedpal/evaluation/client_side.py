"""The client side of evaluation: what a client computes, on its own data, for the evaluator to summarise.

A client builds its personalized model from its own state and its evaluation payload and scores its own test and
validation splits (and, when asked, a probe set: the seeded sample of pooled test data that measures
generalization). It runs wherever the executor runs client work; the evaluator only reads the scores.
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


def predict_client(
    algorithm: Algorithm,
    view: ClientView,
    state: ClientState,
    payload: Payload,
    test_x: torch.Tensor,
    val_x: torch.Tensor,
    probe_x: torch.Tensor | None,
) -> ClientPredictions:
    params = algorithm.personalized_params(view, state, payload)
    test = algorithm.predict_scores(view, state, payload, params, test_x)
    probe = algorithm.predict_scores(view, state, payload, params, probe_x) if probe_x is not None else None
    val = algorithm.predict_scores(view, state, payload, params, val_x)[algorithm.inference_modes()[0]]
    return ClientPredictions(test, val, probe)
