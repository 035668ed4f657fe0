"""FedAMP (Huang et al., AAAI 2021, "Personalized Cross-Silo Federated Learning on Non-IID Data"): attentive
message passing. The server builds for every client i a personalized cloud model u_i that weights the other
clients' models the more the closer they are to w_i; the client trains its own, persistent w_i with a proximal
pull towards u_i.

- Server (``aggregate``, over the models uploaded in the round just finished): for every client i,
  xi_ij = alpha_k * exp(-||w_i - w_j||^2 / sigma) / sigma for each uploader j != i (alpha_k A'(d) with
  A(d) = 1 - exp(-d / sigma)), xi_ii = 1 - sum_j xi_ij, and u_i = sum_j xi_ij w_j, computed through the engine's
  ``reduce`` as a weighted mean with the weights xi_i (they sum to 1; xi_ii < 0 is possible, see below). w_i is the
  server's copy of client i's latest upload, or the initial model for a client that has not uploaded yet (a
  held-out client gets the cloud model of the initial model).
- Client: from its own w_i (never reset to u_i), the run's local epochs on
  f_i(w) + (lambda / (2 alpha_k)) ||w - u_i||^2, whose proximal term has a gradient (lambda / alpha_k)(w - u_i);
  upload w_i. The personalized model is w_i.

xi_ii is negative when the peers' attention exceeds 1, e.g. alpha_k (N - 1) / sigma > 1 with close models; the
paper and PFLlib let it be, and so does fedpal (it logs a warning once). With distant models exp(-d / sigma)
underflows and u_i = w_i. ``docs/methods/apfl_fedamp.md`` lists every choice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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
from fedpal.algorithms.core.registry import register_algorithm
from fedpal.algorithms.core.training import Batch, squared_distance
from fedpal.common.tensors import Tensors, clone_tensors
from fedpal.errors import UserError

log = logging.getLogger(__name__)
FRESH = -1  # the key of a client that holds the initial model (a held-out client) in the cloud reductions


@dataclass(frozen=True)
class FedAMPHyperparameters:
    alpha_k: float = 1.0  # alpha_k: the attention step; xi_ij = alpha_k exp(-d_ij / sigma) / sigma (PFLlib -alk)
    lam: float = 1.0  # lambda: the local objective adds (lambda / (2 alpha_k)) ||w - u_i||^2 (PFLlib -lam)
    sigma: float = 1.0  # sigma of A(d) = 1 - exp(-d / sigma) (PFLlib -sg)
    peers: Literal["last_uploaders", "all"] = "last_uploaders"  # u_i mixes last round's uploads, or every latest model


def flat(params: Tensors) -> torch.Tensor:
    """Every floating-point tensor of a model, flattened into one float64 vector (in key order)."""
    parts = [t.detach().reshape(-1).to(torch.float64) for _, t in sorted(params.items()) if t.is_floating_point()]
    return torch.cat(parts)


def attention_weights(distances: dict[int, float], alpha_k: float, sigma: float) -> tuple[dict[int, float], float]:
    """(xi_ij for each peer j, xi_ii) from the squared distances d_ij = ||w_i - w_j||^2 to the peers."""
    peers = {j: alpha_k * math.exp(-d / sigma) / sigma for j, d in distances.items()}
    return peers, 1.0 - math.fsum(peers.values())


@register_algorithm
class FedAMP(Algorithm):
    name = "fedamp"
    description = "personalized cloud models weighted by model similarity, proximal local training (Huang et al., 2021)"
    reads_replies_directly = ("params",)  # attention weights from each client's model
    Hyperparameters: ClassVar[type] = FedAMPHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        if hp.alpha_k <= 0 or hp.sigma <= 0:
            raise UserError("algorithm.alpha_k and algorithm.sigma must be positive")
        if hp.lam < 0:
            raise UserError(f"algorithm.lam must be >= 0, got {hp.lam}")
        self.num_clients = setup.num_clients
        self.warned_negative_self_weight = False

    # ---- server
    def init_server(self) -> ServerState:
        n, device = self.num_clients, self.setup.device
        return {
            "models": {},  # str(client id) -> its latest upload
            "clouds": {},  # str(client id) -> u_i, for the training clients (after the first aggregation)
            "fresh_cloud": clone_tensors(self.setup.initial_params),  # u of a client holding the initial model
            "self_weights": torch.ones(n, dtype=torch.float64, device=device),  # xi_ii of the latest u_i
        }

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        return {cid: {"cloud": state["clouds"].get(str(cid), state["fresh_cloud"])} for cid in client_ids}

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        if not replies:
            return state
        models = dict(state["models"])
        for cid in sorted(replies):
            models[str(cid)] = replies[cid]["params"]
        pool = sorted(replies) if self.hp.peers == "last_uploaders" else sorted(int(k) for k in models)
        initial = self.setup.initial_params
        vectors = {j: flat(models[str(j)]) for j in pool}
        initial_vector = flat(initial)
        clouds: dict[str, Tensors] = {}
        self_weights = torch.ones(self.num_clients, dtype=torch.float64, device=self.setup.device)
        for i in [*range(self.num_clients), FRESH]:
            own = models.get(str(i), initial)
            own_vector = vectors[i] if i in vectors else (flat(own) if str(i) in models else initial_vector)
            distances = {j: float((own_vector - vectors[j]).square().sum()) for j in pool if j != i}
            xi, xi_self = attention_weights(distances, self.hp.alpha_k, self.hp.sigma)
            if xi_self < 0 and not self.warned_negative_self_weight:
                self.warned_negative_self_weight = True
                log.warning(
                    "FedAMP: a client's self-weight xi_ii = %.3g < 0 (alpha_k = %g, sigma = %g, %d peers): its cloud "
                    "model extrapolates away from its own model (warned once)",
                    xi_self,
                    self.hp.alpha_k,
                    self.hp.sigma,
                    len(distances),
                )
            parts = {j: models[str(j)] for j in distances}
            parts[i] = own
            clouds[str(i)] = reduce(parts, {**xi, i: xi_self}, kind="update", reference=own)
            if i != FRESH:
                self_weights[i] = xi_self
        fresh = clouds.pop(str(FRESH))
        return {"models": models, "clouds": clouds, "fresh_cloud": fresh, "self_weights": self_weights}

    def server_diagnostics(self, server: ServerState) -> dict[str, float]:
        """The clients' self-weights xi_ii in their latest cloud models: 1 means u_i = w_i (no message passing)."""
        weights = server["self_weights"]
        if weights.numel() == 0:
            return {}
        return {"self_weight": float(weights.mean()), "self_weight_min": float(weights.min())}

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        return {"params": client.own_initial_params()}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        cloud = payload["cloud"]
        strength = self.hp.lam / self.hp.alpha_k

        def proximal(batch: Batch) -> torch.Tensor:
            return 0.5 * strength * squared_distance(batch.module, cloud)

        result = client.fit(state["params"], extra_loss=proximal)
        return {"params": result.params}, {"params": result.params, "num_samples": client.num_train}

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        return state["params"]

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {"params": {k: v.shape for k, v in payload["cloud"].items()}, "num_samples": int}
