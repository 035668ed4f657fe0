"""A one-line live progress display on stderr (a line per evaluation when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_rounds: int, label: str, enabled: bool = True) -> None:
        self.total = total_rounds
        self.label = label
        self.enabled = enabled
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last = ""

    def update(self, round: int, metrics: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        if metrics:
            self.last = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        width = 24
        filled = int(width * round / self.total)
        elapsed = time.perf_counter() - self.start
        line = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] round {round}/{self.total}"
            f"  {elapsed:.1f}s  {self.last}"
        )
        if self.tty:
            sys.stderr.write("\r" + line[:200].ljust(100))
            sys.stderr.flush()
        elif metrics or round == self.total:
            sys.stderr.write(line + "\n")

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
