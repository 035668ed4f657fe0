"""The server side of the adapter baselines that average: one adapter per architecture, the plain mean of that
architecture's uploaded adapters (through the engine's ``reduce``, every client weighted alike as the official
code's ``fedavg_aggregate_state_dict`` does), sent to each client under the key the method loads it as (``lora2``
to train from for FedAvg and Ditto, ``lora1`` as FedDPA's global adapter). Nothing crosses architectures: their
adapters have different shapes."""

from __future__ import annotations

from typing import ClassVar

from fedpal.algorithms.core.contract import Payload, Reduce, Reply, ServerState
from fedpal.algorithms.weight_sharing.adapter_method import AdapterMethod
from fedpal.common.tensors import Tensors
from fedpal.models.families import architecture_of


def mean_per_architecture(
    state: ServerState, replies: dict[int, Reply], reduce: Reduce, architectures: tuple[str, ...], key: str
) -> dict[str, Tensors]:
    """The unweighted mean of the replies' ``key`` adapter within each architecture (architectures nobody trained
    keep their previous mean)."""
    means = dict(state["lora2"])
    for arch in dict.fromkeys(architectures):
        members = {cid: r for cid, r in replies.items() if architecture_of(cid, architectures) == arch}
        if not members:
            continue
        reference = means.get(arch) or next(iter(members.values()))[key]
        uploads = {cid: r[key] for cid, r in members.items()}
        means[arch] = reduce(uploads, dict.fromkeys(members, 1.0), reference=reference)
    return means


class AdapterAveraging(AdapterMethod):
    """Keeps each architecture's mean adapter (of the replies' ``upload_key``) and sends it as ``payload_key``
    (nothing before the first round)."""

    payload_key: ClassVar[str] = "lora2"
    upload_key: ClassVar[str] = "lora2"

    def init_server(self) -> ServerState:
        return {"lora2": {}}  # architecture -> its mean adapter (from the first round's replies on)

    def configure(self, state: ServerState, round: int, client_ids: list[int]) -> dict[int, Payload]:
        payloads: dict[int, Payload] = {}
        for cid in client_ids:
            arch = architecture_of(cid, self.setup.architectures)
            payloads[cid] = {self.payload_key: state["lora2"][arch]} if arch in state["lora2"] else {}
        return payloads

    def aggregate(self, state: ServerState, round: int, replies: dict[int, Reply], reduce: Reduce) -> ServerState:
        means = mean_per_architecture(state, replies, reduce, self.setup.architectures, self.upload_key)
        return {"lora2": means}
