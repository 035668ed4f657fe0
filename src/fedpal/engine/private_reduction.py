"""Client-level differential privacy in a run (``[privacy]``, DP-FedAvg): the one reduction point made private.

- Each accepted reply's model update (every reply key that updates the payload's parameter set of the same key) is
  clipped, jointly over those keys, to L2 norm ≤ C, as the client would before sending; a prototype payload is
  clipped class by class, and its per-class sample counts are withheld (replaced by presence: 1 for a class it
  holds), since they would reveal its label distribution. This happens before anything is reduced.
- ``PrivateReducer`` reduces updates as the plain, uniform mean of the clipped deltas plus Gaussian noise of std
  z·C on their sum (weights are ignored: a sample-weighted mean would let one client's weight raise its
  sensitivity). Prototype payloads are reduced per class as a noised sum over a noised holder count
  (``gaussian_noise.noised_prototype_mean``: sensitivity C·√(2K)). Other statistics keep the weighted mean without
  noise: the reply keys that carried them are listed in the summary as not covered (``unprotected_keys``), and so
  is anything a method's server reads from the replies beyond the reducer (FedTGP's generator, for one).
- With adaptive clipping the noised count of unclipped updates is a release too: the updates get the larger
  multiplier z_Δ so that the two are one mechanism of multiplier z (Andrew et al.).
- After each round the accountant (``fedpal.privacy.accountant``, the ``[dp]`` extra) composes one sampled
  Gaussian mechanism (z, clients the round sampled, population) per noised release of the round (the updates, the
  prototypes; a reply lost or rejected after sampling only leaves its client's share of the sum at 0), and
  adaptive clipping moves C toward its quantile. The state (C, the accountant's rounds) goes into the checkpoint,
  so ε after a resume is the uninterrupted run's.

With ``privacy.secure_aggregation`` the clipped deltas are summed through the simulated protocol
(``fedpal.privacy.secure_aggregation``: quantized, pairwise masks that cancel in the sum), the noise is added to the
unmasked sum, and the protocol's byte overhead is counted. Noise is drawn from a generator derived from (seed, round,
"dp-noise", call), so private runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from fedpal.algorithms.core.contract import ClassUpload, Payload, ReduceKind, Reply
from fedpal.common.seeding import derive_seed, generator_for
from fedpal.common.tensors import Tensors
from fedpal.config import PrivacyConfig
from fedpal.engine.attack_simulation import PROTOTYPES, update_keys
from fedpal.engine.reduction import MeanReducer
from fedpal.privacy.accountant import PrivacyAccountant
from fedpal.privacy.clipping import AdaptiveClipping, clip_prototypes, clip_reply, effective_noise_multiplier
from fedpal.privacy.gaussian_noise import (
    add_gaussian_noise,
    noise_stddev,
    noised_mean,
    noised_prototype_mean,
    withhold_counts,
)
from fedpal.privacy.secure_aggregation import secure_sum

# Read by the methods only to skip clients without training data: the private mean of updates is uniform and does
# not weigh by it, so it is not listed as released without noise.
NUM_SAMPLES = "num_samples"
SEPARATOR = "\0"  # joins a reply key and a tensor name while the keys are clipped together


class PrivacyRun:
    """The run's clipping bound, this round's norms and the accountant."""

    def __init__(
        self, settings: PrivacyConfig, population: int, seed: int, reads_directly: tuple[str, ...] = ()
    ) -> None:
        self.settings = settings
        self.reads_directly = reads_directly  # the method's reply keys its server uses beyond the reducer
        self.seed = seed
        self.clip_norm = settings.clip
        self.adaptive = (
            AdaptiveClipping(
                population,
                initial_clip_norm=settings.clip,
                target_quantile=settings.target_quantile,
                learning_rate=settings.clip_lr,
            )
            if settings.adaptive_clip
            else None
        )
        # z_Δ for the updates, so that they and adaptive clipping's noised count cost z together (module docstring)
        self.update_noise_multiplier = (
            effective_noise_multiplier(settings.noise_multiplier, self.adaptive.count_stddev)
            if self.adaptive is not None
            else settings.noise_multiplier
        )
        self.accountant = (
            PrivacyAccountant(
                population,
                delta=settings.delta,
                sampling=settings.sampling,
                max_epsilon=settings.max_epsilon or None,
            )
            if settings.noise_multiplier > 0
            else None
        )
        self.norms: list[float] = []
        self.last: dict[str, float] = {}
        self.releases: set[str] = set()  # what was noised this round ("updates", "prototypes"): one mechanism each
        self.releases_per_round = 1  # the last round's count, for predicting the next round's ε
        self.unprotected: set[str] = set()  # reply keys released without noise
        self.secure_aggregation_overhead = 0  # bytes the simulated protocol adds over plain float32 updates

    def clip(self, reply: Reply, payload: Payload) -> Reply:
        """The reply with its update clipped to C (jointly over its update keys) and its prototypes per class."""
        keys = update_keys(reply, payload)
        out = dict(reply)
        if keys:
            joined = {f"{k}{SEPARATOR}{name}": t for k in keys for name, t in reply[k].items()}
            reference = {f"{k}{SEPARATOR}{name}": t for k in keys for name, t in payload[k].items()}
            clipped, norm = clip_reply(joined, self.clip_norm, reference)
            self.norms.append(norm)
            for k in keys:
                out[k] = {name: clipped[f"{k}{SEPARATOR}{name}"] for name in reply[k]}
        if isinstance(reply.get(PROTOTYPES), dict) and reply[PROTOTYPES]:
            out[PROTOTYPES], _ = clip_prototypes(reply[PROTOTYPES], self.prototype_clip)
        if isinstance(reply.get("class_counts"), torch.Tensor):  # a client's label distribution: withheld
            out["class_counts"] = withhold_counts(reply["class_counts"])
        self.unprotected.update(
            k
            for k in reply
            if k in self.reads_directly or (k not in keys and k not in (PROTOTYPES, "class_counts", NUM_SAMPLES))
        )
        return out

    @property
    def prototype_clip(self) -> float:
        """The bound of each class prototype: ``privacy.prototype_clip``, or the update bound when unset."""
        return self.settings.prototype_clip or self.clip_norm

    def generator(self, round: int, call: int) -> torch.Generator:
        return generator_for(self.seed, round, "dp-noise", call)

    def would_stop(self, cohort: int) -> bool:
        """Whether one more round of ``cohort`` clients would pass ``privacy.max_epsilon``."""
        if self.accountant is None or not self.settings.max_epsilon:
            return False
        return self.accountant.would_exceed(
            noise_multiplier=self.settings.noise_multiplier, sample_size=cohort, rounds=self.releases_per_round
        )

    def end_round(self, round: int, sampled: int) -> None:
        """Account the round (its ``sampled`` clients, whether or not their replies arrived), report its clipping,
        and move C (adaptive clipping)."""
        norms, self.norms = self.norms, []
        releases, self.releases = len(self.releases), set()
        if self.accountant is not None and sampled > 0 and releases:
            self.accountant.compose(self.settings.noise_multiplier, sampled, rounds=releases)
            self.releases_per_round = releases
        clipped = sum(1 for n in norms if n > self.clip_norm)
        self.last = {
            "clip": self.clip_norm,
            "clipped_fraction": clipped / len(norms) if norms else float("nan"),
            "mean_norm": sum(norms) / len(norms) if norms else float("nan"),
        }
        if self.adaptive is not None and norms:
            self.clip_norm = self.adaptive.update(norms, generator_for(self.seed, round, "dp-clip-count"))

    def report(self, final: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {**self.last, "noise_multiplier": self.settings.noise_multiplier}
        if self.adaptive is not None:
            out["update_noise_multiplier"] = self.update_noise_multiplier
        if self.accountant is not None:
            out.update(
                epsilon=self.accountant.final_epsilon() if final else self.accountant.epsilon(),
                delta=self.settings.delta,
                rounds=self.accountant.rounds,
                accounting="final (PLD where available)" if final else "RDP",
                sampling=self.settings.sampling,
            )
        else:
            out["epsilon"] = float("inf")  # clipping alone bounds sensitivity but gives no privacy guarantee
        out["accounted"] = "model updates and prototype payloads (per-class sums and holder counts)"
        if self.unprotected:
            out["unprotected_keys"] = sorted(self.unprotected)  # released without noise: not covered by epsilon
        if self.settings.secure_aggregation:
            out["secure_aggregation_overhead_bytes"] = self.secure_aggregation_overhead
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "clip_norm": self.clip_norm,
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "secure_aggregation_overhead": self.secure_aggregation_overhead,
            "releases_per_round": self.releases_per_round,
            "unprotected": sorted(self.unprotected),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clip_norm = float(state["clip_norm"])
        if self.adaptive is not None:
            self.adaptive.load_state_dict({"clip_norm": self.clip_norm})
        if self.accountant is not None and state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])
        self.secure_aggregation_overhead = int(state.get("secure_aggregation_overhead", 0))
        self.releases_per_round = int(state.get("releases_per_round", 1))
        self.unprotected = set(state.get("unprotected", []))


class PrivateReducer(MeanReducer):
    """Uniform mean of clipped updates plus calibrated Gaussian noise (see the module docstring)."""

    streams = False

    def __init__(self, privacy: PrivacyRun) -> None:
        super().__init__()
        self.privacy = privacy
        self.round = 0
        self.calls_this_round = 0

    def start_round(self, round: int) -> None:
        self.round, self.calls_this_round = round, 0

    def __call__(
        self,
        parts: Mapping[int, Tensors],
        weights: Mapping[int, float] | None = None,
        *,
        kind: ReduceKind = "update",
        reference: Tensors | None = None,
    ) -> Tensors:
        if kind != "update":
            self.privacy.unprotected.add(f"({kind} reductions: the plain mean)")
            return super().__call__(parts, weights, kind=kind, reference=reference)
        if not parts:
            raise ValueError("nothing to reduce")
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.calls_this_round += 1
        self.privacy.releases.add("updates")
        deltas = {
            cid: {k: v.double() - reference[k].double() for k, v in part.items()} if reference is not None else part
            for cid, part in parts.items()
        }
        privacy = self.privacy
        generator = privacy.generator(self.round, self.calls_this_round)
        if privacy.settings.secure_aggregation:  # the server learns only the sum, then adds the noise to it
            seed = derive_seed(privacy.seed, "secure-aggregation", self.calls_this_round)
            secured = secure_sum(deltas, seed=seed, round=self.round)
            privacy.secure_aggregation_overhead += secured.cost.overhead_bytes
            std = noise_stddev(privacy.update_noise_multiplier, privacy.clip_norm)
            total = add_gaussian_noise(secured.total, std, generator) if std > 0 else secured.total
            mean = {k: v.double() / len(deltas) for k, v in total.items()}
        else:
            mean, _ = noised_mean(
                deltas,
                noise_multiplier=privacy.update_noise_multiplier,
                clip_norm=privacy.clip_norm,
                generator=generator,
            )
        template = next(iter(parts.values()))
        if reference is None:
            return {k: mean[k].to(template[k].dtype) for k in template}
        return {k: (reference[k].double() + mean[k].double()).to(template[k].dtype) for k in template}

    def prototypes(
        self, uploads: Mapping[int, ClassUpload], weighting: Literal["uniform", "samples"]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class, a noised sum of the clipped prototypes over a noised holder count (without noise: the mean
        over the holders, as without [privacy])."""
        privacy = self.privacy
        if privacy.settings.noise_multiplier == 0:
            return super().prototypes(uploads, weighting)
        self.calls["prototypes"] = self.calls.get("prototypes", 0) + 1
        self.calls_this_round += 1
        privacy.releases.add("prototypes")
        ids = sorted(uploads)
        return noised_prototype_mean(
            torch.stack([uploads[c][0] for c in ids]),
            torch.stack([uploads[c][1] for c in ids]),
            noise_multiplier=privacy.settings.noise_multiplier,
            clip_norm=privacy.prototype_clip,
            generator=privacy.generator(self.round, self.calls_this_round),
        )
