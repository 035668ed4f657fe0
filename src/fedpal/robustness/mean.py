"""The plain mean as a rule: today's reducer, the weighted mean of ``fedpal.engine.mean_fold``, bit for bit."""

from __future__ import annotations

from collections.abc import Mapping

from fedpal.common.tensors import Tensors
from fedpal.engine.mean_fold import weighted_mean
from fedpal.robustness.client_values import averaging_weights, client_order


def mean(
    parts: Mapping[int, Tensors], weights: Mapping[int, float] | None = None, reference: Tensors | None = None
) -> Tensors:
    """Today's reducer: the weighted mean of ``fedpal.engine.mean_fold``, bit for bit (sample-weighted when given
    weights). The reference is not used: the mean of the deltas plus the reference is the mean of the values."""
    ids = client_order(parts, weights)
    return weighted_mean(list(zip((parts[cid] for cid in ids), averaging_weights(ids, weights), strict=True)))
