"""The official FedMosaic replay sampler (data.task_replay = "priority"): batches drawn between arrivals, least-used
rows first, counts that decay by 0.99 per draw and rise by one per drawn row; and where the option is refused."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_config

from fedpal.config import from_dict
from fedpal.data.replay_priority import DECAY, priority_batches
from fedpal.errors import ConfigError


def draws(counts: torch.Tensor, store: int, steps: int = 40, batch: int = 16, seed: int = 0):
    return priority_batches(counts, store, steps, batch, torch.Generator().manual_seed(seed))


def test_batches_are_drawn_between_arrivals_from_the_rows_arrived_so_far() -> None:
    """80 rows arrive, 40 batches: one batch after every second row, so batch j sees rows 0 .. 2j + 1 only; with
    fewer rows than a batch it takes each of them once and repeats them to fill it."""
    batches, _ = draws(torch.zeros(0, dtype=torch.float64), 80)
    assert len(batches) == 40 and all(b.numel() == 16 for b in batches)
    for j, rows in enumerate(batches):
        arrived = 2 * (j + 1)
        assert int(rows.max()) < arrived
        assert len(set(rows.tolist())) == min(arrived, 16)


def test_unused_rows_come_first_and_the_counts_follow_decay_and_increments() -> None:
    """After a round in which every held row was drawn, the next round's first batch holds the newly arrived rows
    (weight e^-8 against a row drawn once); the count mass after each draw is mass x 0.99 + the rows drawn."""
    _, counts = draws(torch.zeros(0, dtype=torch.float64), 80)
    assert bool((counts > 0.5).all())  # 40 x 16 draws over 80 rows: every row used
    batches, after = draws(counts, 160, seed=1)
    first = set(batches[0].tolist())
    assert {80, 81} <= first  # the two rows arrived before the first draw
    mass = float(counts.sum())
    for rows in batches:
        mass = mass * DECAY + len(set(rows.tolist()))
    assert float(after.sum()) == pytest.approx(mass, rel=1e-12)
    assert after.shape == (160,) and float(after[80:].min()) > 0  # the new rows were all drawn too


def test_no_arrivals_draws_every_batch_from_the_store_and_a_shrinking_store_is_refused() -> None:
    batches, counts = draws(torch.ones(50, dtype=torch.float64), 50, steps=7)
    assert len(batches) == 7 and counts.shape == (50,)
    with pytest.raises(ConfigError, match="only grows"):
        draws(torch.ones(50, dtype=torch.float64), 40)


def test_priority_is_refused_off_the_replay_store_and_for_methods_without_adapters() -> None:
    stream = {"dataset": "task_stream", "num_clients": 10, "task_replay": "priority"}
    with pytest.raises(ConfigError, match="task_local_data = 'memory'"):
        from_dict(tiny_config("sft", data={**stream, "task_local_data": "slice"}))
    import fedpal

    with pytest.raises(ConfigError, match="adapter methods' sampler"):
        fedpal.run(tiny_config("fedavg", data={"task_replay": "priority"}))


@pytest.mark.parametrize("name", ["feddpa", "ditto_lora"])
def test_adapter_methods_train_on_the_priority_draws_and_keep_the_counts(name: str) -> None:
    """A task-stream run under priority keeps, per client, one count per row of its store (which grows every
    round), and trains on other batches than the uniform draws (so its numbers differ)."""
    from fedpal.data.federated import build_federated_data
    from fedpal.engine.simulator import Simulator

    def run(replay: str) -> tuple[dict, Simulator]:
        raw = tiny_config(
            name,
            data={"dataset": "task_stream", "num_clients": 10, "samples_per_task": 40, "task_replay": replay},
            model={"name": "mosaic_small", "feature_dim": 8, "adapters": True, "adapter_init": "random"},
            train={"rounds": 2, "batch_size": 8},
            algorithm={"local_steps": 4},
        )
        raw["eval"]["generalization_samples"] = 0
        cfg = from_dict(raw)
        simulator = Simulator(cfg, build_federated_data(cfg.data, cfg.seed), run_dir=None, progress=False)
        return simulator.run(), simulator

    summary, simulator = run("priority")
    data = simulator.data
    for cid, state in simulator.clients.items():
        assert state["replay_counts"].shape == (data.client_at(cid, 2).train_x.shape[0],)
    uniform, _ = run("uniform")
    assert summary["last_round"] != uniform["last_round"]
