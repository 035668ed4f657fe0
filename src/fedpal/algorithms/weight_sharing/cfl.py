"""CFL, clustered federated learning (Sattler, Mueller and Samek, IEEE TNNLS 2020, arXiv 1910.01991): FedAvg inside
clusters of clients; a cluster whose joint objective has reached a stationary point (small mean update) while some
of its clients still move far (large individual updates) is split in two by the cosine similarity of the updates.

Defaults follow the official code (felisat/clustered-federated-learning, ``fl_devices.py`` and its notebook):

- a client trains its cluster's model theta_c for E epochs (the n-th local update at lr * lr_decay^n, momentum
  buffers kept between rounds when the run's SGD has momentum) and uploads Delta_i = theta' - theta_c;
- for each cluster, over its members that replied this round: if round > split_after_round, at least
  min_cluster_size_to_split members replied, ||mean Delta|| < eps1 and max ||Delta_i|| > eps2, the members are cut in
  two by complete-linkage agglomerative clustering of the pairwise cosine similarities (scikit-learn); each part
  (or the whole cluster) then moves by the unweighted mean of its members' updates, taken by the engine's ``reduce``;
- the personalized model is the client's cluster model.

Membership is a tensor of cluster ids per training client; models are ``cluster_k``. Of a split cluster, the part
holding the lowest client id keeps the id (and the members that did not reply this round), the other part gets the
next id. A held-out client evaluates every cluster model on its training split and keeps the one of lowest loss.
eps1 and eps2 are absolute norms: they depend on the model's size, the learning rate and E, so re-tune them for
each setting (``docs/methods/fedavgm_cfl.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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
from fedpal.algorithms.core.training import LocalTrainer, OptimizerFactory
from fedpal.common.tensors import Tensors, clone_tensors
from fedpal.errors import UserError

COSINE_EPS = 1e-12  # added to the product of norms in the cosine similarity (official code)


@dataclass(frozen=True)
class CFLHyperparameters:
    eps1: float = 0.4  # split only while ||mean update|| of the cluster is below this (absolute: re-tune per setting)
    eps2: float = 1.6  # ... and the largest client update norm is above this (absolute: re-tune per setting)
    split_after_round: int = 20  # no split in rounds 1..split_after_round (official: 20)
    min_cluster_size_to_split: int = 3  # members that replied this round needed for a split (official: |c| > 2)
    lr_decay: float = 0.99  # a client's n-th local update runs at lr * lr_decay^n (official: 0.99); 1 = off
    keep_momentum: bool = True  # SGD momentum buffers persist across a client's rounds (official); False: fresh


def flat(update: Tensors) -> torch.Tensor:
    """One float64 vector of a parameter set (in the set's key order)."""
    return torch.cat([v.detach().to(torch.float64).flatten() for v in update.values()])


def norm(update: Tensors) -> float:
    return float(torch.linalg.vector_norm(flat(update)))


def cosine_similarities(updates: list[Tensors]) -> np.ndarray:
    """S[i, j] = <d_i, d_j> / (||d_i|| ||d_j|| + 1e-12), in float64."""
    vectors = torch.stack([flat(u) for u in updates])
    norms = torch.linalg.vector_norm(vectors, dim=1)
    similarity = (vectors @ vectors.T) / (norms[:, None] * norms[None, :] + COSINE_EPS)
    return similarity.cpu().numpy()


def bipartition(similarity: np.ndarray) -> np.ndarray:
    """Labels 0/1 of complete-linkage agglomerative clustering into two on the distances 1 - S.

    The official code passes -S; complete linkage compares distances only with each other, so adding 1 to every
    one changes no merge and gives the same partition, with distances that are non-negative."""
    try:
        from sklearn.cluster import AgglomerativeClustering
    except ImportError as exc:  # an optional dependency
        raise UserError("CFL splits clusters with scikit-learn: pip install 'fedpal[cluster]'") from exc
    distances = np.clip(1.0 - similarity, 0.0, None)
    np.fill_diagonal(distances, 0.0)
    model = AgglomerativeClustering(n_clusters=2, metric="precomputed", linkage="complete")
    return np.asarray(model.fit_predict(distances), dtype=np.int64)


def restoring_momentum(trainer: LocalTrainer, lr: float, names: list[str], buffers: Tensors) -> OptimizerFactory:
    """The run's SGD at ``lr`` with the momentum buffers a client kept from its previous local update."""

    def make(parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        optimizer = trainer.make_optimizer(lr, parameters)
        for name, parameter in zip(names, parameters, strict=True):
            optimizer.state[parameter]["momentum_buffer"] = buffers[name].clone()
        return optimizer

    return make


def cluster_key(cluster: int) -> str:
    return f"cluster_{cluster}"


@register_algorithm
class CFL(Algorithm):
    name = "cfl"
    description = "clustered FL: FedAvg per cluster, bipartition by update cosine similarity (Sattler et al., 2020)"
    reads_replies_directly = ("update",)  # clusters from the cosine similarity of each client's update
    Hyperparameters: ClassVar[type] = CFLHyperparameters

    def __init__(self, hp: Any, setup: AlgorithmSetup) -> None:
        super().__init__(hp, setup)
        if hp.min_cluster_size_to_split < 2:
            raise UserError("algorithm.min_cluster_size_to_split must be at least 2 (a split needs two parts)")
        if hp.lr_decay <= 0:
            raise UserError(f"algorithm.lr_decay must be positive, got {hp.lr_decay}")
        self.num_clients = setup.num_clients

    # ---- server
    def init_server(self) -> ServerState:
        device = self.setup.device
        return {
            "membership": torch.zeros(self.num_clients, dtype=torch.int64, device=device),  # cluster id per client
            "models": {cluster_key(0): clone_tensors(self.setup.initial_params)},
            "mean_update_norm": float("nan"),  # largest ||mean update|| over last round's clusters
            "max_update_norm": float("nan"),  # largest client update norm of last round
            "splits": 0,
        }

    def model_of(self, state: ServerState, cid: int) -> Tensors:
        return state["models"][cluster_key(int(state["membership"][cid]))]

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        payloads: dict[int, Payload] = {}
        for cid in client_ids:
            if cid < self.num_clients:
                payloads[cid] = {"params": self.model_of(state, cid)}
            else:  # a held-out client chooses among every cluster model (adapt_unseen)
                payloads[cid] = {"clusters": dict(state["models"])}
        return payloads

    def should_split(self, round: int, members: int, mean_norm: float, max_norm: float) -> bool:
        hp = self.hp
        return (
            round > hp.split_after_round
            and members >= hp.min_cluster_size_to_split
            and mean_norm < hp.eps1
            and max_norm > hp.eps2
        )

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        if not replies:
            return state
        membership = state["membership"].clone()
        models = dict(state["models"])
        mean_norms: list[float] = []
        max_norms: list[float] = []
        splits = int(state["splits"])
        clusters = sorted({int(membership[cid]) for cid in replies})
        for cluster in clusters:
            members = [cid for cid in sorted(replies) if int(membership[cid]) == cluster]
            updates = {cid: replies[cid]["update"] for cid in members}
            theta = state["models"][cluster_key(cluster)]
            zero = {k: torch.zeros_like(v) for k, v in theta.items()}  # the updates are differences already
            mean = reduce(updates, None, kind="update", reference=zero)
            mean_norm = norm(mean)
            max_norm = max(norm(u) for u in updates.values())
            mean_norms.append(mean_norm)
            max_norms.append(max_norm)
            if not self.should_split(round, len(members), mean_norm, max_norm):
                models[cluster_key(cluster)] = self.moved(theta, mean)
                continue
            labels = bipartition(cosine_similarities([updates[cid] for cid in members]))
            kept = [cid for cid, label in zip(members, labels, strict=True) if label == labels[0]]
            moved = [cid for cid in members if cid not in kept]
            new_cluster = len(models)
            for part, key in ((kept, cluster_key(cluster)), (moved, cluster_key(new_cluster))):
                part_mean = reduce({cid: updates[cid] for cid in part}, None, kind="update", reference=zero)
                models[key] = self.moved(theta, part_mean)
            membership[moved] = new_cluster
            splits += 1
        return {
            "membership": membership,
            "models": models,
            "mean_update_norm": max(mean_norms),
            "max_update_norm": max(max_norms),
            "splits": splits,
        }

    @staticmethod
    def moved(theta: Tensors, mean_update: Tensors) -> Tensors:
        """theta_c + mean Delta (integer buffers in their own dtype)."""
        return {k: (v + mean_update[k]).to(v.dtype) for k, v in theta.items()}

    def configure_evaluation(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        # a held-out client keeps the model it chose in its state
        return {cid: {"params": self.model_of(state, cid)} if cid < self.num_clients else {} for cid in client_ids}

    def server_diagnostics(self, server: ServerState) -> dict[str, float]:
        out = {"clusters": float(len(server["models"])), "splits": float(server["splits"])}
        for key in ("mean_update_norm", "max_update_norm"):
            if server[key] == server[key]:  # not NaN: a round has been aggregated
                out[key] = float(server[key])
        return out

    # ---- client
    def init_client(self, client: ClientView) -> ClientState:
        return {"local_updates": 0}

    def local_update(self, client: ClientView, state: ClientState, payload: Payload) -> tuple[ClientState, Reply]:
        count = int(state.get("local_updates", 0)) + 1
        lr = client.settings.lr * self.hp.lr_decay**count
        settings = client.settings
        keeps = self.hp.keep_momentum and settings.optimizer == "sgd" and settings.momentum > 0
        kept: Tensors | None = state.get("momentum") if keeps else None
        names = [name for name, _ in client.trainer.module.named_parameters()]
        theta = payload["params"]
        factory = restoring_momentum(client.trainer, lr, names, kept) if kept is not None else None
        result = client.fit(theta, lr=lr, optimizer_factory=factory)
        new_state: ClientState = {"local_updates": count}
        if keeps:
            momentum = self.momentum_buffers(result.optimizer, client, names)
            momentum = momentum if momentum is not None else kept  # no step (no data): the old buffers stay
            if momentum is not None:
                new_state["momentum"] = momentum
        update = {k: result.params[k] - theta[k] for k in theta}
        return new_state, {"update": update}

    @staticmethod
    def momentum_buffers(
        optimizer: torch.optim.Optimizer | None, client: ClientView, names: list[str]
    ) -> Tensors | None:
        """The SGD momentum buffer of every parameter after a pass, by name; None when the pass took no step."""
        if optimizer is None:
            return None
        buffers = [optimizer.state[p].get("momentum_buffer") for p in client.trainer.module.parameters()]
        if any(b is None for b in buffers):
            return None
        return {name: b.detach().clone() for name, b in zip(names, buffers, strict=True)}

    def adapt_unseen(self, client: ClientView, state: ClientState, payload: Payload) -> ClientState:
        """A held-out client joins the cluster whose model has the lowest mean cross-entropy on its training split
        (its validation split if it has no training data; the first cluster if it has neither)."""
        clusters = sorted(payload["clusters"], key=lambda key: int(key.rsplit("_", 1)[1]))
        x, y = (client.train_x, client.train_y) if client.train_y.numel() else (client.val_x, client.val_y)
        best = clusters[0]
        if y.numel():
            losses = [
                float(F.cross_entropy(client.trainer.predict(payload["clusters"][k], x).double(), y)) for k in clusters
            ]
            best = clusters[int(np.argmin(losses))]
        return {**state, "cluster": int(best.rsplit("_", 1)[1]), "params": clone_tensors(payload["clusters"][best])}

    def personalized_params(self, client: ClientView, state: ClientState, payload: Payload) -> Tensors:
        if "params" in state:  # a held-out client's chosen cluster model
            return state["params"]
        return payload["params"]

    def expected_reply_shapes(self, payload: Payload) -> dict[str, object]:
        return {"update": {k: v.shape for k, v in payload["params"].items()}}
