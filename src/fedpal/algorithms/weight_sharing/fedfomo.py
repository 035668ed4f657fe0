"""FedFomo (Zhang et al., ICLR 2021): each client combines other clients' models, each weighted by a first-order
estimate of how much moving toward it lowers the client's validation loss per unit of parameter distance, and an
affinity matrix built from those weights decides whose models it downloads next (epsilon-greedy).

Defaults follow the official code (NVlabs/FedFomo; ``docs/methods/fedfomo.md`` lists every choice and option):

- weights w_n = (L_val(theta_prev) - L_val(phi_n)) / ||phi_n - theta_prev||_1 over the trainable parameters, where
  theta_prev is the client's model before its last local training ("first model") and the candidates are its own
  latest trained model, M - 1 peers and, with ``n_subfederations``, one model per spectral cluster of the affinity
  matrix and their mean; a candidate at distance 0 gets weight 0;
- affinity p_i[n] += w_n / |sum of all w| for the individual clients among the candidates (own entry included);
- theta = sum of clamped, normalised weights times the candidates, over the whole state; with no positive weight
  the client keeps theta_prev (its own local training is dropped);
- then E local epochs from theta at lr max(min_lr, lr * lr_decay^t), t = round - 1; upload the trained model;
- peers: last round's uploaders except itself; each of the M - 1 slots explores (a random pool member) with
  probability epsilon_0 - delta * t, otherwise takes the next by affinity; p_i starts at 0 with p_i[i] = 0.1.

fedpal's round r is the official round r - 1: in round 1 nobody has uploaded yet, so clients train from the initial
model without a federated update (the official round 0). The personalized model is the post-update theta
(``eval_point = "post_update"``) or the latest trained model (``"round_start"``, PFLlib's convention). PFLlib's
variant is a set of options (``configs/fedfomo_pfllib.toml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

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
from fedpal.common.seeding import derive_seed
from fedpal.common.tensors import Tensors
from fedpal.errors import UserError

DistanceNorm = Literal["l1", "l2_squared", "l2_per_tensor_sum", "l2", "none"]
TINY_SUM = 1e-9  # the affinity denominator gets this added when the weights' sum is smaller (official code)
PFLLIB_NORM_EPS = 1e-5  # PFLlib adds this to the Euclidean norm


@dataclass(frozen=True)
class FedFomoHyperparameters:
    num_models: int = 5  # M: models a client combines, itself included (M - 1 downloaded peers)
    epsilon: float = 0.3  # epsilon_0 of the exploration schedule epsilon_t = epsilon_0 - delta * t
    epsilon_decay: float = 0.05  # delta
    self_affinity: float = 0.1  # p_i[i] at the start (PFLlib: 1.0, its identity matrix)
    distance_norm: DistanceNorm = "l1"  # l2 = PFLlib (Euclidean + 1e-5); none drops the denominator
    affinity_increment: Literal["normalized", "raw"] = "normalized"  # raw = PFLlib (w itself)
    fallback: Literal["previous", "local"] = "previous"  # no positive weight: keep theta_prev, or own local model
    candidate_pool: Literal["last_uploaders", "all"] = "last_uploaders"  # all: every client that ever uploaded
    combine: Literal["state_dict", "parameters"] = "state_dict"  # parameters: buffers stay theta_prev's
    n_subfederations: int = 5  # spectral clusters of the affinity matrix, each a FedAvg model, plus their mean
    softmax_affinities: bool = True  # cluster on row-softmax(P) (README runs); False: exp(-(1 - P)^2 / 2)
    lr_decay: float = 0.99  # the local lr of round t is max(min_lr, lr * lr_decay^t)
    min_lr: float = 1e-4
    eval_point: Literal["post_update", "round_start"] = "post_update"


def parameter_distance(a: Tensors, b: Tensors, names: list[str], norm: DistanceNorm) -> float:
    """||a - b|| over the named (trainable) tensors, in float64."""
    if norm == "none":
        return 1.0
    diffs = [(a[k].detach().double() - b[k].detach().double()).flatten() for k in names]
    if norm == "l1":
        return float(sum(d.abs().sum() for d in diffs))
    squares = [float(d.square().sum()) for d in diffs]
    if norm == "l2_squared":
        return float(sum(squares))
    if norm == "l2_per_tensor_sum":
        return float(sum(np.sqrt(squares)))
    return float(np.sqrt(sum(squares))) + PFLLIB_NORM_EPS


def first_order_weights(loss_prev: float, losses: list[float], distances: list[float]) -> list[float]:
    """w_n = (L(theta_prev) - L(phi_n)) / d_n; 0 for a candidate at distance 0 (the official code divides by 0)."""
    return [(loss_prev - loss) / d if d > 0 else 0.0 for loss, d in zip(losses, distances, strict=True)]


def affinity_increments(weights: list[float], mode: str) -> list[float]:
    """What each candidate adds to the client's affinity row: w / |sum of every w| (official) or w (PFLlib)."""
    if mode == "raw":
        return list(weights)
    total = abs(sum(weights))
    if total < TINY_SUM:
        total += TINY_SUM
    return [w / total for w in weights]


