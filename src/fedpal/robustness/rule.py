"""What every aggregation rule is, the steps they share, and ``build_rule``, which makes one from its name.

A rule reduces one payload key's client values: ``rule(parts, weights, reference) -> Tensors``, where ``parts`` maps
client ids to parameter sets (the same names and shapes for every client), ``weights`` are the averaging weights
(sample counts; None: uniform) and ``reference`` is the last broadcast. Model tensors are reduced as deltas from the
reference when there is one: the rule sees x_i - reference and the result is reference + the reduced delta. For a
coordinate rule that is the rule on the values; for Krum and Bulyan the distances are the same; for norm bounding it
is what makes the bound mean "how far a client moved". Without a reference the rule acts on the values.

Every rule works in float64 on the clients in ascending id order, so its result does not depend on the order of
``parts``, and returns each tensor in the dtype and on the device it came in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

from fedpal.common.tensors import Tensors

RULE_NAMES = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "norm_bound")


class Rule(Protocol):
    """One payload key's client values -> the reduced parameter set."""

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        reference: Tensors | None = None,
    ) -> Tensors: ...


def client_order(parts: Mapping[int, Tensors], weights: Mapping[int, float] | None) -> list[int]:
    """The client ids in ascending order, once the parts agree on names and shapes and the weights name them all."""
    if not parts:
        raise ValueError("nothing to reduce")
    if weights is not None and set(weights) != set(parts):
        raise ValueError("reduce: weights must name exactly the clients of parts")
    ids = sorted(parts)
    first = parts[ids[0]]
    for cid in ids[1:]:
        other = parts[cid]
        if other.keys() != first.keys() or any(other[k].shape != first[k].shape for k in first):
            raise ValueError("a robust rule needs the same tensors (names and shapes) from every client")
    return ids


def check_reference(template: Tensors, reference: Tensors | None) -> None:
    if reference is not None and (
        reference.keys() != template.keys() or any(reference[k].shape != template[k].shape for k in template)
    ):
        raise ValueError("the reference must have the clients' tensor names and shapes")


