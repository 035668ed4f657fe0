"""Simulated adversaries and unreliable clients, as pure, seeded pieces the round driver applies.

- ``malicious``: which clients are malicious (a fixed, seeded set for the whole run);
- ``reply_attacks``: what a malicious client sends instead of its honest update (sign flip, Gaussian, scaling,
  "a little is enough", inner-product manipulation, prototype poisoning);
- ``data_poisoning``: what a malicious client does to its own training split (label flipping, a pixel-patch
  backdoor) and how a backdoor's success is measured;
- ``unreliable``: availability, dropouts and latency against a round deadline, on a virtual clock.

Every random draw is derived from (seed, round, client, purpose) (``fedpal.common.seeding``), so a run is the same
whatever the executor or the order in which clients run.
"""
