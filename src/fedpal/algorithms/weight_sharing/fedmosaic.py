"""FedMosaic (Seo et al., 2025, arXiv 2506.11024; official code snumprlab/fedmosaic): relevance-guided aggregation
(RELA) of dual adapters whose Co-LoRA parts have one shape in every architecture.

Per round (specs/fedmosaic.md §2-§4):

* the server, from a snapshot of every client's **latest** lora2 and task signature g taken at the round's start
  (so client order within a round does not matter), builds each client its own global adapter lora1: Co-LoRA P, Q
  at matched block indices from all other clients whatever their architecture, weighted by omega_ij =
  softmax_j(S_ij / tau) with S the column-wise cosine similarity of the signatures and the client itself excluded;
  the other adapters (LoRA A, B) from same-architecture clients only (omega^homo). A client without signatures yet
  (the first round) shares nothing: its lora1 is its own lora2;
* the client loads lora1 (frozen), trains lora2 and its gate for ``local_steps`` AdamW steps on its replay store
  (`AdapterMethod`), and computes its task signature on the shared frozen **reference** model (the run's smallest
  trunk, adapters off) at the last example of every ``signature_every``-th step's batch: the analytic last-layer
  gradient, 40 % of its rows kept, N(0, 1e-4²) noise, then g ← ½(mean of the round's signatures + previous g);
* it uploads lora2 and g (both counted in bytes up; the gate never leaves the client); the server stores them.

The personalized model is the saved state (lora1 as loaded, trained lora2, gate) run gated, gate deterministic.

Ablations (hyperparameters): ``relevance = "uniform"`` (no RELA: equal weights over the other clients),
``cross_architecture = false`` (no Co-LoRA sharing across architectures: P, Q weighted like A, B), and
``model.adapter_init = "random"`` (the larger trunk's A, B not aligned). ``docs/methods/fedmosaic.md`` lists the
defaults and every choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from fedpal.algorithms.core.contract import (
    AlgorithmSetup,
    ClientState,
    ClientView,
    Payload,
    Reduce,
    Reply,
    ServerState,
)
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.relevance import (
    analytic_signature,
    autograd_signature,
    first_round_global,
    global_adapter_for,
    relevance_similarity,
    relevance_weights,
    running_signature,
    sanitize,
)
from fedpal.algorithms.weight_sharing.adapter_method import AdapterHyperparameters, AdapterMethod
from fedpal.common.tensors import Tensors
from fedpal.errors import ConfigError
from fedpal.models.adapted_trunk import trunk_size_key
from fedpal.models.adapters import AdapterPart
from fedpal.models.base import SplitModel
from fedpal.models.families import architecture_of


@dataclass(frozen=True)
class FedMosaicHyperparameters(AdapterHyperparameters):
    tau: float = 0.5  # temperature of the relevance softmax (official softmax_temp)
    signature_every: int = 10  # a signature at every this-many-th step (official grad_freq)
    signature_ratio: float = 0.4  # share of the signature's rows sent (official gradient_ratio)
    signature_noise: float = 1e-4  # std of the Gaussian noise on the sent signature
    signature: Literal["analytic", "autograd"] = "analytic"  # official analytic gradient, or the exact one
    # "raw": the examples' signatures averaged as they are (official); "unit": each scaled to unit norm first, so
    # one misclassified example cannot outweigh the rest (see docs/methods/fedmosaic.md)
    signature_scale: Literal["raw", "unit"] = "raw"
    relevance: Literal["rela", "uniform"] = "rela"  # ablation: uniform weights over the other clients
    cross_architecture: bool = True  # ablation: False keeps Co-LoRA P, Q within an architecture
    # "use_latest": every client's latest upload, however old (official); "skip": only the clients that uploaded in
    # the previous round (with partial participation the others are left out of everyone's lora1)
    stale_states: Literal["use_latest", "skip"] = "use_latest"


@register_algorithm
class FedMosaic(AdapterMethod):
    name = "fedmosaic"
    description = "relevance-weighted dual adapters, Co-LoRA P/Q shared across architectures (Seo et al., 2025)"
    reads_replies_directly = ("lora2", "signature")  # each client's adapter and signature are kept
    Hyperparameters: ClassVar[type] = FedMosaicHyperparameters
    mixing = "gated"

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        if hp.tau <= 0 or hp.signature_every < 1 or not 0 < hp.signature_ratio <= 1 or hp.signature_noise < 0:
            raise ConfigError(
                "algorithm.tau must be > 0, signature_every >= 1, signature_ratio in (0, 1], signature_noise >= 0"
            )
        super().__init__(hp, setup)
        self._reference: SplitModel | None = None

    # ---- server
    def init_server(self) -> ServerState:
        return {"lora2": {}, "signature": {}, "updated": {}}

    def architecture(self, cid: int) -> str:
        return architecture_of(cid, self.setup.architectures)

    def weights(
        self, state: ServerState, known: list[int], similarity: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(omega, omega^homo) over the clients ``known`` to the server, in that order (``similarity``: their S,
        when the caller has it already)."""
        if self.hp.relevance == "uniform":
            similarity = torch.zeros(len(known), len(known), dtype=torch.float64, device=self.setup.device)
        elif similarity is None:
            similarity = relevance_similarity([state["signature"][str(c)] for c in known])
        architectures = [self.architecture(c) for c in known]
        homo = relevance_weights(similarity, self.hp.tau, architectures)
        omega = relevance_weights(similarity, self.hp.tau) if self.hp.cross_architecture else homo
        return omega, homo

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        known = sorted(int(c) for c in state["signature"])
        if len(known) < 2:
            return {cid: {} for cid in client_ids}
        if self.hp.stale_states == "skip":
            return self.configure_fresh(state, round, client_ids, known)
        omega, homo = self.weights(state, known)
        lora2 = [state["lora2"][str(c)] for c in known]
        architectures = [self.architecture(c) for c in known]
        payloads: dict[int, Payload] = {}
        for cid in client_ids:
            if cid not in known:  # never trained: nothing of its own on the server, so it shares nothing yet
                payloads[cid] = {}
                continue
            i = known.index(cid)
            payloads[cid] = {"lora1": global_adapter_for(i, lora2, architectures, omega, homo)}
        return payloads

    def configure_fresh(
        self, state: ServerState, round: int, client_ids: list[int], known: list[int]
    ) -> dict[int, Payload]:
        """``stale_states = "skip"``: each client's lora1 from the peers that uploaded in the previous round only
        (the client itself stays in the weighting, where it is excluded anyway)."""
        fresh = {c for c in known if state["updated"].get(str(c)) == round - 1}
        payloads: dict[int, Payload] = {}
        for cid in client_ids:
            peers = [c for c in known if c in fresh or c == cid]
            if cid not in known or len(peers) < 2:
                payloads[cid] = {}
                continue
            omega, homo = self.weights(state, peers)
            lora2 = [state["lora2"][str(c)] for c in peers]
            architectures = [self.architecture(c) for c in peers]
            payloads[cid] = {"lora1": global_adapter_for(peers.index(cid), lora2, architectures, omega, homo)}
        return payloads

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        """No averaging: the server keeps every client's latest lora2 and signature (clients absent this round
        keep theirs)."""
        lora2, signature = dict(state["lora2"]), dict(state["signature"])
        updated = dict(state.get("updated", {}))  # client -> the round of its latest upload
        for cid, reply in sorted(replies.items()):
            lora2[str(cid)] = reply["lora2"]
            updated[str(cid)] = round
            if "signature" in reply:
                signature[str(cid)] = reply["signature"]
        return {"lora2": lora2, "signature": signature, "updated": updated}

    def server_matrices(self, state: ServerState) -> dict[str, torch.Tensor]:
        """The relevance S and the weights omega between the clients known so far (for the report's heatmap)."""
        known = sorted(int(c) for c in state["signature"])
        if len(known) != self.setup.num_clients or len(known) < 2:
            return {}
        similarity = relevance_similarity([state["signature"][str(c)] for c in known])
        omega, _ = self.weights(state, known, similarity)
        return {"relevance": similarity, "weights": omega}

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {} for cid in client_ids}  # the client's state holds the lora1 it loaded

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        lora2 = self.initial_part(client, "lora2")
        return {"lora2": lora2, "lora1": first_round_global(lora2), "gate": self.initial_part(client, "gate")}

    def reference(self, client: ClientView) -> SplitModel:
        """The shared frozen reference: the run's smallest trunk at its initial (pre-trained) tensors, built once
        per process; the signature functions switch its adapters off whenever they read it."""
        if self._reference is None:
            build = self.setup.build_module
            if build is None:
                raise ConfigError("fedmosaic needs the engine's module builder for its reference model")
            modules = {name: build(name) for name in dict.fromkeys(self.setup.architectures)}
            name = min(modules, key=lambda n: (trunk_size_key(modules[n]), n))
            module = modules[name]
            start = self.setup.architecture_params[name]
            with torch.no_grad():
                for key, parameter in {**dict(module.named_parameters()), **dict(module.named_buffers())}.items():
                    parameter.copy_(start[key])
            module.requires_grad_(False)
            module.eval()
            assert isinstance(module, SplitModel)
            self._reference = module
        return self._reference

    def signature_of(
        self, client: ClientView, batches: list[torch.Tensor], previous: torch.Tensor | None
    ) -> torch.Tensor:
        """g_i after this round: the mean of the sanitized signatures at the sampled examples, ½-averaged with the
        previous g_i (the signature functions switch the reference's adapters off themselves)."""
        reference = self.reference(client)
        compute = analytic_signature if self.hp.signature == "analytic" else autograd_signature
        every = self.hp.signature_every
        # the last example of every ``every``-th step's batch (of the last batch when there are fewer steps)
        samples = [idx[-1:] for step, idx in enumerate(batches, start=1) if step % every == 0] or [batches[-1][-1:]]
        generator = client.generator("signature")
        raw = [compute(reference, client.train_x[i], client.train_y[i]) for i in samples]
        if self.hp.signature_scale == "unit":
            raw = [g / g.norm().clamp_min(torch.finfo(g.dtype).tiny) for g in raw]
        signatures = [
            sanitize(g, generator, ratio=self.hp.signature_ratio, noise_std=self.hp.signature_noise) for g in raw
        ]
        mean = torch.stack(signatures).mean(dim=0)
        return running_signature(previous, mean)

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        lora1 = dict(payload["lora1"]) if "lora1" in payload else first_round_global(state["lora2"])
        parts: dict[AdapterPart, Tensors] = {"lora1": lora1, "lora2": state["lora2"], "gate": state["gate"]}
        batches, replay = self.replay_batches(client, state)
        done = self.train_adapters(client, parts, state.get("adam", {}), batches=batches)
        if not done.batches:  # no training data this round: nothing learnt, no new signature
            return {**state, "lora1": lora1}, {"lora2": state["lora2"]}
        signature = self.signature_of(client, done.batches, state.get("signature"))
        new_state = {
            "lora1": lora1,
            "lora2": done.lora2,
            "gate": done.gate,
            "adam": done.adam,
            "signature": signature,
            **replay,
        }
        return new_state, {"lora2": done.lora2, "signature": signature}
