"""Robust reduction of prototype payloads: one rule per class, over the clients that reported the class.

A prototype payload is a vector per class, and a client reports only the classes it holds, so a rule over whole
payloads would mix classes some clients never saw. Here each class is reduced on its own, over its reporters:
``median`` (coordinate-wise), ``trimmed_mean`` (``beta`` per side) or ``mean`` (weighted by each reporter's
sample count of the class, as FedProto's server does). Under label skew a class may have only two or three
reporters, too few for any robust statistic (and far too few for Krum, which is why it is not offered): a class with
fewer than 3 reporters falls back to the count-weighted mean, and one warning per call names those classes. A class
that nobody reported is absent from the result.

ProtoNorm's and FedAli's prototypes lie on the unit sphere, where only the direction carries information; a median
or mean of unit vectors is shorter than 1, so ``renormalize=True`` scales each class's result back to unit norm (a
zero result stays zero).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch

from fedpal.engine.mean_fold import MeanFold
from fedpal.robustness.coordinate_median import median_along_clients
from fedpal.robustness.trimmed_mean import check_beta, trimmed_mean_along_clients

log = logging.getLogger("fedpal")

ClassRule = Literal["mean", "median", "trimmed_mean"]
CLASS_RULES: tuple[ClassRule, ...] = ("mean", "median", "trimmed_mean")
MIN_ROBUST_REPORTERS = 3  # below this a median or trimmed mean is no more robust than the mean


def class_wise(
    rule_name: ClassRule,
    parts: Mapping[int, Mapping[int, torch.Tensor]],
    counts: Mapping[int, Mapping[int, float]] | None = None,
    *,
    beta: float = 0.2,
    renormalize: bool = False,
) -> dict[int, torch.Tensor]:
    """Class index -> the reduced prototype [D], for every class some client reported.

    ``parts``: client id -> {class index: prototype [D]}; ``counts``: client id -> {class index: samples of that
    class}, the mean's weights (None: every reporter counts once). The median and trimmed mean are unweighted.
    Computed in float64 over the reporters in ascending client id order; returned in the reporters' dtype/device.
    """
    if rule_name not in CLASS_RULES:
        raise ValueError(f"class-wise rule must be one of {', '.join(CLASS_RULES)}; got {rule_name!r}")
    check_beta(beta)
    classes = sorted({k for protos in parts.values() for k in protos})
    result: dict[int, torch.Tensor] = {}
    few: list[int] = []
    for k in classes:
        reporters = sorted(cid for cid, protos in parts.items() if k in protos)
        first = parts[reporters[0]][k]
        if any(parts[cid][k].shape != first.shape for cid in reporters):
            raise ValueError(f"class {k}: every client's prototype must have the same shape")
        if rule_name == "mean" or len(reporters) < MIN_ROBUST_REPORTERS:
            if rule_name != "mean":
                few.append(k)
            fold = MeanFold()
            for cid in reporters:
                fold.add({"p": parts[cid][k].detach().to(torch.float64)}, class_count(counts, cid, k))
            value = fold.mean()["p"]
        else:
            values = torch.stack([parts[cid][k].detach().to(torch.float64) for cid in reporters])
            value = median_along_clients(values) if rule_name == "median" else trimmed_mean_along_clients(values, beta)
        if renormalize:
            norm = value.norm()
            if norm > 0:
                value = value / norm
        result[k] = value.to(device=first.device, dtype=first.dtype)
    if few:
        log.warning(
            "class-wise %s: classes %s have fewer than %d reporting clients, too few for a robust statistic; "
            "their prototypes are the count-weighted mean instead",
            rule_name,
            few,
            MIN_ROBUST_REPORTERS,
        )
    return result


def class_count(counts: Mapping[int, Mapping[int, float]] | None, cid: int, k: int) -> float:
    """The mean's weight of client ``cid``'s prototype of class ``k``."""
    if counts is None:
        return 1.0
    if cid not in counts or k not in counts[cid]:
        raise ValueError(f"client {cid} reported class {k} without its sample count")
    return float(counts[cid][k])
