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


def stacked_deltas(parts: Mapping[int, Tensors], ids: list[int], reference: Tensors | None) -> dict[str, torch.Tensor]:
    """Per tensor name, the clients' values minus the reference (or the values), in float64, stacked along a new
    first axis in the order of ``ids``."""
    template = parts[ids[0]]
    if reference is not None and (
        reference.keys() != template.keys() or any(reference[k].shape != template[k].shape for k in template)
    ):
        raise ValueError("the reference must have the clients' tensor names and shapes")
    stacked: dict[str, torch.Tensor] = {}
    for name in sorted(template):
        values = torch.stack([parts[cid][name].detach().to(torch.float64) for cid in ids])
        if reference is not None:
            values = values - reference[name].detach().to(device=values.device, dtype=torch.float64)
        stacked[name] = values
    return stacked


def joint_vectors(stacked: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One row per client: all of its tensors flattened and concatenated in sorted name order."""
    return torch.cat([stacked[name].reshape(stacked[name].shape[0], -1) for name in sorted(stacked)], dim=1)


def client_row(stacked: Mapping[str, torch.Tensor], row: int) -> Tensors:
    """The float64 parameter set of the client at position ``row`` of the stack."""
    return {name: values[row] for name, values in stacked.items()}


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
