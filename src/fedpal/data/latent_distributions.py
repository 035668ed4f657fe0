"""Latent-distribution clients (FedFomo's non-IID setting): samples grouped by where a fixed model embeds them, so
clients drawn from one group share a distribution that no label reveals.

As the official code does with an ImageNet VGG, but at CPU scale: a small MLP is trained once on a class-stratified
split that no client holds (``embed_fraction``), every other sample is embedded (its 64-d penultimate features),
reduced with PCA to 32 dimensions and clustered with k-means (scikit-learn, k-means++, 5 initialisations) into
``distributions`` groups. Everything is seeded from the run seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedpal.common.seeding import derive_seed
from fedpal.errors import UserError

EMBED_DIM = 64
PCA_DIM = 32
EPOCHS = 5
BATCH = 128


def _embedding_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of a class-stratified ``fraction`` of the samples."""
    mask = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        mask[rng.choice(members, max(1, round(fraction * members.size)), replace=False)] = True
    return mask


def _embedder(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int) -> nn.Module:
    """A small MLP trained (Adam, 5 epochs) on the embedding split; its body gives the embedding."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "latent-embedder-init"))
        body = nn.Sequential(
            nn.Flatten(), nn.Linear(x[0].numel(), 256), nn.ReLU(), nn.Linear(256, EMBED_DIM), nn.ReLU()
        )
        model = nn.Sequential(body, nn.Linear(EMBED_DIM, num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(derive_seed(seed, "latent-embedder-batches"))
    for _ in range(EPOCHS):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], BATCH):
            idx = order[start : start + BATCH]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return body


def latent_groups(
    inputs: np.ndarray, labels: np.ndarray, num_classes: int, distributions: int, seed: int, embed_fraction: float
) -> np.ndarray:
    """The latent group (0..distributions-1) of every sample; -1 for the embedding split, which no client gets."""
    if distributions < 1:
        raise UserError(f"data.distributions must be at least 1, got {distributions}")
    if not 0 < embed_fraction < 1:
        raise UserError(f"data.embed_fraction must be in (0, 1), got {embed_fraction}")
    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:
        raise UserError("partition 'latent' needs scikit-learn: pip install 'fedpal[cluster]'") from exc
    rng = np.random.default_rng(derive_seed(seed, "latent-embedding-split"))
    held = _embedding_split(labels, embed_fraction, rng)
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    body = _embedder(x[torch.from_numpy(held)], y[torch.from_numpy(held)], num_classes, seed)
    rest = np.flatnonzero(~held)
    with torch.inference_mode():
        features = torch.cat([body(x[rest[i : i + 4096]]) for i in range(0, rest.size, 4096)]).double()
    centred = features - features.mean(dim=0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    reduced = (centred @ vectors[:, -PCA_DIM:]).numpy()
    kmeans = KMeans(n_clusters=distributions, init="k-means++", n_init=5, max_iter=100, random_state=seed % 2**32)
    groups = np.full(labels.size, -1, dtype=np.int64)
    groups[rest] = kmeans.fit_predict(reduced)
    return groups
