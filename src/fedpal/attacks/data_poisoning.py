"""Attacks on a malicious client's own training data, applied once when the run is assembled.

Only the training split of a malicious client changes; its validation and test splits, and every benign client,
stay as they are (so clean accuracy is measured on clean data). The poisoned splits are new tensors: a
federation's splits are views of one shared storage, which must never be written to.

- Label flipping (FedML): y → C − 1 − y on every training sample.
- Backdoor (BadNet, as in FederatedScope's Backdoor-bench): a fixed trigger stamped on a seeded fraction (0.5) of
  the training samples, whose labels become the target class (C − 1 by default: class 9 of the 10-class image
  sets). The trigger:
  - images [C, H, W] or [H, W]: a ``size`` × ``size`` (4 × 4) patch in the bottom-right corner, on every channel,
    set to ``value``, the brightest input value of the training data (white: 1.0 for fedpal's images in [−1, 1]);
  - inertial windows [channels, time]: the analogue of that corner patch on a [channels, time] "image" that spans
    every channel: the last ``size`` time steps of every channel set to ``value`` (the largest training value, a
    saturated spike on all axes at the end of the window).
- The backdoor's success: ``triggered_test_set`` stamps the trigger on the benign clients' test samples whose label
  is not the target, and ``attack_success_rate`` is the fraction of those predicted as the target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import torch

from fedpal.common.seeding import generator_for
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.errors import ConfigError, UserError

DataAttackName = Literal["label_flip", "backdoor"]
TriggerKind = Literal["image", "series"]


@dataclass(frozen=True)
class Trigger:
    """Where the backdoor trigger goes (``image``: bottom-right patch; ``series``: last time steps) and its value."""

    kind: TriggerKind
    value: float
    size: int = 4

    def __post_init__(self) -> None:
        if self.kind not in ("image", "series"):
            raise ConfigError(f"trigger kind must be 'image' or 'series', got '{self.kind}'")
        if self.size < 1:
            raise ConfigError(f"trigger size must be >= 1, got {self.size}")


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C − 1 − y (a new tensor)."""
    return (num_classes - 1) - y


def apply_trigger(x: torch.Tensor, trigger: Trigger) -> torch.Tensor:
    """A copy of the batch ``x`` with the trigger stamped on every sample.

    ``image``: x is [N, C, H, W] or [N, H, W]; ``series``: x is [N, channels, time].
    """
    if not x.is_floating_point():
        raise UserError("a backdoor trigger needs float inputs (images or sensor windows), not token ids")
    out = x.clone()
    s = trigger.size
    if trigger.kind == "image":
        if out.dim() not in (3, 4) or out.shape[-1] < s or out.shape[-2] < s:
            raise UserError(f"an image trigger of {s}x{s} needs inputs [N, C, H, W] or [N, H, W], got {tuple(x.shape)}")
        out[..., -s:, -s:] = trigger.value
    else:
        if out.dim() != 3 or out.shape[-1] < s:
            raise UserError(f"a series trigger of {s} steps needs inputs [N, channels, time], got {tuple(x.shape)}")
        out[..., -s:] = trigger.value
    return out


def trigger_for(data: FederatedData, size: int = 4) -> Trigger:
    """The trigger for ``data``: by input rank (fedpal's images are [C, H, W]; its 2-D inputs are sensor windows
    [channels, time]), valued at the largest input of the training clients' training splits."""
    sample = data.clients[0].train_x
    if not sample.is_floating_point():
        raise UserError(f"a backdoor needs image or sensor inputs; '{data.dataset}' has token ids")
    rank = len(data.input_shape)
    if rank not in (2, 3):
        raise UserError(
            f"a backdoor needs inputs [C, H, W] or [channels, time]; '{data.dataset}' has {data.input_shape}"
        )
    value = max(float(c.train_x.max()) for c in data.clients if c.train_x.numel())
    return Trigger(kind="image" if rank == 3 else "series", value=value, size=size)


def default_target(num_classes: int) -> int:
    """C − 1 (class 9 of a 10-class set, FederatedScope's default)."""
    return num_classes - 1


