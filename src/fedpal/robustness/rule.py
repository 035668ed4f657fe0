"""What every aggregation rule is, and ``build_rule``, which makes one from its name (the steps rules share are in
``client_values``).

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

from fedpal.common.tensors import Tensors
from fedpal.robustness.bulyan import Bulyan
from fedpal.robustness.coordinate_median import coordinate_median
from fedpal.robustness.krum import Krum, MultiKrum
from fedpal.robustness.mean import mean
from fedpal.robustness.norm_bound import NormBound
from fedpal.robustness.trimmed_mean import TrimmedMean

RULE_NAMES = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "norm_bound")


class Rule(Protocol):
    """One payload key's client values -> the reduced parameter set."""

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        reference: Tensors | None = None,
    ) -> Tensors: ...


def build_rule(name: str, **settings: Any) -> Rule:
    """The rule called ``name`` with its settings (see each rule's module for their meaning and defaults).

    ``mean`` and ``median`` take no settings; ``trimmed_mean``: ``beta``; ``krum``: ``f``; ``multikrum``: ``f``,
    ``m``; ``bulyan``: ``f``; ``norm_bound``: ``C`` (required). A misspelt setting is an error, not ignored.
    """
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
