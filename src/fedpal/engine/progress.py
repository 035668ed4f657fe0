"""Live progress on stderr: a tqdm bar (rounds done, time per round, time left, the latest metrics) on a terminal;
one plain line per evaluation, with the time per round and the time left, when stderr is a file or a CI log."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm


class Progress:
    def __init__(self, total_rounds: int, label: str, enabled: bool = True) -> None:
        self.total = total_rounds
        self.label = label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.start = time.perf_counter()
        self.first_round: int | None = None

    def update(self, round: int, metrics: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        if self.first_round is None:  # a resumed run starts part-way: rates count from here
            self.first_round = round - 1
            if self.tty:
                self.bar = tqdm(
                    total=self.total, initial=round - 1, desc=self.label, unit="round", file=sys.stderr, leave=True
                )
        shown = {k: f"{v:.4f}" for k, v in (metrics or {}).items()}
        if self.bar is not None:
            self.bar.update(round - self.bar.n)
            if shown:
                self.bar.set_postfix(shown, refresh=True)
            return
        if metrics or round == self.total:
            elapsed = time.perf_counter() - self.start
            per_round = elapsed / max(round - self.first_round, 1)
            left = per_round * (self.total - round)
            text = "  ".join(f"{k} {v}" for k, v in shown.items())
            sys.stderr.write(
                f"{self.label} round {round}/{self.total}  {per_round:.2f} s/round  {left:.0f} s left  {text}\n"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
