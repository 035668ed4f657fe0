"""Client states on a Flower node: kept in Flower's per-node state between rounds, keyed by fedpal's client id and
the round that produced them (never by Flower's node id, which a restarted node does not keep), and, given a
directory, on the node's disk too, so that a restarted node resumes its clients.

The server names the state a task starts from (its round); a node keeps, per client, that state and newer ones, so a
reply the server rejects leaves the previous state in place, and a server resumed from its last checkpoint finds
the states that checkpoint names (``run.checkpoint_every = 1``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict

from fedpal.flower.records import from_records, to_records

PREFIX = "fedpal.state."
KEY = re.compile(r"^fedpal\.state\.(\d+)@(\d+)\.")


class NodeStates:
    """The states of this node's clients: ``context.state`` first, then ``directory`` (when given)."""

    def __init__(self, records: RecordDict, directory: Path | None) -> None:
        self.records = records
        self.directory = directory

    def _prefix(self, client: int, round: int) -> str:
        return f"{PREFIX}{client}@{round}."

    def _file(self, client: int, round: int) -> Path:
        assert self.directory is not None
        return self.directory / f"client{client}" / f"round{round}.pt"

    def rounds(self, client: int) -> set[int]:
        """Rounds of the states kept for ``client`` (in memory or on disk)."""
        found = {int(m.group(2)) for key in self.records if (m := KEY.match(key)) and int(m.group(1)) == client}
        if self.directory is not None and (self.directory / f"client{client}").is_dir():
            found |= {int(p.stem[5:]) for p in (self.directory / f"client{client}").glob("round*.pt")}
        return found

    def load(self, client: int, round: int) -> dict[str, Any] | None:
        prefix = self._prefix(client, round)
        if any(key.startswith(prefix) for key in self.records):
            state = from_records(self.records, prefix)
            assert isinstance(state, dict)
            return state
        if self.directory is not None and self._file(client, round).is_file():
            state = torch.load(self._file(client, round), weights_only=False)
            self.records.update(to_records(state, prefix))  # back in memory for the next rounds
            return state
        return None

    def save(self, client: int, round: int, state: dict[str, Any]) -> None:
        self.records.update(to_records(state, self._prefix(client, round)))
        if self.directory is not None:
            path = self._file(client, round)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            torch.save(state, partial)
            os.replace(partial, path)  # atomic: a node killed while writing leaves the previous states intact

    def keep_from(self, client: int, round: int) -> None:
        """Forget ``client``'s states older than ``round``: the server will not name them again."""
        for old in sorted(r for r in self.rounds(client) if r < round):
            prefix = self._prefix(client, old)
            for key in [k for k in self.records if k.startswith(prefix)]:
                del self.records[key]
            if self.directory is not None:
                self._file(client, old).unlink(missing_ok=True)
