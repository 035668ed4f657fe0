"""FedAli (Ek, Wang, Portet, Lalanda, Cao, 2024; official code getalp/FedAli): personalised FL with ALP layers.

The model (``hart_alp``) carries, in every block, a local (personal) and a global (shared) prototype bank; see
`fedpal.models.alp`. There is no extra loss term: the regularisation is the forward pass itself.

* Down: the global model's trainable weights and each layer's global bank G. The client sets L := G (or keeps
  its own L with ``persist_local_prototypes``), trains with cross-entropy for the local epochs while every
  training pass mixes tokens with their OT-assigned *global* prototype and EMA-moves L toward the tokens, with
  the influence lam = 0 in the first ``lambda_warmup_rounds`` rounds.
* Up: the trained weights and the local banks L_i.
* Server: sample-weighted FedAvg of the weights; per layer, k-means over all clients' local banks, started from
  their sample-weighted index-aligned mean (so prototype k stays prototype k), gives the new G (and the
  broadcast model's L).
* Personalised model: the client's model right after this round's local training, evaluated in inference mode
  (OT over L only). Global model: the server's weights with L = G = the centroids.
* Diagnostic ``bank_shift``: how far local training moved each client's banks from this round's global ones,
  mean over ALP layers of ||L - G||_F / ||G||_F, averaged over clients with every evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedpal.algorithms.core.contract import (
    Algorithm,
    AlgorithmSetup,
    ClientState,
    ClientView,
    Payload,
    Reduce,
    Reply,
    ServerState,
)
from fedpal.algorithms.core.kmeans import kmeans
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.common.tensors import Tensors, clone_tensors
from fedpal.errors import ConfigError
from fedpal.models.alp import ALPSettings, BankUpdate, MatchMethod

LOCAL, GLOBAL = ".local_bank", ".global_bank"


@dataclass(frozen=True)
class FedAliHyperparameters:
    lam: float = 0.2  # influence factor of the gated prototype in each ALP layer
    lambda_warmup_rounds: int = 1  # rounds run with lam = 0 (banks are still EMA-updated)
    beta: float = 0.999  # local-bank EMA decay
    sinkhorn_eps: float = 0.05
    sinkhorn_iterations: int = 3
    bank_update: BankUpdate = "soft"  # soft (bulk, official pre-trained path) | hard (single update)
    match_method: MatchMethod = "ot"  # ot (Sinkhorn plan) | cosine
    use_glu: bool = True
    persist_local_prototypes: bool = False  # clients keep their own local banks between rounds
    kmeans_max_iter: int = 300
    kmeans_tol: float = 1e-4


def bank_layers(params: Tensors) -> list[str]:
    """Prefixes of the ALP layers in a parameter set (one per block), in name order."""
    return sorted(name[: -len(LOCAL)] for name in params if name.endswith(LOCAL))


def bank_shift(local: Mapping[str, torch.Tensor], global_: Mapping[str, torch.Tensor]) -> float:
    """Mean over ALP layers of ||L - G||_F / ||G||_F: how far a client's personal banks are from the global ones
    (0 when local training left L = G; one pass over the banks, so cheap enough for every round)."""
    ratios = [float((local[p] - global_[p]).norm() / global_[p].norm()) for p in global_]
    return sum(ratios) / len(ratios)


@register_algorithm
class FedAli(Algorithm):
    name = "fedali"
    streamed_reply = ("weights", "num_samples")
    description = "ALP layers: OT alignment to shared/personal prototype banks, server k-means (Ek et al., 2024)"
    Hyperparameters = FedAliHyperparameters
    required_model = "hart_alp"
    # the paper's Adam and batch 64 (lr 1e-3: training from scratch on CPU; the paper's 1e-4 fine-tunes a
    # pre-trained encoder); the run's default SGD 0.01 stalls (macro-F1 0.27 after 4 rounds on HAPT)
    recommended_training: ClassVar[Mapping[str, Any]] = {"optimizer": "adam", "lr": 1e-3, "batch_size": 64}

    def __init__(self, hp: FedAliHyperparameters, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        if not 0.0 <= hp.lam <= 1.0 or not 0.0 <= hp.beta <= 1.0:
            raise ConfigError("config keys 'algorithm.lam' and 'algorithm.beta' must lie in [0, 1]")
        if hp.sinkhorn_eps <= 0 or hp.sinkhorn_iterations < 1 or hp.kmeans_max_iter < 1:
            raise ConfigError("FedAli needs sinkhorn_eps > 0, sinkhorn_iterations >= 1 and kmeans_max_iter >= 1")
        self.layers = bank_layers(setup.initial_params)
        if not self.layers:
            raise ConfigError("algorithm 'fedali' needs a model with ALP layers; set model.name = \"hart_alp\"")

    # ---- helpers
    def lam_for(self, round: int) -> float:
        return 0.0 if round <= self.hp.lambda_warmup_rounds else self.hp.lam

    def alp_options(self, lam: float) -> dict[str, ALPSettings]:
        """The ALP settings of one forward call (they travel with the call; the shared module is never changed)."""
        hp = self.hp
        settings = ALPSettings(
            lam=lam,
            beta=hp.beta,
            eps=hp.sinkhorn_eps,
            iterations=hp.sinkhorn_iterations,
            bank_update=hp.bank_update,
            match_method=hp.match_method,
            use_glu=hp.use_glu,
        )
        return {"alp": settings}

    def weights_of(self, params: Tensors) -> Tensors:
        """Everything but the banks: what FedAvg averages."""
        return {k: v for k, v in params.items() if not k.endswith((LOCAL, GLOBAL))}

    def model_with_banks(self, weights: Tensors, local: Tensors, global_: Tensors) -> Tensors:
        banks = {f"{p}{LOCAL}": local[p] for p in self.layers} | {f"{p}{GLOBAL}": global_[p] for p in self.layers}
        return {**weights, **banks}

    # ---- server
    def init_server(self) -> ServerState:
        params = self.setup.initial_params
        # The initial (or pre-trained) local bank seeds G, as the server broadcasts L = G every round.
        banks = {p: params[f"{p}{LOCAL}"].clone() for p in self.layers}
        return {"weights": clone_tensors(self.weights_of(params)), "banks": banks, "lam": 0.0, "kmeans": {}}

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        payload = {"weights": state["weights"], "global_banks": state["banks"]}
        return {cid: payload for cid in client_ids}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        usable = {cid: r for cid, r in sorted(replies.items()) if r["num_samples"] > 0}
        if not usable:
            return state
        sizes = {cid: float(r["num_samples"]) for cid, r in usable.items()}
        weights = reduce({cid: r["weights"] for cid, r in usable.items()}, sizes, reference=state["weights"])
        banks: dict[str, torch.Tensor] = {}
        stats: dict[str, float] = {"iterations": 0.0, "relocated": 0.0, "shift": 0.0}
        for p in self.layers:
            # k-means needs every client's bank (explicitly); its start is their index-aligned mean (reduced).
            layer_banks = {cid: {p: r["local_banks"][p]} for cid, r in usable.items()}
            init = reduce(layer_banks, sizes, kind="statistic")[p]
            result = kmeans(
                torch.cat([bank[p] for bank in layer_banks.values()]), init, self.hp.kmeans_max_iter, self.hp.kmeans_tol
            )
            banks[p] = result.centres
            stats["iterations"] += result.iterations / len(self.layers)
            stats["relocated"] += result.relocated
            old = state["banks"][p]
            stats["shift"] += float((result.centres - old).norm(dim=1).mean() / old.norm(dim=1).mean()) / len(
                self.layers
            )
        return {**state, "weights": weights, "banks": banks, "lam": self.lam_for(round), "kmeans": stats}

    # ---- client
    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        global_banks = payload["global_banks"]
        own = state.get("model") if self.hp.persist_local_prototypes else None
        local = {p: own[f"{p}{LOCAL}"] for p in self.layers} if own is not None else global_banks
        lam = self.lam_for(client.round)
        start = self.model_with_banks(payload["weights"], local, global_banks)
        result = client.fit(start, forward_options=self.alp_options(lam))
        local_banks = {p: result.params[f"{p}{LOCAL}"] for p in self.layers}
        reply = {"weights": self.weights_of(result.params), "local_banks": local_banks, "num_samples": client.num_train}
        return {"model": result.params, "lam": lam, "bank_shift": bank_shift(local_banks, global_banks)}, reply

    # ---- evaluation
    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        """The latest round's influence factor, and the global model for a client that has not trained yet."""
        payload = {"weights": state["weights"], "global_banks": state["banks"], "lam": float(state["lam"])}
        return {cid: payload for cid in client_ids}

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        if "model" in state:
            return state["model"]
        return self.model_with_banks(payload["weights"], payload["global_banks"], payload["global_banks"])

    def global_params(self, server: ServerState) -> Tensors | None:
        return self.model_with_banks(server["weights"], server["banks"], server["banks"])

    def predict_scores(
        self, client: ClientView, state: ClientState, payload: Payload, params: Tensors, x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Inference mode: the plan runs over the local bank only, with the latest round's influence factor."""
        lam = float(payload.get("lam", self.hp.lam))
        return {"model": client.trainer.predict(params, x, forward_options=self.alp_options(lam))}

    def server_diagnostics(self, server: ServerState) -> dict[str, float]:
        stats = server.get("kmeans") or {}
        return {f"kmeans_{k}": float(v) for k, v in stats.items()}

    def client_diagnostics(self, state: ClientState) -> dict[str, float]:
        """The bank movement of the client's latest local training (with partial participation, possibly an
        older round's)."""
        return {"bank_shift": float(state["bank_shift"])} if "bank_shift" in state else {}

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {
            "weights": {k: v.shape for k, v in payload["weights"].items()},
            "local_banks": {k: v.shape for k, v in payload["global_banks"].items()},
            "num_samples": int,
        }
