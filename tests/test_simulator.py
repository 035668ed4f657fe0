"""The in-process simulator: byte counts, client sampling, resume, determinism, bad replies, selected round."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tests.conftest import interrupted_at

import fedpal
from fedpal.algorithms.core.registry import ALGORITHMS, register_algorithm
from fedpal.algorithms.weight_sharing.fedavg import FedAvg
from fedpal.config import from_dict
from fedpal.data.federated import build_federated_data
from fedpal.engine.driver import sample_clients
from fedpal.engine.run_directory import RunDirectory
from fedpal.engine.simulator import Simulator
from fedpal.engine.summary import build_summary
from fedpal.errors import UserError

# The tiny MLP on digits: 64 -> 32 -> 16 -> 10, float32.
MLP_PARAMS = (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
PARAM_BYTES = MLP_PARAMS * 4

# --------------------------------------------------------------------------------------------- bytes


def test_param_bytes_hand_count_matches_the_model(tiny) -> None:
    cfg = from_dict(tiny())
    sim = Simulator(cfg, build_federated_data(cfg.data, cfg.seed), progress=False)
    assert sum(t.numel() * t.element_size() for t in sim.algorithm.setup.initial_params.values()) == PARAM_BYTES


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "fedavg_ft"])
def test_fedavg_family_bytes_equal_hand_count(tiny, metrics_of, tmp_path: Path, algorithm: str) -> None:
    n, rounds = 4, 3
    result = fedpal.run(tiny(algorithm, train={"rounds": rounds}), out=tmp_path / "run")
    b = result.summary["bytes"]
    assert b["down"] == rounds * n * PARAM_BYTES
    assert b["up"] == rounds * n * (PARAM_BYTES + 8)  # params + num_samples (one 8-byte number)
    assert b["down_by_key"] == {"params": rounds * n * PARAM_BYTES}
    assert b["up_by_key"] == {"params": rounds * n * PARAM_BYTES, "num_samples": rounds * n * 8}
    # metrics.jsonl carries the running totals at each evaluation
    for entry in metrics_of(tmp_path / "run"):
        assert entry["bytes"]["down"] == entry["round"] * n * PARAM_BYTES
        assert entry["bytes"]["up"] == entry["round"] * n * (PARAM_BYTES + 8)
    json_summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert json_summary["bytes"] == b


def test_local_communicates_nothing(tiny) -> None:
    b = fedpal.run(tiny("local")).summary["bytes"]
    assert (b["up"], b["down"]) == (0, 0)


@pytest.mark.parametrize(
    ("train", "per_round"),
    [
        ({"client_fraction": 0.5}, 2),  # round-half-up(0.5 * 4) = 2
        ({"client_fraction": 0.3}, 1),  # round-half-up(1.2) = 1
        ({"client_fraction": 0.1}, 1),  # at least one client
        ({"clients_per_round": 3}, 3),  # an explicit count overrides the fraction
        ({"clients_per_round": 9}, 4),  # never more than the federation
    ],
)
def test_client_sampling_changes_the_byte_count(tiny, train: dict, per_round: int) -> None:
    rounds = 3
    result = fedpal.run(tiny("fedavg", train={"rounds": rounds, **train}))
    assert result.summary["bytes"]["down"] == rounds * per_round * PARAM_BYTES
    assert result.summary["bytes"]["up"] == rounds * per_round * (PARAM_BYTES + 8)


def test_sample_clients_is_seeded_sorted_and_varies_by_round(tiny) -> None:
    cfg = from_dict(tiny(data={"num_clients": 10}, train={"client_fraction": 0.3}))
    rounds = [sample_clients(cfg, 10, r) for r in range(1, 21)]
    assert all(len(ids) == 3 and ids == sorted(ids) and len(set(ids)) == 3 for ids in rounds)
    assert rounds == [sample_clients(cfg, 10, r) for r in range(1, 21)]
    assert len({tuple(ids) for ids in rounds}) > 1
    other = from_dict(tiny(seed=1, data={"num_clients": 10}, train={"client_fraction": 0.3}))
    assert rounds != [sample_clients(other, 10, r) for r in range(1, 21)]


# --------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    ("algorithm", "checkpoint_every", "stop_round"),
    [
        ("fedavg", 1, 3),
        ("local", 1, 3),
        ("fedavg_ft", 1, 2),
        # a checkpoint at round 2, evaluations 1..3 already written: round 3's line must be dropped and redone
        ("fedavg", 2, 4),
        ("local", 2, 4),
    ],
)
def test_resume_ends_with_the_numbers_of_an_uninterrupted_run(
    tiny, strip_wall, metrics_of, tmp_path: Path, algorithm, checkpoint_every, stop_round
) -> None:
    raw = tiny(algorithm, train={"rounds": 4}, run={"progress": False, "checkpoint_every": checkpoint_every})
    reference = fedpal.run(raw, out=tmp_path / "reference")

    with interrupted_at(stop_round):
        fedpal.run(raw, out=tmp_path / "interrupted")
    written = metrics_of(tmp_path / "interrupted")
    assert [e["round"] for e in written] == list(range(1, stop_round))
    assert not (tmp_path / "interrupted" / "summary.json").exists()

    resumed = fedpal.resume(tmp_path / "interrupted")
    assert strip_wall(resumed.summary) == strip_wall(reference.summary)
    on_disk = json.loads((tmp_path / "interrupted" / "summary.json").read_text())
    assert strip_wall(on_disk) == strip_wall(json.loads((tmp_path / "reference" / "summary.json").read_text()))
    for key in ("personalized", "generalization", "global", "bytes", "local_steps"):
        assert on_disk[key] == json.loads((tmp_path / "reference" / "summary.json").read_text())[key]
    assert strip_wall(metrics_of(tmp_path / "interrupted")) == strip_wall(metrics_of(tmp_path / "reference"))
    assert [e["round"] for e in metrics_of(tmp_path / "interrupted")] == [1, 2, 3, 4]


def test_resume_of_a_finished_run_changes_nothing(tiny, strip_wall, tmp_path: Path) -> None:
    first = fedpal.run(tiny(train={"rounds": 2}), out=tmp_path / "run")
    again = fedpal.resume(tmp_path / "run")
    assert strip_wall(again.summary) == strip_wall(first.summary)
    assert again.summary["wall_seconds"] == first.summary["wall_seconds"]


def test_resume_without_a_checkpoint_is_a_user_error(tiny, tmp_path: Path) -> None:
    fedpal.run(tiny(train={"rounds": 2}, run={"progress": False, "checkpoint_every": 0}), out=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    with pytest.raises(UserError, match="no checkpoint"):
        fedpal.resume(tmp_path / "run")
    with pytest.raises(UserError, match="not found"):
        fedpal.resume(tmp_path / "absent")


def test_a_run_directory_with_a_run_in_it_is_not_overwritten(tiny, tmp_path: Path) -> None:
    """Nothing already written is lost, even when the earlier run was interrupted before its first evaluation."""
    raw = tiny(train={"rounds": 4}, eval={"every": 4})
    with interrupted_at(3):
        fedpal.run(raw, out=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert "checkpoint.pt" in before
    with pytest.raises(UserError, match="already holds a run"):
        fedpal.run(tiny(seed=5, train={"rounds": 4}), out=tmp_path / "run")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    fedpal.resume(tmp_path / "run")  # and the interrupted run can still be finished
    assert (tmp_path / "run" / "summary.json").exists()


# --------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("algorithm", ["fedavg", "fedavg_ft", "local"])
def test_same_seed_same_numbers_other_seed_other_numbers(tiny, strip_wall, algorithm: str) -> None:
    a = fedpal.run(tiny(algorithm, train={"rounds": 2}))
    b = fedpal.run(tiny(algorithm, train={"rounds": 2}))
    c = fedpal.run(tiny(algorithm, seed=1, train={"rounds": 2}))
    assert strip_wall(a.summary) == strip_wall(b.summary)
    assert strip_wall(a.metrics) == strip_wall(b.metrics)
    assert a.summary["personalized"] != c.summary["personalized"]
    assert a.summary["generalization"]["accuracy"] != c.summary["generalization"]["accuracy"]


def test_results_do_not_depend_on_client_order(tiny) -> None:
    """Randomness is derived from (seed, round, client), so running clients in reverse changes no reply."""
    import fedpal.engine.driver as driver_module

    cfg = from_dict(tiny(train={"rounds": 1}))
    data = build_federated_data(cfg.data, cfg.seed)

    def replies_of(order: str) -> dict[int, dict]:
        captured: dict[int, dict] = {}
        sim = Simulator(cfg, data, progress=False)
        sim.reduce.streams = False  # keep the replies whole, to compare them
        original = sim.algorithm.aggregate

        def aggregate(state, round, replies, reduce):
            captured.update(replies)
            return original(state, round, replies, reduce)

        sim.algorithm.aggregate = aggregate  # type: ignore[method-assign]
        with pytest.MonkeyPatch.context() as patch:
            if order == "reverse":
                patch.setattr(driver_module, "sample_clients", lambda *a: [3, 2, 1, 0])
            sim.initialize()
            sim.run_round(1)
        return captured

    forward, backward = replies_of("forward"), replies_of("reverse")
    assert sorted(forward) == sorted(backward) == [0, 1, 2, 3]
    for cid in forward:
        for name, tensor in forward[cid]["params"].items():
            assert torch.equal(tensor, backward[cid]["params"][name])


# --------------------------------------------------------------------------------------------- bad replies


@pytest.fixture
def bad_reply_algorithm():
    @register_algorithm
    class BadReplies(FedAvg):
        """FedAvg whose client 0 sends NaN and client 1 a wrong-shaped tensor."""

        name = "test_bad_replies"

        def local_update(self, client, state, payload):
            state, reply = super().local_update(client, state, payload)
            params = dict(reply["params"])
            first = next(iter(params))
            if client.id == 0:
                params[first] = torch.full_like(params[first], float("nan"))
            elif client.id == 1:
                params[first] = params[first][:-1]
            return state, {**reply, "params": params}

    yield BadReplies
    ALGORITHMS.pop("test_bad_replies", None)


def test_bad_replies_are_rejected_counted_logged_and_left_out(tiny, bad_reply_algorithm, tmp_path: Path) -> None:
    rounds, n = 3, 4
    result = fedpal.run(tiny("test_bad_replies", train={"rounds": rounds}), out=tmp_path / "run")
    s = result.summary
    assert s["rejected_replies"] == 2 * rounds
    assert s["rejected_clients"] == [0, 1]  # the two clients whose replies were refused, each listed once
    assert math.isfinite(s["personalized"]["accuracy"])
    # a rejected reply still travelled: client 1's shorter tensor counts what it held
    first_row_bytes = 64 * 4  # the first tensor is the 32 x 64 weight; client 1 sends 31 of its rows
    assert s["bytes"]["up"] == rounds * n * (PARAM_BYTES + 8) - rounds * first_row_bytes
    assert s["bytes"]["down"] == rounds * n * PARAM_BYTES
    log = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert len(log) == 2 * rounds
    assert sum("client 0" in line and "NaN" in line for line in log) == rounds
    assert sum("client 1" in line and "shape" in line for line in log) == rounds
    assert all("rejected reply" in line for line in log)


def test_aggregate_after_rejection_is_fedavg_over_the_rest(tiny, bad_reply_algorithm, tmp_path: Path) -> None:
    cfg = from_dict(tiny("test_bad_replies"))
    data = build_federated_data(cfg.data, cfg.seed)
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create()
    sim = Simulator(cfg, data, run_dir, progress=False)
    sim.initialize()
    w0 = {k: v.clone() for k, v in sim.server["params"].items()}
    sim.run_round(1)
    fits = {cid: sim.view(cid, 1).fit(w0).params for cid in (2, 3)}
    sizes = {cid: data.clients[cid].train_y.numel() for cid in (2, 3)}
    for name, value in sim.server["params"].items():
        manual = sum(sizes[c] * fits[c][name].double() for c in (2, 3)) / (sizes[2] + sizes[3])
        assert torch.allclose(value.double(), manual, atol=1e-6, rtol=0)
    assert sim.counters.rejected_replies == 2
    assert len((tmp_path / "run" / "log.txt").read_text().splitlines()) == 2


def test_reply_with_non_message_value_is_rejected_and_not_counted(tiny, monkeypatch) -> None:
    class Chatty(FedAvg):
        name = "test_chatty"

        def local_update(self, client, state, payload):
            state, reply = super().local_update(client, state, payload)
            return state, ({**reply, "note": "hello"} if client.id == 2 else reply)

    monkeypatch.setitem(ALGORITHMS, "test_chatty", Chatty)
    result = fedpal.run(tiny("test_chatty", train={"rounds": 2}))
    assert result.summary["rejected_replies"] == 2
    assert result.summary["bytes"]["up"] == 2 * 3 * (PARAM_BYTES + 8)  # client 2's reply cannot be counted


# --------------------------------------------------------------------------------------------- schedule, selection


def test_eval_every_and_last_round_always_evaluated(tiny, metrics_of, tmp_path: Path) -> None:
    result = fedpal.run(tiny(train={"rounds": 5}, eval={"every": 2}), out=tmp_path / "run")
    assert [e["round"] for e in metrics_of(tmp_path / "run")] == [2, 4, 5]
    assert [e["round"] for e in result.metrics] == [2, 4, 5]
    assert result.summary["rounds"] == 5


def test_selected_round_is_the_minimum_validation_loss(tiny, metrics_of, tmp_path: Path) -> None:
    # a large learning rate makes the validation loss go up and down
    result = fedpal.run(tiny(train={"rounds": 6, "lr": 1.0}), out=tmp_path / "run")
    metrics = metrics_of(tmp_path / "run")
    losses = [e["validation"]["loss"] for e in metrics]
    best = metrics[losses.index(min(losses))]
    selected = json.loads((tmp_path / "run" / "summary.json").read_text())["selected_round"]
    assert selected["round"] == best["round"] == result.summary["selected_round"]["round"]
    assert selected["criterion"] == "validation_loss"
    for key in ("personalized", "generalization", "global", "validation"):
        assert selected[key] == best[key]
    last = json.loads((tmp_path / "run" / "summary.json").read_text())["last_round"]
    assert last["round"] == 6 and last["personalized"] == metrics[-1]["personalized"]


def _entry(round: int, val_loss: float, acc: float) -> dict:
    return {
        "round": round,
        "personalized": {"accuracy": acc, "per_client_accuracy": [acc]},
        "generalization": {"accuracy": acc},
        "global": None,
        "validation": {"loss": val_loss, "accuracy": acc},
    }


def test_build_summary_selection_rules(tiny) -> None:
    from fedpal.engine.driver import Counters

    cfg = from_dict(tiny(eval={"report_best_by_test": True}))
    history = [_entry(1, 0.9, 0.5), _entry(2, 0.4, 0.6), _entry(3, float("nan"), 0.9), _entry(4, 0.4, 0.7)]
    s = build_summary(cfg, history, Counters())
    assert s["selected_round"]["round"] == 2  # the minimum; a tie goes to the earlier round; NaN never wins
    assert s["last_round"]["round"] == 4 and s["rounds"] == 4
    assert s["personalized"]["accuracy"] == 0.7  # headline numbers are the last round's
    assert s["best_by_test"]["round"] == 3 and "optimistic" in s["best_by_test"]["note"]
    plain = build_summary(from_dict(tiny()), history, Counters())
    assert "best_by_test" not in plain


def test_stability_is_the_spread_of_personalized_accuracy_over_the_last_half(tiny) -> None:
    from fedpal.engine.driver import Counters

    accuracies = {2: 0.1, 4: 0.5, 6: 0.6, 8: 0.8, 10: 0.7}
    history = [_entry(r, 1.0, a) for r, a in accuracies.items()]
    s = build_summary(from_dict(tiny()), history, Counters())
    late = [0.6, 0.8, 0.7]  # rounds 6, 8, 10: after round 10 / 2; round 4's 0.5 is not in the late half
    mean = sum(late) / 3
    assert s["stability"]["personalized_accuracy_std"] == pytest.approx((sum((a - mean) ** 2 for a in late) / 3) ** 0.5)
    assert s["stability"]["evaluations"] == 3 and s["stability"]["after_round"] == 5
    # successive changes +0.2, -0.1: sqrt((0.04 + 0.01) / (2 * 2))
    assert s["stability"]["personalized_accuracy_fluctuation"] == pytest.approx((0.05 / 4) ** 0.5)
    flat = build_summary(from_dict(tiny()), [_entry(r, 1.0, 0.5) for r in (1, 2, 3, 4)], Counters())
    assert flat["stability"]["personalized_accuracy_std"] == 0.0
    once = build_summary(from_dict(tiny()), [_entry(1, 1.0, 0.5)], Counters())
    assert once["stability"]["personalized_accuracy_std"] is None  # one evaluation has no spread
    assert once["stability"]["personalized_accuracy_fluctuation"] is None


def test_a_steady_climb_has_a_spread_but_no_fluctuation(tiny) -> None:
    """Accuracy rising by the same step every evaluation: the plain std counts the trend, the fluctuation does not
    (it is step / sqrt(2) for a constant step, far below the std once the climb spans many steps)."""
    from fedpal.engine.driver import Counters

    history = [_entry(r, 1.0, 0.5 + 0.01 * r) for r in range(1, 21)]
    s = build_summary(from_dict(tiny()), history, Counters())["stability"]
    assert s["personalized_accuracy_fluctuation"] == pytest.approx(0.01 / 2**0.5)
    assert s["personalized_accuracy_std"] > 2 * s["personalized_accuracy_fluctuation"]


def test_resumed_run_logs_each_rejection_once(tiny, bad_reply_algorithm, tmp_path: Path) -> None:
    raw = tiny("test_bad_replies", train={"rounds": 4}, run={"progress": False, "checkpoint_every": 2})
    with interrupted_at(4):  # rounds 1-3 ran and logged; the checkpoint holds round 2
        fedpal.run(raw, out=tmp_path / "run")
    fedpal.resume(tmp_path / "run")
    log = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert len(log) == 2 * 4
    assert [int(line.split()[1].rstrip(":")) for line in log] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_logs(monkeypatch, capsys) -> None:
    import sys

    from fedpal.engine.progress import Progress

    plain = Progress(4, "fedavg")
    for r in (1, 2, 3, 4):
        plain.update(r, {"acc": 0.5} if r % 2 == 0 else None)
    plain.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("s/round" in line and "s left" in line for line in lines)
    assert lines[0].startswith("fedavg round 2/4") and "acc 0.5000" in lines[0]

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = Progress(4, "fedavg")
    bar.update(3, {"acc": 0.75})  # a resumed run: the bar starts at round 2
    bar.close()
    err = capsys.readouterr().err
    assert "3/4" in err and "acc=0.7500" in err
