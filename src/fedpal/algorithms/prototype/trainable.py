"""FedTGP's server side: Trainable Global Prototypes (TGP) and the adaptive-margin-enhanced contrastive loss (ACL).

Facts taken from the official server (TsingZ0/HtFLlib ``system/flcore/servers/servertgp.py``):

- generator layout: ``Embedding(C, D)`` -> ``Linear(D, hidden)`` -> ``ReLU`` -> ``Linear(hidden, D)``, hidden = D,
  PyTorch default initialisation; it persists across rounds and gets a fresh plain SGD optimiser (no momentum,
  lr = client lr) every round;
- margin: per-class gap = distance to the nearest other class among the classes uploaded this round; classes not
  uploaded get the smallest gap, so they never change the maximum; delta = min(max gap, tau). With fewer than two
  uploaded classes no gap is ever computed, the 1e9 sentinel survives, and delta = tau;
- every batch recomputes the outputs for **all** C classes and takes the plain (not squared) L2 distance from each
  uploaded prototype to each of them (official: ||p||² - 2 p·g + ||g||² then sqrt; here ``torch.cdist`` with
  explicit differences, which is the same quantity without the risk of a negative value under the root);
- loss = CE(-(d + delta * onehot(y)), y), mean over the batch; batches of the client batch size, reshuffled every
  epoch, last partial batch kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fedpal.algorithms.core.training import batch_indices, train_steps


class PrototypeGenerator(nn.Module):
    """TGP: class id -> global prototype. ``Embedding(C, D) -> Linear(D, H) -> ReLU -> Linear(H, D)``, H = D default.

    ``generator`` (optional) draws the initial parameters from the same distributions as PyTorch's defaults
    (embedding N(0, 1); linear weights kaiming-uniform with a = sqrt(5), biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)))
    but from that generator instead of the global RNG.
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        hidden_dim: int | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or feature_dim < 1:
            raise ValueError(f"num_classes and feature_dim must be >= 1, got {num_classes}, {feature_dim}")
        hidden = feature_dim if hidden_dim is None else hidden_dim
        if hidden < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden}")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.hidden_dim = hidden
        self.embedding = nn.Embedding(num_classes, feature_dim)
        self.hidden = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, feature_dim)
        if generator is not None:
            self._init_from(generator)

    @torch.no_grad()
    def _init_from(self, generator: torch.Generator) -> None:
        nn.init.normal_(self.embedding.weight, 0.0, 1.0, generator=generator)
        for layer in (self.hidden[0], self.out):
            assert isinstance(layer, nn.Linear)
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            bound = 1.0 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Prototypes of the class ids ``labels`` [n] -> [n, D]."""
        return self.out(self.hidden(self.embedding(labels)))

    def all_prototypes(self) -> torch.Tensor:
        """The prototypes of all C classes, [C, D] (row c = class c), with the graph kept for training."""
        return self(torch.arange(self.num_classes, device=self.embedding.weight.device))


def adaptive_margin(class_means: torch.Tensor, present: torch.Tensor, tau: float) -> float:
    """delta = min(max_c gap_c, tau), gap_c = min over the other present classes of ||mean_c - mean_c'||_2.

    ``class_means`` [C, D] (rows of absent classes are ignored, whatever they hold); ``present`` bool [C]. Absent
    classes do not count (official: they get the smallest gap, which cannot raise the maximum). With fewer than
    two present classes no gap exists and, as in the official code, delta = tau.
    """
    if class_means.dim() != 2:
        raise ValueError(f"class_means must be [C, D], got shape {tuple(class_means.shape)}")
    if present.shape != (class_means.shape[0],) or present.dtype != torch.bool:
        raise ValueError(f"present must be a bool tensor of shape ({class_means.shape[0]},)")
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    means = class_means.detach()[present].to(torch.float64)
    if means.shape[0] < 2:
        return float(tau)
    if not torch.isfinite(means).all():
        raise ValueError("class_means has non-finite rows for present classes")
    dist = torch.cdist(means, means, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    dist.fill_diagonal_(math.inf)
    gaps = dist.min(dim=1).values
    return min(float(gaps.max()), float(tau))


def margin_contrastive_loss(distances: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """ACL: CE(-(d + margin * onehot(y)), y), mean over the batch. ``distances`` [n, C], ``labels`` [n]."""
    if distances.dim() != 2 or labels.shape != (distances.shape[0],):
        raise ValueError(f"need distances [n, C] and labels [n], got {tuple(distances.shape)}, {tuple(labels.shape)}")
    onehot = F.one_hot(labels, distances.shape[1]).to(distances.dtype)
    return F.cross_entropy(-(distances + margin * onehot), labels)


def train_generator(
    gen: PrototypeGenerator,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float,
    epochs: int = 100,
    batch_size: int = 10,
    lr: float = 0.01,
    generator: torch.Generator,
) -> float:
    """Train ``gen`` in place on the uploaded (prototype, label) pairs with the ACL; returns the last epoch's loss.

    ``prototypes`` [N, D] (detached), ``labels`` [N] class ids. Each epoch draws ``torch.randperm(N, generator=...)``
    and walks it in batches of ``batch_size`` (last one partial); each batch recomputes all C generator outputs,
    takes d = cdist(batch, outputs) [b, C] and makes one SGD step (no momentum, no weight decay) on the ACL.
    The return value is the sample-weighted mean batch loss over the last epoch. Deterministic given the
    generator's state and ``gen``'s parameters.
    """
    if prototypes.dim() != 2 or prototypes.shape[1] != gen.feature_dim:
        raise ValueError(f"prototypes must be [N, {gen.feature_dim}], got shape {tuple(prototypes.shape)}")
    n = prototypes.shape[0]
    if n == 0:
        raise ValueError("no prototypes to train the generator on")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    device = gen.embedding.weight.device
    targets = labels.detach().to(device=device, dtype=torch.long)
    if bool((targets < 0).any()) or bool((targets >= gen.num_classes).any()):
        raise ValueError(f"labels must lie in [0, {gen.num_classes})")
    points = prototypes.detach().to(device=device, dtype=gen.embedding.weight.dtype)

    optimizer = torch.optim.SGD(gen.parameters(), lr=lr)
    gen.train()
    last_epoch_total = torch.zeros((), dtype=torch.float64, device=device)

    def loss_of(epoch: int, batch: torch.Tensor) -> torch.Tensor:
        nonlocal last_epoch_total
        outputs = gen.all_prototypes()
        dist = torch.cdist(points[batch], outputs, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
        loss = margin_contrastive_loss(dist, targets[batch], margin)
        if epoch == epochs - 1:
            last_epoch_total = last_epoch_total + loss.detach().to(torch.float64) * batch.numel()
        return loss

    train_steps(batch_indices(n, batch_size, generator, epochs=epochs, device=device), loss_of, [optimizer])
    return float(last_epoch_total) / n
