"""Robust aggregation rules for the engine's one reduction point (``fedpal.engine.reduction``).

Each rule reduces the round's client values for one payload key, as a pure function of the values, the averaging
weights and the last broadcast (``rule.py`` says how; ``client_values`` holds the steps they share). One rule per
module: ``mean`` (today's weighted mean, bit for bit), ``coordinate_median``, ``trimmed_mean``, ``krum`` (Krum and
Multi-Krum), ``bulyan``, ``norm_bound``; ``class_wise`` applies a rule per class to prototype payloads, over the
clients that reported each class. ``rule.build_rule`` makes a rule from its configured name and settings.
"""