def convex_combination(candidates: list[Tensors], weights: list[float], keys: list[str]) -> Tensors:
    """sum_n w_n * phi_n over ``keys`` (weights already clamped and normalised), accumulated in float64."""
    out: Tensors = {}
    for k in keys:
        acc = torch.zeros(candidates[0][k].shape, dtype=torch.float64, device=candidates[0][k].device)
        for params, w in zip(candidates, weights, strict=True):
            if w > 0:
                acc.add_(params[k].detach().double(), alpha=w)
        out[k] = acc.to(candidates[0][k].dtype)
    return out


def exploration_rate(hp: FedFomoHyperparameters, t: int) -> float:
    return max(0.0, hp.epsilon - hp.epsilon_decay * t)


def choose_peers(row: np.ndarray, pool: list[int], count: int, epsilon: float, rng: np.random.Generator) -> list[int]:
    """Epsilon-greedy: for each slot, with probability epsilon the next client of a random permutation of the pool,
    otherwise the next by affinity (ties broken at random); clients already chosen are skipped."""
    count = min(count, len(pool))
    explore = iter([pool[i] for i in rng.permutation(len(pool))])
    tiebreak = rng.random(len(pool))
    exploit = iter([pool[i] for i in np.lexsort((tiebreak, -row[pool]))])
    chosen: list[int] = []
    while len(chosen) < count:
        source = explore if rng.random() < epsilon else exploit
        chosen.append(next(c for c in source if c not in chosen))
    return chosen


def cluster_labels(affinity: np.ndarray, clusters: int, softmax: bool, seed: int) -> np.ndarray:
    """Spectral clustering (scikit-learn) of the symmetrised client affinities."""
    try:
        from sklearn.cluster import SpectralClustering
    except ImportError as exc:  # an optional dependency
        raise UserError(
            "FedFomo's sub-federations (algorithm.n_subfederations > 0) need scikit-learn: "
            "pip install 'fedpal[cluster]', or set algorithm.n_subfederations = 0"
        ) from exc
    if softmax:
        shifted = np.exp(affinity - affinity.max(axis=1, keepdims=True))
        similarity = shifted / shifted.sum(axis=1, keepdims=True)
    else:
        similarity = np.exp(-((1.0 - affinity) ** 2) / 2.0)
    similarity = (similarity + similarity.T) / 2.0
    model = SpectralClustering(
        n_clusters=clusters, affinity="precomputed", n_init=10, assign_labels="discretize", random_state=seed % 2**32
    )
    return np.asarray(model.fit_predict(similarity), dtype=np.int64)