def as_delta(values: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """``values`` in float64, minus the reference when there is one."""
    values = values.detach().to(torch.float64)
    if reference is None:
        return values
    return values - reference.detach().to(device=values.device, dtype=torch.float64)


def client_delta(part: Tensors, reference: Tensors | None) -> Tensors:
    """One client's float64 parameter set minus the reference (or its values), name by name."""
    return {name: as_delta(value, None if reference is None else reference[name]) for name, value in part.items()}


def stacked_values(parts: Mapping[int, Tensors], ids: list[int]) -> dict[str, torch.Tensor]:
    """Per tensor name, the clients' values as they came (dtype kept), stacked along a new first axis in the order
    of ``ids``."""
    template = parts[ids[0]]
    return {name: torch.stack([parts[cid][name].detach() for cid in ids]) for name in sorted(template)}


def stacked_deltas(parts: Mapping[int, Tensors], ids: list[int], reference: Tensors | None) -> dict[str, torch.Tensor]:
    """Per tensor name, the clients' values minus the reference (or the values), in float64, stacked along a new
    first axis in the order of ``ids``."""
    template = parts[ids[0]]
    check_reference(template, reference)
    stacked: dict[str, torch.Tensor] = {}
    for name in sorted(template):
        like = template[name]
        values = torch.empty((len(ids), *like.shape), dtype=torch.float64, device=like.device)
        for row, cid in enumerate(ids):
            values[row].copy_(parts[cid][name].detach())
        if reference is not None:
            values.sub_(reference[name].detach().to(device=values.device, dtype=torch.float64))
        stacked[name] = values
    return stacked


def joint_values(parts: Mapping[int, Tensors], ids: list[int]) -> torch.Tensor:
    """One row per client (``ids`` order): all its tensors flattened and concatenated in sorted name order, in the
    tensors' common dtype (float32 replies stay float32: half the bytes of a float64 copy)."""
    template = parts[ids[0]]
    names = sorted(template)
    dtype = template[names[0]].dtype
    for name in names[1:]:
        dtype = torch.promote_types(dtype, template[name].dtype)
    bounds = [0]
    for name in names:
        bounds.append(bounds[-1] + template[name].numel())
    rows = torch.empty((len(ids), bounds[-1]), dtype=dtype, device=template[names[0]].device)
    for row, cid in enumerate(ids):
        for name, start, end in zip(names, bounds[:-1], bounds[1:], strict=True):
            rows[row, start:end].copy_(parts[cid][name].detach().reshape(-1))
    return rows


def sum_along_clients(values: torch.Tensor) -> torch.Tensor:
    """The float64 sum over the first axis, row by row in order, without a float64 copy of all the rows."""
    total = values[0].to(torch.float64, copy=True)
    for row in values[1:]:
        total.add_(row)
    return total


def sort_along_clients(values: torch.Tensor) -> torch.Tensor:
    """The values sorted along the first axis (clients), ascending. On the CPU through NumPy, whose sort along an
    axis is 5-8x faster than torch's for a few rows of many columns (the shape of a round's replies)."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(values.numpy(), axis=0))
    return values.sort(dim=0).values


def averaging_weights(ids: list[int], weights: Mapping[int, float] | None) -> list[float]:
    """The weight of each client in ``ids`` order (1.0 each without weights), as today's mean takes them."""
    return [1.0 if weights is None else float(weights[cid]) for cid in ids]


def finish(reduced: Mapping[str, torch.Tensor], template: Tensors, reference: Tensors | None) -> Tensors:
    """The reference plus the reduced float64 delta (or the reduced values), in the template's dtypes and devices
    and name order."""
    out: Tensors = {}
    for name, like in template.items():
        value = reduced[name]
        if reference is not None:
            value = value + reference[name].detach().to(device=value.device, dtype=torch.float64)
        out[name] = value.to(device=like.device, dtype=like.dtype)
    return out


def mean(
    parts: Mapping[int, Tensors], weights: Mapping[int, float] | None = None, reference: Tensors | None = None
) -> Tensors:
    """Today's reducer: the weighted mean of ``fedpal.engine.reduction``, bit for bit (sample-weighted when given
    weights). The reference is not used: the mean of the deltas plus the reference is the mean of the values."""
    from fedpal.engine.reduction import weighted_mean  # here, not above: the engine's reducer imports this package

    ids = client_order(parts, weights)
    return weighted_mean(list(zip((parts[cid] for cid in ids), averaging_weights(ids, weights), strict=True)))


def build_rule(name: str, **settings: Any) -> Rule:
    """The rule called ``name`` with its settings (see each rule's module for their meaning and defaults).

    ``mean`` and ``median`` take no settings; ``trimmed_mean``: ``beta``; ``krum``: ``f``; ``multikrum``: ``f``,
    ``m``; ``bulyan``: ``f``; ``norm_bound``: ``C`` (required). A misspelt setting is an error, not ignored.
    """
    # imported here because the rule modules import the helpers above
    from fedpal.robustness.bulyan import Bulyan
    from fedpal.robustness.coordinate_median import coordinate_median
    from fedpal.robustness.krum import Krum, MultiKrum
    from fedpal.robustness.norm_bound import NormBound
    from fedpal.robustness.trimmed_mean import TrimmedMean

    functions: dict[str, Rule] = {"mean": mean, "median": coordinate_median}
    classes: dict[str, type] = {
        "trimmed_mean": TrimmedMean,
        "krum": Krum,
        "multikrum": MultiKrum,
        "bulyan": Bulyan,
        "norm_bound": NormBound,
    }
    if name in functions:
        if settings:
            raise ValueError(f"the {name} rule takes no settings, got {sorted(settings)}")
        return functions[name]
    if name not in classes:
        raise ValueError(f"unknown aggregation rule {name!r}; choose one of {', '.join(RULE_NAMES)}")
    fields = {f.name: f for f in dataclasses.fields(classes[name])}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(f"unknown settings {unknown} for the {name} rule; it takes {sorted(fields)}")
    missing = sorted(
        key
        for key, f in fields.items()
        if key not in settings and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(f"the {name} rule needs {missing}")
    rule: Rule = classes[name](**settings)
    return rule
