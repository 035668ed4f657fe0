"""Unreliable clients on a virtual clock (FLGo's simulator model): nothing sleeps, time is a number.

Per round and client, from ``derive_seed(seed, round, client, "unreliable")``:
- available ~ Bernoulli(p_available): an unavailable client cannot be sampled (the engine samples among the
  available ones);
- dropped ~ Bernoulli(p_drop): a sampled client trains but its reply never arrives;
- latency ~ LogNormal(μ, σ) virtual seconds from the round's start to its reply's arrival; a reply later than
  the round ``deadline`` is discarded and counted as late.

The three draws are always made, in that order, so each one is a fixed function of (seed, round, client): raising
p_available only turns unavailable clients into available ones, and leaves every latency as it was.

The round's virtual time is when the server stops waiting: the last accepted arrival when every sampled client
that trained replied in time; the deadline when one did not (the server cannot tell a lost reply from a slow
one). Without a deadline (infinite) a lost reply is taken as reported at once (a broken connection), so nothing
ever waits forever; a client that is never available is never sampled and never waited for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedpal.common.seeding import derive_seed
from fedpal.errors import ConfigError


@dataclass(frozen=True)
class Unreliability:
    """How unreliable clients are: probabilities, the latency's log-normal parameters, the round deadline."""

    p_available: float = 1.0
    p_drop: float = 0.0
    latency_mu: float = 0.0  # mean of log(latency / 1 virtual second)
    latency_sigma: float = 0.0  # standard deviation of log(latency)
    deadline: float = math.inf  # virtual seconds after the round's start
    # p_available of particular clients (e.g. 0 for a client that is dead for the whole run); others: p_available
    p_available_by_client: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        checked = [("p_available", self.p_available), ("p_drop", self.p_drop)]
        checked += [(f"p_available of client {c}", p) for c, p in (self.p_available_by_client or {}).items()]
        for key, value in checked:
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"unreliable clients: {key} must lie in [0, 1], got {value}")
        if not self.latency_sigma >= 0:
            raise ConfigError(f"unreliable clients: latency_sigma must be >= 0, got {self.latency_sigma}")
        if not math.isfinite(self.latency_mu):
            raise ConfigError(f"unreliable clients: latency_mu must be finite, got {self.latency_mu}")
        if not self.deadline > 0:
            raise ConfigError(f"unreliable clients: the round deadline must be > 0, got {self.deadline}")

    def availability(self, client: int) -> float:
        """The probability that ``client`` is available in a round."""
        by_client = self.p_available_by_client or {}
        return by_client.get(client, self.p_available)


@dataclass(frozen=True)
class RoundOutcome:
    """What happens to one client in one round, had it been sampled."""

    round: int
    client: int
    available: bool
    dropped: bool  # trains, never replies
    latency: float  # virtual seconds until its reply would arrive
    late: bool  # the reply would arrive after the deadline

    @property
    def replies(self) -> bool:
        """Its reply reaches the server in time."""
        return self.available and not self.dropped and not self.late


def client_outcome(settings: Unreliability, seed: int, round: int, client: int) -> RoundOutcome:
    """The seeded outcome of ``client`` in ``round``."""
    rng = np.random.default_rng(derive_seed(seed, round, client, "unreliable"))
    available_draw, drop_draw = rng.random(2)
    latency = float(np.exp(settings.latency_mu + settings.latency_sigma * rng.standard_normal()))
    available = bool(available_draw < settings.availability(client))
    dropped = available and bool(drop_draw < settings.p_drop)
    late = available and not dropped and latency > settings.deadline
    return RoundOutcome(round, client, available, dropped, latency, late)


def available_clients(settings: Unreliability, seed: int, round: int, candidates: Iterable[int]) -> list[int]:
    """The candidates available in ``round`` (ascending), among whom the engine samples."""
    return sorted(c for c in candidates if client_outcome(settings, seed, round, c).available)


@dataclass(frozen=True)
class RoundFate:
    """The fate of a round's sampled clients (ids ascending in every list)."""

    outcomes: dict[int, RoundOutcome]
    unavailable: list[int]  # offline: neither train nor reply (only if sampled without checking availability)
    dropped: list[int]  # train, never reply
    late: list[int]  # reply after the deadline: discarded
    accepted: list[int]  # reply in time: the replies the round reduces
    virtual_time: float  # virtual seconds the round took

    @property
    def trained(self) -> list[int]:
        """The clients that ran local training this round (their work counts even if their reply is lost)."""
        return sorted(self.dropped + self.late + self.accepted)


def round_fate(settings: Unreliability, seed: int, round: int, sampled: Iterable[int]) -> RoundFate:
    """Which of the ``sampled`` clients are unavailable, drop out, are late or are accepted, and the round's time."""
    outcomes = {c: client_outcome(settings, seed, round, c) for c in sorted(set(sampled))}
    unavailable = [c for c, o in outcomes.items() if not o.available]
    dropped = [c for c, o in outcomes.items() if o.dropped]
    late = [c for c, o in outcomes.items() if o.late]
    accepted = [c for c, o in outcomes.items() if o.replies]
    last_arrival = max((outcomes[c].latency for c in accepted), default=0.0)
    waits_for_deadline = bool(late) or (bool(dropped) and math.isfinite(settings.deadline))
    virtual_time = settings.deadline if waits_for_deadline else min(last_arrival, settings.deadline)
    return RoundFate(outcomes, unavailable, dropped, late, accepted, virtual_time)