def poisoned_indices(num_samples: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """round(fraction · num_samples) distinct sample indices (halves up), sorted, drawn from ``generator``."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"the poisoned fraction must lie in [0, 1], got {fraction}")
    count = min(num_samples, int(fraction * num_samples + 0.5))
    return torch.randperm(num_samples, generator=generator)[:count].sort().values


def label_flip(client: ClientData, num_classes: int) -> ClientData:
    """The client with every training label flipped; validation and test splits are the same tensors."""
    return dataclasses.replace(client, train_y=flip_labels(client.train_y, num_classes))


def backdoor(
    client: ClientData, trigger: Trigger, target: int, fraction: float, generator: torch.Generator
) -> ClientData:
    """The client with the trigger on a ``fraction`` of its training samples, relabelled ``target``."""
    chosen = poisoned_indices(client.train_y.shape[0], fraction, generator).to(client.train_y.device)
    train_x, train_y = client.train_x.clone(), client.train_y.clone()
    if chosen.numel():
        train_x[chosen] = apply_trigger(client.train_x[chosen], trigger)
        train_y[chosen] = target
    return dataclasses.replace(client, train_x=train_x, train_y=train_y)


def poison_training_data(
    data: FederatedData,
    malicious: Collection[int],
    attack: DataAttackName,
    seed: int,
    *,
    fraction: float = 0.5,
    target: int | None = None,
    trigger: Trigger | None = None,
) -> FederatedData:
    """The federation with the malicious training clients' training splits poisoned (a new FederatedData; ``data``
    is not changed). The backdoor's samples are drawn from ``derive_seed(seed, client, "backdoor")``."""
    if attack not in ("label_flip", "backdoor"):
        raise ConfigError(f"unknown data attack '{attack}'; choose 'label_flip' or 'backdoor'")
    bad = [c for c in malicious if not 0 <= c < data.num_clients]
    if bad:
        raise ValueError(f"malicious ids {sorted(bad)} are not training clients 0..{data.num_clients - 1}")
    goal = default_target(data.num_classes) if target is None else target
    if not 0 <= goal < data.num_classes:
        raise ConfigError(f"backdoor target must be a class 0..{data.num_classes - 1}, got {goal}")
    stamp = trigger if trigger is not None or attack != "backdoor" else trigger_for(data)
    clients = list(data.clients)
    for cid in sorted(malicious):
        if attack == "label_flip":
            clients[cid] = label_flip(clients[cid], data.num_classes)
        else:
            assert stamp is not None
            clients[cid] = backdoor(clients[cid], stamp, goal, fraction, generator_for(seed, cid, "backdoor"))
    return dataclasses.replace(data, clients=clients)


@dataclass(frozen=True)
class TriggeredTestSet:
    """Benign clients' triggered test samples: inputs, true labels, and the client each came from (so each
    client's personalized model can be scored on its own)."""

    x: torch.Tensor
    y: torch.Tensor
    owner: torch.Tensor

    def of_client(self, cid: int) -> torch.Tensor:
        """The triggered inputs of client ``cid``."""
        return self.x[(self.owner == cid).to(self.x.device)]


def triggered_test_set(
    data: FederatedData, malicious: Collection[int], trigger: Trigger, target: int | None = None
) -> TriggeredTestSet:
    """The benign training clients' test samples whose label is not ``target``, with the trigger stamped on."""
    goal = default_target(data.num_classes) if target is None else target
    bad = set(malicious)
    xs, ys, owners = [], [], []
    for cid, client in enumerate(data.clients):
        if cid in bad:
            continue
        keep = client.test_y != goal
        xs.append(triggered_inputs(client, trigger, goal))
        ys.append(client.test_y[keep])
        owners.append(torch.full((int(keep.sum()),), cid, dtype=torch.int64))
    if not xs:
        raise UserError("no benign client is left to measure the backdoor on")
    return TriggeredTestSet(torch.cat(xs), torch.cat(ys), torch.cat(owners))


def triggered_inputs(client: ClientData, trigger: Trigger, target: int) -> torch.Tensor:
    """One client's test inputs whose label is not ``target``, with the trigger stamped on."""
    return apply_trigger(client.test_x[client.test_y != target], trigger)


def attack_success_rate(predictions: torch.Tensor, target: int) -> float:
    """The fraction of triggered non-target samples predicted as ``target`` (NaN when there are none)."""
    if predictions.numel() == 0:
        return float("nan")
    return float((predictions == target).double().mean())
