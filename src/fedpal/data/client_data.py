"""ClientData and FederatedData: every client's train / val / test tensors, resident in memory, and the federation
that holds them (``fedpal.data.federated`` builds one from a config; FedMosaic's task stream builds its own).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

SPLITS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


@dataclass
class ClientData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def to(self, device: torch.device | str) -> ClientData:
        """This client's splits on ``device``; itself when they are there already. Each split is copied on its own
        unless together they cover the storage they view (a client is a small part of its federation's)."""
        return _clients_on([self], torch.device(device))[0]


def _is_on(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


def _clients_on(clients: list[ClientData], device: torch.device) -> list[ClientData]:
    """The clients with every split on ``device``, the same objects when nothing has to move.

    The federation's splits are views of one ``x_all`` and one ``y_all``: a storage that the splits cover is
    copied once and the splits are cut from the copy again (same offsets and strides), so the device holds one copy
    of the data, not one per split. A split of a storage they do not cover is copied alone (its own elements).
    """
    tensors = [getattr(c, split) for c in clients for split in SPLITS]
    if all(_is_on(t, device) for t in tensors):
        return clients

    def key(t: torch.Tensor) -> tuple[str, int]:
        return str(t.device), t.untyped_storage().data_ptr()

    viewed: Counter[tuple[str, int]] = Counter()  # bytes of each storage the splits view
    for t in tensors:
        viewed[key(t)] += t.numel() * t.element_size()
    copies: dict[tuple[str, int], torch.UntypedStorage] = {}

    def moved(t: torch.Tensor) -> torch.Tensor:
        if _is_on(t, device):
            return t
        k = key(t)
        if viewed[k] < t.untyped_storage().nbytes():
            return t.to(device)
        if k not in copies:
            storage = t.untyped_storage()
            as_bytes = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            copies[k] = as_bytes.to(device).untyped_storage()
        view = torch.empty(0, dtype=t.dtype, device=device)
        return view.set_(copies[k], t.storage_offset(), t.shape, t.stride())

    return [ClientData(*(moved(getattr(c, split)) for split in SPLITS)) for c in clients]


@dataclass
class FederatedData:
    dataset: str
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    clients: list[ClientData]  # the federation: the clients that train, numbered 0..n-1
    # Clients held out from training entirely (data.unseen_clients), evaluated after the method's adaptation.
    unseen: list[ClientData] = field(default_factory=list)
    # Partition index (natural partition: the user's index) of each training and each held-out client.
    client_ids: list[int] = field(default_factory=list)
    unseen_ids: list[int] = field(default_factory=list)
    # Tasks over time: (client id, round, the client's data) -> its data in that round. None: data never change.
    schedule: Callable[[int, int, ClientData], ClientData] | None = None
    # The true group (source, latent distribution) each training then held-out client draws from, when known.
    client_groups: list[int] = field(default_factory=list)
    # data.target_shift: the client whose validation and test splits each training client uses (else itself).
    target_clients: list[int] = field(default_factory=list)
    # Task streams (FedMosaic): the task of each class of the union label space, each task's name and source
    # dataset, each training client's tasks in the order it meets them, and (client, round) -> the tasks that
    # client has met by that round. Empty / None for every other federation.
    label_tasks: list[int] = field(default_factory=list)
    task_names: tuple[str, ...] = ()
    task_sources: tuple[str, ...] = ()
    client_tasks: list[list[int]] = field(default_factory=list)
    tasks_seen: Callable[[int, int], list[int]] | None = None
    # Inputs that no client holds (task streams: the public block), for the adapters' once-only A/B alignment.
    public_x: torch.Tensor | None = None
    poisoned: bool = False  # the training data of an [attack]'s malicious clients are poisoned already

    def __post_init__(self) -> None:
        """Hand-made federations need not number their clients: they are partitions 0..n-1, then the held-out."""
        n = len(self.clients)
        self.client_ids = self.client_ids or list(range(n))
        self.unseen_ids = self.unseen_ids or list(range(n, n + len(self.unseen)))

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client(self, cid: int) -> ClientData:
        """Training client ``cid``; ids from num_clients on name the held-out clients, as the engine numbers them."""
        n = self.num_clients
        return self.clients[cid] if cid < n else self.unseen[cid - n]

    def client_at(self, cid: int, round: int) -> ClientData:
        """Client ``cid``'s data in ``round``: what the engine gives the algorithm (the schedule, if any, decides;
        the methods never know)."""
        data = self.client(cid)
        return data if self.schedule is None else self.schedule(cid, round, data)

    def to(self, device: torch.device | str) -> FederatedData:
        """The federation with every client's splits on ``device`` (training and held-out clients, one copy of
        the storage they share); itself when the data are there already. The schedule, if any, is kept: it then
        receives and must return clients on ``device``."""
        everyone = self.clients + self.unseen
        moved = _clients_on(everyone, torch.device(device))
        if moved is everyone:
            return self
        n = len(self.clients)
        return dataclasses.replace(self, clients=moved[:n], unseen=moved[n:])

    def label_counts(self) -> np.ndarray:
        """Samples per client per class over all three splits, [clients, classes]."""
        counts = np.zeros((self.num_clients, self.num_classes), dtype=np.int64)
        for i, c in enumerate(self.clients):
            for y in (c.train_y, c.val_y, c.test_y):
                counts[i] += np.bincount(y.cpu().numpy(), minlength=self.num_classes)
        return counts
