"""Which fedpal clients a Flower node hosts: "0-4", "0,3,7-9" (inclusive ranges), or, in Flower's simulation, the
clients c with c mod num-partitions = partition-id. fedpal's client id is the stable name of a client: Flower's node
id changes when a node restarts."""

from __future__ import annotations

from collections.abc import Mapping

from fedpal.errors import UserError


def parse_clients(spec: str) -> list[int]:
    """The sorted client ids of a spec such as "0-4,7"; a malformed spec is a ``UserError`` in one line."""
    ids: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        low, dash, high = part.partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            raise UserError(f"clients '{spec}': expected ids and ranges such as 0-4,7, got '{part}'") from None
        if first < 0 or last < first:
            raise UserError(f"clients '{spec}': '{part}' is not an ascending range of ids >= 0")
        ids.update(range(first, last + 1))
    return sorted(ids)


def node_clients(node_config: Mapping[str, object], num_clients: int) -> list[int]:
    """The clients a node hosts, from its node config: ``clients`` when given, else its simulation partition."""
    if "clients" in node_config:
        ids = parse_clients(str(node_config["clients"]))
        unknown = [c for c in ids if c >= num_clients]
        if unknown:
            raise UserError(f"this node hosts clients {unknown}, but the run has only {num_clients} clients")
        return ids
    if "partition-id" in node_config and "num-partitions" in node_config:
        part, parts = int(str(node_config["partition-id"])), int(str(node_config["num-partitions"]))
        return [c for c in range(num_clients) if c % parts == part]
    raise UserError("this Flower node was started without the clients it hosts: --node-config \"clients='0-4'\"")