@register_algorithm
class FedFomo(Algorithm):
    name = "fedfomo"
    description = "first-order model weighting with affinity-guided downloads (Zhang et al., 2021)"
    reads_replies_directly = ("params",)  # each client's model is kept and weighed per client
    Hyperparameters: ClassVar[type] = FedFomoHyperparameters
    # the official code's SGD 0.1, weight decay 1e-4, batch 50
    recommended_training: ClassVar[Mapping[str, Any]] = {
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 1e-4,
        "batch_size": 50,
    }

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        if hp.num_models < 1:
            raise UserError("algorithm.num_models must be at least 1 (the client itself)")
        if hp.n_subfederations < 0 or hp.n_subfederations == 1:
            raise UserError("algorithm.n_subfederations must be 0 (none) or at least 2")
        self.num_clients = setup.num_clients

    # ---- server
    def init_server(self) -> ServerState:
        n, device = self.num_clients, self.setup.device
        affinity = torch.zeros(n, n, dtype=torch.float64, device=device)
        affinity.fill_diagonal_(self.hp.self_affinity)
        return {
            "models": {},  # str(client id) -> its latest uploaded model
            "affinity": affinity,  # P: row i is client i's affinity to every client
            "last_uploaders": torch.zeros(0, dtype=torch.int64, device=device),
            "extras": {},  # "subfederation_k" and "global" models, when n_subfederations > 0
            "clusters": torch.full((n,), -1, dtype=torch.int64, device=device),
        }

    def pool_of(self, state: ServerState, cid: int) -> list[int]:
        if self.hp.candidate_pool == "all":
            ids = sorted(int(k) for k in state["models"])
        else:
            ids = [int(c) for c in state["last_uploaders"].tolist()]
        return [c for c in ids if c != cid]

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        t = round - 1  # the official round index
        epsilon = exploration_rate(self.hp, t)
        payloads: dict[int, Payload] = {}
        for cid in client_ids:
            pool = self.pool_of(state, cid)
            row = (
                state["affinity"][cid].cpu().numpy()
                if cid < self.num_clients
                else np.zeros(self.num_clients)  # a held-out client has no affinities yet
            )
            rng = np.random.default_rng(derive_seed(self.setup.seed, round, cid, "fedfomo-peers"))
            peers = choose_peers(row, pool, self.hp.num_models - 1, epsilon, rng)
            payloads[cid] = {
                "peers": {str(p): state["models"][str(p)] for p in peers},
                "extras": dict(state["extras"]),
            }
        return payloads

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        models = dict(state["models"])
        affinity = state["affinity"].clone()
        for cid, reply in sorted(replies.items()):
            models[str(cid)] = reply["params"]
            if cid < self.num_clients:
                ids = reply["candidate_ids"]
                increments = reply["affinity_increments"].to(affinity.dtype)
                affinity[cid].index_add_(0, ids.to(affinity.device), increments.to(affinity.device))
        uploaders = torch.tensor(sorted(replies), dtype=torch.int64, device=affinity.device)
        extras, clusters = self.subfederations(affinity, replies, reduce, round)
        return {
            "models": models,
            "affinity": affinity,
            "last_uploaders": uploaders,
            "extras": extras if extras is not None else state["extras"],
            "clusters": clusters if clusters is not None else state["clusters"],
        }

    def subfederations(
        self, affinity: torch.Tensor, replies: dict[int, Reply], reduce: Reduce, round: int
    ) -> tuple[dict[str, Tensors] | None, torch.Tensor | None]:
        """One FedAvg model per spectral cluster over its members active this round, and their uniform mean."""
        k = self.hp.n_subfederations
        if k == 0 or not replies or self.num_clients < k:
            return None, None
        labels = cluster_labels(
            affinity.cpu().numpy(),
            k,
            self.hp.softmax_affinities,
            derive_seed(self.setup.seed, round, "fedfomo-clusters"),
        )
        extras: dict[str, Tensors] = {}
        for cluster in range(k):
            members = [c for c in sorted(replies) if c < self.num_clients and labels[c] == cluster]
            if members:
                weights = {c: float(replies[c]["num_samples"]) for c in members}
                extras[f"subfederation_{cluster}"] = reduce({c: replies[c]["params"] for c in members}, weights)
        cluster_models = dict(enumerate(extras.values()))
        extras["global"] = reduce(cluster_models, None)
        return extras, torch.from_numpy(labels).to(affinity.device)

    def global_params(self, server: ServerState) -> Tensors | None:
        return server["extras"].get("global")

    def server_diagnostics(self, server: ServerState) -> dict[str, float]:
        """The spread of the learned affinities: mean diagonal and mean off-diagonal entry."""
        p = server["affinity"]
        n = p.shape[0]
        if n < 2:
            return {}
        off = (p.sum() - p.diagonal().sum()) / (n * (n - 1))
        return {"affinity_self": float(p.diagonal().mean()), "affinity_others": float(off)}

    def server_matrices(self, server: ServerState) -> dict[str, torch.Tensor]:
        return {"affinity": server["affinity"]}

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        return {"first": client.own_initial_params()}

    def validation_loss(self, client: ClientView, params: Tensors) -> float:
        """Mean cross-entropy on the client's validation split (its training split if it has none), in eval mode
        under inference mode with the evaluation batch size."""
        x, y = (client.val_x, client.val_y) if client.val_y.numel() else (client.train_x, client.train_y)
        logits = client.trainer.predict(params, x)
        return float(F.cross_entropy(logits.double(), y, reduction="mean"))

    def federated_update(
        self, client: ClientView, state: ClientState, payload: Payload
    ) -> tuple[Tensors, list[int], list[float]]:
        """theta_t from theta_prev and the candidates, and the affinity increments of the individual clients."""
        previous = state["first"]
        own = state.get("local")
        individuals = ([client.id] if own is not None else []) + [int(p) for p in payload["peers"]]
        models = ([own] if own is not None else []) + list(payload["peers"].values())
        candidates = models + list(payload["extras"].values())
        if not candidates:
            return previous, [], []
        names = [name for name, _ in client.trainer.module.named_parameters()]
        loss_prev = self.validation_loss(client, previous)
        losses = [self.validation_loss(client, phi) for phi in candidates]
        distances = [parameter_distance(phi, previous, names, self.hp.distance_norm) for phi in candidates]
        weights = first_order_weights(loss_prev, losses, distances)
        increments = affinity_increments(weights, self.hp.affinity_increment)[: len(models)]
        positive = [max(w, 0.0) for w in weights]
        total = sum(positive)
        if total <= 0:
            fallback = own if self.hp.fallback == "local" and own is not None else previous
            return fallback, individuals, increments
        keys = list(previous) if self.hp.combine == "state_dict" else names
        theta = {**previous, **convex_combination(candidates, [w / total for w in positive], keys)}
        return theta, individuals, increments

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        theta, individuals, increments = self.federated_update(client, state, payload)
        t = client.round - 1
        lr = max(self.hp.min_lr, client.settings.lr * self.hp.lr_decay**t)
        result = client.fit(theta, lr=lr)
        new_state: ClientState = {"first": theta, "local": result.params}
        reply: Reply = {
            "params": result.params,
            "candidate_ids": torch.tensor(individuals, dtype=torch.int64, device=client.device),
            "affinity_increments": torch.tensor(increments, dtype=torch.float64, device=client.device),
            "num_samples": client.num_train,
        }
        return new_state, reply

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        if self.hp.eval_point == "round_start" and "local" in state:
            return state["local"]
        return state["first"]

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {"num_samples": int}
