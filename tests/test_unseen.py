"""Unseen clients (held out of training, evaluated after the method's adaptation) and the two generalization pools."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import interrupted_at
from torch import nn

import fedpal
from fedpal.algorithms.core.contract import Algorithm, ClientView
from fedpal.algorithms.core.training import LocalTrainer, TrainSettings
from fedpal.algorithms.reference.local import Local
from fedpal.algorithms.weight_sharing.fedavg import FedAvg
from fedpal.cli import main
from fedpal.config import EvalConfig, from_dict, to_toml
from fedpal.data import federated
from fedpal.data.client_data import FederatedData
from fedpal.data.federated import build_federated_data
from fedpal.data.sources.base import Dataset
from fedpal.engine.simulator import Simulator
from fedpal.errors import ConfigError
from fedpal.evaluation.evaluator import Evaluator
from fedpal.evaluation.metrics import macro_f1


def simulator(raw: dict) -> Simulator:
    cfg = from_dict(raw)
    return Simulator(cfg, build_federated_data(cfg.data, cfg.seed), progress=False)


# --------------------------------------------------------------------------------------------- the data


def test_held_out_clients_are_disjoint_counted_and_split_as_before(tiny) -> None:
    everyone = build_federated_data(from_dict(tiny(data={"num_clients": 6})).data, 0)
    data = build_federated_data(from_dict(tiny(data={"num_clients": 6, "unseen_clients": 2})).data, 0)
    assert data.num_clients == 4 and len(data.unseen) == 2
    assert set(data.client_ids).isdisjoint(data.unseen_ids)
    assert sorted(data.client_ids + data.unseen_ids) == list(range(6))
    # every client, held out or not, has exactly the splits it has in the full federation (digits: no normalising)
    pairs = list(zip(data.clients, data.client_ids, strict=True)) + list(zip(data.unseen, data.unseen_ids, strict=True))
    for client, original in pairs:
        for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            assert torch.equal(getattr(client, name), getattr(everyone.clients[original], name))
    # the held-out clients' test data stay out of the federation's pooled test set and generalization sample
    evaluator = Evaluator(data, EvalConfig(generalization_samples=100), seed=0)
    assert evaluator.test_y.numel() == sum(c.test_y.numel() for c in data.clients)


def _sensor_dataset(users: int = 4, per_user: int = 30) -> Dataset:
    """A HAR-like dataset: 6 channels in two z-scored groups, one offset and scale per user so the statistics
    of any subset of users differ from those of any other."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(10.0 * u, 1.0 + u, size=(per_user, 6, 8)) for u in range(users)])
    y = np.tile(np.arange(3), users * per_user // 3).astype(np.int64)
    groups = np.repeat(np.arange(users), per_user).astype(np.int64)
    order = np.tile(np.arange(per_user), users).astype(np.int64)
    return Dataset("sensors", x.astype(np.float32), y, 3, ("a", "b", "c"), groups, order, ((0, 1, 2), (3, 4, 5)))


def test_normalisation_statistics_come_from_the_training_clients_only(tiny, monkeypatch) -> None:
    monkeypatch.setattr(federated, "load_dataset", lambda name, options: _sensor_dataset())
    cfg = from_dict(tiny(data={"partition": "natural", "num_clients": 0, "unseen_clients": 1, "max_samples": 0}))
    data = build_federated_data(cfg.data, cfg.seed)
    assert data.num_clients == 3 and len(data.unseen) == 1  # whole users held out
    train = torch.cat([c.train_x for c in data.clients]).double()
    for group in ((0, 1, 2), (3, 4, 5)):
        values = train[:, list(group)]
        assert float(values.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(values.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    held_out = data.unseen[0].train_x.double()
    assert abs(float(held_out.mean())) > 0.1  # with its data in the statistics, the pool above would not be 0 / 1


def test_too_many_unseen_users_is_a_config_error(tiny, monkeypatch) -> None:
    monkeypatch.setattr(federated, "load_dataset", lambda name, options: _sensor_dataset())
    cfg = from_dict(tiny(data={"partition": "natural", "num_clients": 0, "unseen_clients": 4, "max_samples": 0}))
    with pytest.raises(ConfigError, match=r"data\.unseen_clients"):
        build_federated_data(cfg.data, cfg.seed)


def test_bad_unseen_clients_is_one_line_exit_2(capsys, tiny, tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(tiny()))
    for value in ("4", "-1"):  # the tiny federation has 4 clients
        code = main(
            ["run", str(path), "--out", str(tmp_path / "out"), "--quiet", "--set", f"data.unseen_clients={value}"]
        )
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert len(err.splitlines()) == 1 and err.startswith("fedpal: error:") and "data.unseen_clients" in err
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- the hook


def test_unseen_data_never_reach_training(tiny) -> None:
    """Every local update during training sees a training client's tensors; the held-out ones appear only in
    their adaptation, after the last round."""
    sim = simulator(tiny(train={"rounds": 2}, data={"num_clients": 5, "unseen_clients": 2}))
    seen: list[tuple[int, int, int]] = []
    original = sim.algorithm.local_update

    def spy(client, state, payload):
        seen.append((client.round, client.id, client.train_x.data_ptr()))
        return original(client, state, payload)

    sim.algorithm.local_update = spy  # type: ignore[method-assign]
    summary = sim.run()
    n = sim.data.num_clients
    training, adaptation = seen[: 2 * n], seen[2 * n :]
    assert [(r, cid) for r, cid, _ in training] == [(r, cid) for r in (1, 2) for cid in range(n)]
    assert all(ptr == sim.data.clients[cid].train_x.data_ptr() for _, cid, ptr in training)
    assert [(r, cid) for r, cid, _ in adaptation] == [(2, n), (2, n + 1)]
    assert [ptr for *_, ptr in adaptation] == [c.train_x.data_ptr() for c in sim.data.unseen]
    assert summary["unseen"]["clients"] == 2 and summary["unseen"]["client_ids"] == sim.data.unseen_ids


@pytest.mark.parametrize("cls", [FedAvg, Local])
def test_default_adaptation_is_one_local_update_and_leaves_the_server_alone(tiny, cls) -> None:
    sim = simulator(tiny(cls.name, data={"num_clients": 5, "unseen_clients": 1}))
    sim.initialize()
    sim.run_round(1)
    before = {k: v.clone() for k, v in sim.server.get("params", {}).items()}
    server_keys = set(sim.server)
    calls = []
    original = sim.algorithm.local_update

    def spy(client, state, payload):
        calls.append((client.id, payload))
        return original(client, state, payload)

    sim.algorithm.local_update = spy  # type: ignore[method-assign]
    view = sim.view(4, 1)
    steps = sim.assembly.local_steps()
    payload = sim.algorithm.configure(sim.server, 1, [4])[4]
    state = sim.algorithm.adapt_unseen(view, sim.algorithm.init_client(view), payload)
    assert [cid for cid, _ in calls] == [4]
    assert sim.assembly.local_steps() - steps == math.ceil(view.num_train / 32)  # one local epoch
    assert set(sim.server) == server_keys
    for name, value in before.items():
        assert torch.equal(sim.server["params"][name], value)
    if cls is Local:  # a fresh model trained once on the held-out client's data
        expected = view.fit(view.own_initial_params()).params
        assert all(torch.equal(state["params"][k], expected[k]) for k in expected)
    else:  # the payload of the final server state
        assert all(torch.equal(calls[0][1]["params"][k], v) for k, v in before.items())


def test_fedavg_zero_shot_is_the_global_model_on_the_unseen_test_splits(tiny, tmp_path: Path) -> None:
    sim = simulator(tiny(train={"rounds": 2}, data={"num_clients": 6, "unseen_clients": 2}))
    summary = sim.run()
    unseen = summary["unseen"]
    params = sim.algorithm.global_params(sim.server)
    correct, total, f1s = 0, 0, []
    for client in sim.data.unseen:
        predictions = sim.trainer.predict(params, client.test_x).argmax(dim=1).numpy()
        labels = client.test_y.numpy()
        correct, total = correct + int((predictions == labels).sum()), total + labels.size
        f1s.append(macro_f1(predictions, labels, sim.data.num_classes))
    assert unseen["zero_shot"]["accuracy"] == pytest.approx(correct / total)
    assert unseen["zero_shot"]["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    assert unseen["zero_shot"]["per_client_samples"] == [c.test_y.numel() for c in sim.data.unseen]
    # FedAvg's personalized model is the global model: adaptation changes nothing it evaluates
    assert unseen["personalized"]["accuracy"] == unseen["zero_shot"]["accuracy"]
    assert unseen["adaptation_steps"] > 0
    # in the last metrics entry only, and in the summary
    assert "unseen" not in sim.history[0] and sim.history[-1]["unseen"] == unseen
    assert fedpal.run(tiny(train={"rounds": 1})).summary["unseen"] is None


def test_unseen_summary_on_disk_and_in_the_report(tiny, tmp_path: Path) -> None:
    from fedpal.report import read_run, runs_markdown_table

    fedpal.run(tiny("local", train={"rounds": 2}, data={"unseen_clients": 1}), out=tmp_path / "held")
    fedpal.run(tiny("local", train={"rounds": 2}), out=tmp_path / "plain")
    summary = json.loads((tmp_path / "held" / "summary.json").read_text())
    assert summary["unseen"]["zero_shot"] is None  # Local has no global model
    assert summary["num_clients"] == 3
    table = runs_markdown_table([read_run(tmp_path / "held"), read_run(tmp_path / "plain")])
    assert "Unseen acc (%)" in table and "Unseen zero-shot" not in table  # no run has a zero-shot number
    assert f"{100 * summary['unseen']['personalized']['accuracy']:.2f}" in table
    assert "Unseen" not in runs_markdown_table([read_run(tmp_path / "plain")])


# --------------------------------------------------------------------------------------------- resume


def test_resume_gives_the_same_unseen_numbers(tiny, strip_wall, metrics_of, tmp_path: Path) -> None:
    raw = tiny("fedavg_ft", train={"rounds": 3}, data={"num_clients": 5, "unseen_clients": 2})
    reference = fedpal.run(raw, out=tmp_path / "reference")
    with interrupted_at(3):
        fedpal.run(raw, out=tmp_path / "interrupted")
    resumed = fedpal.resume(tmp_path / "interrupted")
    assert resumed.summary["unseen"] == reference.summary["unseen"]
    assert strip_wall(resumed.summary) == strip_wall(reference.summary)
    assert strip_wall(metrics_of(tmp_path / "interrupted")) == strip_wall(metrics_of(tmp_path / "reference"))
    again = fedpal.resume(tmp_path / "interrupted")  # a finished run keeps its unseen evaluation
    assert again.summary["unseen"] == reference.summary["unseen"]


# --------------------------------------------------------------------------------------------- hand-computed


C = 3


def _constant(k: int) -> dict[str, torch.Tensor]:
    """Linear-layer tensors that predict class k whatever the input."""
    return {"weight": torch.zeros(C, C), "bias": 10.0 * torch.eye(C)[k]}


class ByClient(Algorithm):
    """Client i predicts class i mod 3; the global model reads the input's one-hot code."""

    name = "by_client"

    def __init__(self) -> None:
        super().__init__(None, None)  # type: ignore[arg-type]

    def init_server(self):
        return {}

    def configure(self, state, round, client_ids):
        return {cid: {} for cid in client_ids}

    def aggregate(self, state, round, replies, reduce):
        return state

    def local_update(self, client, state, payload):
        return state, {}

    def personalized_params(self, client, state, payload):
        return _constant(client.id % C)

    def global_params(self, server):
        return {"weight": torch.eye(C), "bias": torch.zeros(C)}


def _views(data: FederatedData):
    trainer = LocalTrainer(nn.Linear(C, C), TrainSettings())

    def view(cid: int) -> ClientView:
        c = data.client(cid)
        return ClientView(cid, 0, 0, c.train_x, c.train_y, c.val_x, c.val_y, trainer)

    return view


def test_both_generalization_pools_by_hand(hand_data) -> None:
    """Client i predicts i on the 13 pooled test samples (labels: four 0s, six 1s, three 2s)."""
    results = {
        own: Evaluator(
            hand_data, EvalConfig(generalization_samples=1000, generalization_include_own=own), seed=0
        ).evaluate(ByClient(), {}, {cid: {} for cid in range(3)}, {cid: {} for cid in range(3)}, _views(hand_data))[
            "generalization"
        ]
        for own in (False, True)
    }
    others_acc = [2 / 9, 3 / 9, 1 / 8]  # see test_metrics: each client's own samples left out
    others_f1 = [(4 / 11) / 3, (6 / 12) / 3, (2 / 9) / 3]
    all_acc = [4 / 13, 6 / 13, 3 / 13]
    # client k predicts k on all 13: tp = support = n_k, predicted 13 -> 2 n_k / (n_k + 13), 3 classes present
    all_f1 = [(8 / 17) / 3, (12 / 19) / 3, (6 / 16) / 3]
    for g in results.values():
        assert g["others"]["accuracy"] == pytest.approx(np.mean(others_acc))
        assert g["others"]["macro_f1"] == pytest.approx(np.mean(others_f1))
        assert g["all"]["accuracy"] == pytest.approx(np.mean(all_acc))
        assert g["all"]["macro_f1"] == pytest.approx(np.mean(all_f1))
    assert results[False]["accuracy"] == results[False]["others"]["accuracy"]
    assert results[True]["accuracy"] == results[True]["all"]["accuracy"]
    assert results[True]["macro_f1"] == results[True]["all"]["macro_f1"]
    assert results[True]["accuracy_std"] == pytest.approx(np.std(all_acc))


def test_evaluate_unseen_by_hand(hand_data) -> None:
    """Hand clients 0 and 1 train; client 2 (test labels [2, 2, 0, 1, 1], one sample coded 0) is held out as id 2."""
    data = FederatedData("hand", C, ("a", "b", "c"), (C,), hand_data.clients[:2], unseen=hand_data.clients[2:])
    assert data.unseen_ids == [2]
    evaluator = Evaluator(data, EvalConfig(generalization_samples=1000), seed=0)
    u = evaluator.evaluate_unseen(ByClient(), {}, {2: {}}, {2: {}}, _views(data))
    assert u["clients"] == 1 and u["client_ids"] == [2]
    assert u["personalized"]["accuracy"] == pytest.approx(2 / 5)  # predicts 2 everywhere
    assert u["personalized"]["macro_f1"] == pytest.approx((2 * 2 / (2 + 5)) / 3)
    assert u["zero_shot"]["accuracy"] == pytest.approx(4 / 5)  # reads the code: wrong on the one mis-coded sample
    # zero-shot: class 0 tp 1, support 1, predicted 2 -> 2/3; class 1: 1; class 2 tp 1, support 2, predicted 1 -> 2/3
    assert u["zero_shot"]["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert "inference" not in u
