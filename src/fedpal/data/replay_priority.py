"""The official FedMosaic sampler of a client's replay store (``data.task_replay = "priority"``).

Each row of the store carries a use count. The rows that arrive in a round join the store one by one, and the round's
mini-batches are drawn in between, spread evenly over the arrivals (``steps / arrivals`` batches per arriving row,
carried over as a fraction), so early batches of a round see only part of the new rows. Before each draw every
count decays (x 0.99); a batch is drawn without replacement with probabilities softmax(-count / T), T = 0.125, and the
drawn rows' counts go up by one. At T = 0.125 a row drawn once weighs e^-8 of an unused one, so new rows come first
and the store is then walked least-used first. A store smaller than a batch is repeated to fill it. The counts are
the client's to keep from round to round.

Differences from the official code, each forced or harmless here: when no row arrives in a round (past the stream's
end) every batch is drawn from the store as it is (the official code divides by zero); and the official code draws at
most one extra batch when rounding leaves the round short, where this draws until the round has exactly ``steps``.
"""

from __future__ import annotations

import torch

from fedpal.errors import ConfigError

TEMPERATURE = 0.125  # official online_stream_T
DECAY = 0.99  # official online_stream_count_decay_ratio


def priority_batches(
    counts: torch.Tensor, store: int, steps: int, batch_size: int, generator: torch.Generator
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The round's ``steps`` mini-batches (row indices into the store, on the CPU) and the use counts after them.

    ``counts`` (float64) are those of the rows the store held before this round; the store now holds ``store`` rows,
    its last ``store - len(counts)`` having arrived this round."""
    held = int(counts.numel())
    if store < held:
        raise ConfigError(
            "data.task_replay = 'priority' samples a replay store that only grows (data.task_local_data = 'memory')"
        )
    fresh = torch.zeros(store - held, dtype=torch.float64, device="cpu")
    counts = torch.cat([counts.to(device="cpu", dtype=torch.float64), fresh])
    batches: list[torch.Tensor] = []
    if steps <= 0 or store == 0:
        return batches, counts

    def draw(available: int) -> None:
        seen = counts[:available]
        seen.mul_(DECAY)
        weights = torch.softmax(-seen / TEMPERATURE, dim=0)
        rows = torch.multinomial(weights, min(available, batch_size), replacement=False, generator=generator)
        seen[rows] += 1.0
        batches.append(rows.repeat(-(-batch_size // rows.numel()))[:batch_size])

    arrivals = store - held
    if arrivals:
        share, due = steps / arrivals, 0.0
        for arrived in range(held + 1, store + 1):
            due += share
            while due >= 1 and len(batches) < steps:
                draw(arrived)
                due -= 1
    while len(batches) < steps:
        draw(store)
    return batches, counts
