"""The privacy accountant of user-level DP-FedAvg, over Google's ``dp-accounting`` (optional extra ``fedpal[dp]``).

Each round is one sampled Gaussian mechanism on the clients' data: noise of std z·C on the sum of updates clipped
to C. dp-accounting's noise multiplier is the std over the sum's L2 sensitivity under the neighbouring relation, so
it depends on the way clients are sampled:

- ``"poisson"``: each of N clients joins independently with probability q = m/N (m the expected cohort). The
  event is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under the add-or-remove-one relation (neighbouring
  federations differ by one user's presence, which changes the sum by at most C: sensitivity C).
- ``"without_replacement"``: exactly m of N clients per round, uniformly (fedpal's fixed-size sampling). The event
  is ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`` under the replace-one relation
  (neighbouring federations of the same size N differ in one user's data, which moves that user's clipped update
  anywhere in the ball of radius C: sensitivity 2C, so the multiplier is z/2), which is what dp-accounting supports
  for it.

A round is accounted with the m clients it sampled, whatever became of their replies: a reply lost, late or
rejected contributes nothing to the sum, which is within the bound C. Sampling among the available clients keeps
the sample uniform over the N clients (availability is i.i.d. per client), so m of N stays the right event.

ε comes from RDP (cheap: ``epsilon()`` each round, ``would_exceed`` before a round) and, at the end, from the
privacy loss distribution (PLD, 10–15% tighter; ``final_epsilon()``). dp-accounting 0.6 has no PLD for sampling
without replacement, so ``final_epsilon`` of that method is the RDP value.

The state is the list of composed rounds, run-length encoded as [z, m, rounds] segments (plain numbers, so a
checkpoint holds it): ε is always recomputed from that list, so it is the same, bit for bit, before a kill and
after resuming from the checkpoint.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Literal

from fedpal.errors import ConfigError, UserError

Sampling = Literal["poisson", "without_replacement"]
Accounting = Literal["rdp", "pld"]
SAMPLINGS: tuple[str, ...] = ("poisson", "without_replacement")
INSTALL = 'pip install -e ".[dp]"'
_STATE_VERSION = 1


def require_dp_accounting() -> ModuleType:
    """dp-accounting, imported on first use; a one-line UserError naming the install command without it."""
    if importlib.util.find_spec("dp_accounting") is None:
        raise UserError(f"privacy accounting needs dp-accounting, which is not installed: {INSTALL}")
    return importlib.import_module("dp_accounting")


def _check_sampling(sampling: str, sample_size: int, population_size: int) -> None:
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if population_size < 1 or not 1 <= sample_size <= population_size:
        raise ConfigError(
            f"privacy accounting needs 1 ≤ clients per round ({sample_size}) ≤ population ({population_size})"
        )


def _sensitivity_factor(sampling: Sampling) -> float:
    """The sum's L2 sensitivity in units of the clipping bound C under the relation ``sampling`` is accounted with:
    1 for add-or-remove-one (Poisson), 2 for replace-one (fixed-size sampling without replacement)."""
    return 1.0 if sampling == "poisson" else 2.0


def _event(dp: ModuleType, sampling: Sampling, noise_multiplier: float, sample_size: int, population: int) -> Any:
    gaussian = dp.GaussianDpEvent(float(noise_multiplier) / _sensitivity_factor(sampling))
    if sampling == "poisson":
        return dp.PoissonSampledDpEvent(sample_size / population, gaussian)
    return dp.SampledWithoutReplacementDpEvent(population, sample_size, gaussian)


def _relation(dp: ModuleType, sampling: Sampling) -> Any:
    relation = dp.NeighboringRelation
    return relation.ADD_OR_REMOVE_ONE if sampling == "poisson" else relation.REPLACE_ONE


def _epsilon(
    dp: ModuleType,
    sampling: Sampling,
    population: int,
    delta: float,
    segments: list[tuple[float, int, int]],
    accounting: Accounting,
) -> float:
    """ε at δ of the composition of ``segments`` [(z, m, rounds)], from a fresh dp-accounting accountant."""
    if not segments:
        return 0.0
    if accounting == "pld" and sampling == "poisson":
        accountant = dp.pld.PLDAccountant(neighboring_relation=_relation(dp, sampling))
    else:
        accountant = dp.rdp.RdpAccountant(neighboring_relation=_relation(dp, sampling))
    for z, m, rounds in segments:
        accountant.compose(dp.SelfComposedDpEvent(_event(dp, sampling, z, m, population), rounds))
    return float(accountant.get_epsilon(delta))


class PrivacyAccountant:
    """ε spent so far by DP-FedAvg rounds over a population of ``population_size`` clients, at ``delta``."""

    def __init__(
        self,
        population_size: int,
        *,
        delta: float = 1e-5,
        sampling: Sampling = "poisson",
        max_epsilon: float | None = None,
    ) -> None:
        self._dp = require_dp_accounting()
        _check_sampling(sampling, 1, population_size)
        if not 0 < delta < 1:
            raise ConfigError(f"delta must lie in (0, 1), got {delta}")
        if max_epsilon is not None and not max_epsilon > 0:
            raise ConfigError(f"max_epsilon must be positive, got {max_epsilon}")
        self.population_size = int(population_size)
        self.delta = float(delta)
        self.sampling: Sampling = sampling
        self.max_epsilon = max_epsilon
        self.segments: list[tuple[float, int, int]] = []  # (noise multiplier, clients per round, rounds)

    @property
    def rounds(self) -> int:
        return sum(r for _, _, r in self.segments)

    def compose(self, noise_multiplier: float, sample_size: int, rounds: int = 1) -> None:
        """Account ``rounds`` more rounds of noise multiplier z with ``sample_size`` (expected) clients each."""
        _check_sampling(self.sampling, sample_size, self.population_size)
        if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
            raise ConfigError(f"the noise multiplier must be a finite number ≥ 0, got {noise_multiplier}")
        if rounds < 1:
            raise ValueError("compose at least one round")
        z, m = float(noise_multiplier), int(sample_size)
        if self.segments and self.segments[-1][:2] == (z, m):
            self.segments[-1] = (z, m, self.segments[-1][2] + rounds)
        else:
            self.segments.append((z, m, rounds))

    def epsilon(self, accounting: Accounting = "rdp") -> float:
        """ε at ``delta`` after the rounds composed so far (RDP by default: fast enough for every round)."""
        return _epsilon(self._dp, self.sampling, self.population_size, self.delta, self.segments, accounting)

    def final_epsilon(self) -> float:
        """The tightest ε available: PLD for Poisson sampling, RDP for sampling without replacement."""
        return self.epsilon("pld")

    def would_exceed(
        self,
        max_epsilon: float | None = None,
        *,
        noise_multiplier: float | None = None,
        sample_size: int | None = None,
        rounds: int = 1,
    ) -> bool:
        """Whether ε (RDP) would pass ``max_epsilon`` (default: the accountant's) after ``rounds`` more rounds of
        (z, m); without them, whether it has passed already. RDP bounds PLD's ε from above, so a halt decided here
        is never late."""
        limit = self.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            return False
        segments = list(self.segments)
        if noise_multiplier is not None or sample_size is not None:
            if noise_multiplier is None or sample_size is None:
                raise ValueError("would_exceed needs both the noise multiplier and the clients per round")
            _check_sampling(self.sampling, sample_size, self.population_size)
            segments.append((float(noise_multiplier), int(sample_size), rounds))
        return _epsilon(self._dp, self.sampling, self.population_size, self.delta, segments, "rdp") > limit

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and strings, for the run's checkpoint."""
        return {
            "version": _STATE_VERSION,
            "population_size": self.population_size,
            "delta": self.delta,
            "sampling": self.sampling,
            "max_epsilon": self.max_epsilon,
            "segments": [[z, m, r] for z, m, r in self.segments],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown privacy accountant state version {state.get('version')!r}")
        sampling = state["sampling"]
        _check_sampling(sampling, 1, int(state["population_size"]))
        self.population_size = int(state["population_size"])
        self.delta = float(state["delta"])
        self.sampling = sampling
        self.max_epsilon = None if state["max_epsilon"] is None else float(state["max_epsilon"])
        self.segments = [(float(z), int(m), int(r)) for z, m, r in state["segments"]]


def calibrate_noise_multiplier(
    target_epsilon: float,
    *,
    delta: float,
    rounds: int,
    sample_size: int,
    population_size: int,
    sampling: Sampling = "poisson",
    accounting: Accounting = "pld",
    rtol: float = 1e-3,
) -> float:
    """The smallest z (to ``rtol`` in ε) whose ε after ``rounds`` rounds at q = m/N stays ≤ ``target_epsilon``.

    Bisection on log z: ε falls as z grows. The bracket grows by doubling until it holds the target; the answer
    is the bracket's upper end, so its ε never exceeds the target and lies within ``rtol`` of it."""
    dp = require_dp_accounting()
    _check_sampling(sampling, sample_size, population_size)
    if not target_epsilon > 0 or not 0 < delta < 1 or rounds < 1:
        raise ConfigError("calibration needs ε > 0, δ in (0, 1) and at least one round")

    def epsilon_at(z: float) -> float:
        return _epsilon(dp, sampling, population_size, delta, [(z, sample_size, rounds)], accounting)

    low, high = 0.5, 1.0
    while epsilon_at(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise UserError(f"no noise multiplier up to 1e6 reaches ε = {target_epsilon} at δ = {delta}")
    while epsilon_at(low) <= target_epsilon:
        low, high = low / 2, low
        if low < 1e-4:
            return high
    eps_high = epsilon_at(high)
    for _ in range(100):
        if eps_high >= target_epsilon * (1 - rtol):
            break
        middle = math.sqrt(low * high)
        eps_middle = epsilon_at(middle)
        if eps_middle > target_epsilon:
            low = middle
        else:
            high, eps_high = middle, eps_middle
    return high
