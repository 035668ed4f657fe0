"""FedAvgM and CFL against their equations (specs/pfl_baselines.md §5-§6): server momentum on the pseudo-gradient;
clusters split by the cosine similarity of updates when the mean update is small and some update is large."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import interrupted_at, one_round, personalized, run_rounds, simulator, tiny_config
from tests.test_conformance import IsolatedExecutor, ReversedExecutor, assert_same_run, same
from tests.test_engine_contract import FirstClientReducer
from torch.nn import functional as F

from fedpal.algorithms.core.contract import AlgorithmSetup
from fedpal.algorithms.core.training import TrainSettings
from fedpal.algorithms.weight_sharing.cfl import CFL, CFLHyperparameters, bipartition
from fedpal.algorithms.weight_sharing.fedavgm import FedAvgM, FedAvgMHyperparameters
from fedpal.config import from_dict
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.data.federated import build_federated_data
from fedpal.engine.driver import sample_clients
from fedpal.engine.reduction import MeanReducer
from fedpal.engine.run_directory import RunDirectory
from fedpal.engine.simulator import Simulator
from fedpal.errors import UserError

# --------------------------------------------------------------------------------------------- FedAvgM


def fedavgm(beta: float, server_lr: float = 1.0) -> FedAvgM:
    params = {"w": torch.tensor([1.0, -2.0, 0.75]), "b": torch.tensor([0.5])}
    return FedAvgM(
        FedAvgMHyperparameters(beta=beta, server_lr=server_lr), AlgorithmSetup(3, TrainSettings(), params, 0)
    )


def test_fedavgm_with_beta_zero_is_fedavg_bit_for_bit(tiny) -> None:
    avg = run_rounds(simulator(tiny("fedavg")), 3)
    avgm = run_rounds(simulator(tiny("fedavgm", algorithm={"beta": 0.0})), 3)
    assert avg.server["params"].keys() == avgm.server["params"].keys()
    assert all(torch.equal(v, avgm.server["params"][k]) for k, v in avg.server["params"].items())
    with_momentum = run_rounds(simulator(tiny("fedavgm")), 3)  # the default beta = 0.9 does move elsewhere
    assert not all(torch.equal(v, with_momentum.server["params"][k]) for k, v in avg.server["params"].items())


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_fedavgm_constant_pseudo_gradient_gives_the_geometric_momentum(server_lr: float) -> None:
    """Every client returns w^t - g, so Delta = g each round: v_t = g (1 - beta^t) / (1 - beta) and
    w_t = w_0 - lr * sum_s v_s. Unequal sample counts: the official FedFomo variant (only the last client's weighted
    delta in v, one step per client) would give 5/8 g and three steps."""
    beta = 0.9
    algorithm = fedavgm(beta, server_lr)
    g = {"w": torch.tensor([0.25, -0.5, 0.125]), "b": torch.tensor([1.0])}
    state = algorithm.init_server()
    w0 = {k: v.double() for k, v in state["params"].items()}
    steps = {k: torch.zeros_like(v) for k, v in w0.items()}
    for t in range(1, 7):
        sent = {k: v - g[k] for k, v in state["params"].items()}  # w^t - g
        replies = {cid: {"params": sent, "num_samples": n} for cid, n in ((0, 1), (3, 2), (5, 5))}
        state = algorithm.aggregate(state, t, replies, MeanReducer())
        for k in g:
            expected_v = g[k].double() * (1 - beta**t) / (1 - beta)
            assert torch.allclose(state["momentum"][k], expected_v, rtol=1e-6, atol=1e-7)
            steps[k] += expected_v
            assert torch.allclose(state["params"][k].double(), w0[k] - server_lr * steps[k], rtol=1e-6, atol=1e-6)


def test_fedavgm_one_client_with_beta_zero_lands_on_its_model() -> None:
    algorithm = fedavgm(0.0)
    state = algorithm.init_server()
    state["momentum"] = {k: torch.full(v.shape, 3.0, dtype=torch.float64) for k, v in state["params"].items()}
    w_i = {"w": torch.tensor([0.1, 0.2, -0.3]), "b": torch.tensor([7.0])}
    w_t = state["params"]
    state = algorithm.aggregate(state, 1, {2: {"params": w_i, "num_samples": 13}}, MeanReducer())
    assert all(torch.equal(state["params"][k], w_i[k]) for k in w_i)  # n_i / n = 1: w^{t+1} = w_i exactly
    assert all(torch.equal(state["momentum"][k], w_t[k].double() - w_i[k].double()) for k in w_i)  # v = Delta


def test_fedavgm_averages_through_the_engines_reducer(tiny) -> None:
    sim = simulator(tiny("fedavgm", algorithm={"beta": 0.0}))
    sim.reduce = FirstClientReducer()  # not a mean: the lowest-id client's model
    _, replies = one_round(sim)
    assert sim.reduce.calls == {"update": 1}
    assert all(torch.equal(sim.server["params"][k], v) for k, v in replies[0]["params"].items())


def test_fedavgm_refuses_momentum_outside_zero_one(tiny) -> None:
    with pytest.raises(UserError, match="beta"):
        simulator(tiny("fedavgm", algorithm={"beta": 1.0}))


# --------------------------------------------------------------------------------------------- CFL


def cfl(n: int = 5, **hp: Any) -> CFL:
    """CFL over n clients of a two-number model at zero."""
    setup = AlgorithmSetup(2, TrainSettings(), {"w": torch.zeros(2)}, 0, num_clients=n)
    return CFL(CFLHyperparameters(**hp), setup)


def hand_replies() -> dict[int, dict[str, Any]]:
    """Clients 0..3 replied (4 did not): two pairs of opposite updates; mean (0, 0.25), largest norm sqrt(1.25)."""
    d = {0: [1.0, 0.0], 1: [1.0, 0.0], 2: [-1.0, 0.5], 3: [-1.0, 0.5]}
    return {cid: {"update": {"w": torch.tensor(v)}} for cid, v in d.items()}


SPLITS = dict(eps1=0.3, eps2=1.0, split_after_round=1)


def test_cfl_hand_case_splits_into_the_two_directions_and_moves_each_part_by_its_mean() -> None:
    algorithm = cfl(**SPLITS)
    state = algorithm.aggregate(algorithm.init_server(), 2, hand_replies(), MeanReducer())
    assert state["membership"].tolist() == [0, 0, 1, 1, 0]  # the part with client 0 keeps the id; 4 stays
    assert torch.equal(state["models"]["cluster_0"]["w"], torch.tensor([1.0, 0.0]))  # 0 + mean of {0, 1}
    assert torch.equal(state["models"]["cluster_1"]["w"], torch.tensor([-1.0, 0.5]))  # 0 + mean of {2, 3}
    assert state["mean_update_norm"] == pytest.approx(0.25) and state["max_update_norm"] == pytest.approx(1.25**0.5)
    assert state["splits"] == 1


@pytest.mark.parametrize(
    "change",
    [
        {"eps1": 0.25},  # ||mean Delta|| = 0.25 is not below eps1
        {"eps2": 1.2},  # max ||Delta_i|| = 1.118 is not above eps2
        {"split_after_round": 2},  # round 2 is not after round 2
        {"min_cluster_size_to_split": 5},  # only 4 members replied
    ],
)
def test_cfl_no_split_unless_every_condition_holds(change: dict[str, Any]) -> None:
    algorithm = cfl(**{**SPLITS, **change})
    state = algorithm.aggregate(algorithm.init_server(), 2, hand_replies(), MeanReducer())
    assert state["membership"].tolist() == [0] * 5 and list(state["models"]) == ["cluster_0"]
    assert torch.equal(state["models"]["cluster_0"]["w"], torch.tensor([0.0, 0.25]))  # unweighted mean update


def test_cfl_averages_through_the_engines_reducer() -> None:
    """Every mean update is the reducer's (here the lowest-id member's update, norm 1, which the split criterion
    then reads too): one per cluster, and one per part of a split cluster."""
    for hp, calls in (({"eps2": 1.2}, 1), ({"eps1": 2.0}, 3)):
        algorithm = cfl(**{**SPLITS, **hp})
        reducer = FirstClientReducer()
        state = algorithm.aggregate(algorithm.init_server(), 2, hand_replies(), reducer)
        assert reducer.calls == {"update": calls}
        assert torch.equal(state["models"]["cluster_0"]["w"], torch.tensor([1.0, 0.0]))  # client 0's update
        if calls == 3:
            assert torch.equal(state["models"]["cluster_1"]["w"], torch.tensor([-1.0, 0.5]))  # client 2's


def permuted_groups(per_group: int = 3) -> FederatedData:
    """IID digits clients; the second group (and the held-out client) see every label y as 9 - y."""
    cfg = from_dict(tiny_config("cfl", data={"partition": "iid", "num_clients": 2 * per_group + 1, "max_samples": 700}))
    data = build_federated_data(cfg.data, cfg.seed)

    def flip(c: ClientData) -> ClientData:
        return ClientData(c.train_x, 9 - c.train_y, c.val_x, 9 - c.val_y, c.test_x, 9 - c.test_y)

    clients = data.clients[:per_group] + [flip(c) for c in data.clients[per_group : 2 * per_group]]
    return FederatedData(
        data.dataset, data.num_classes, data.class_names, data.input_shape, clients, unseen=[flip(data.clients[-1])]
    )


def grouped(rounds: int = 2, **sections: Any) -> dict[str, Any]:
    algorithm = {"split_after_round": 1, "eps1": 10.0, "eps2": 0.0, **sections.pop("algorithm", {})}
    train = {"rounds": rounds, "local_epochs": 3, **sections.pop("train", {})}
    return tiny_config("cfl", data={"num_clients": 6}, train=train, algorithm=algorithm, **sections)


def test_cfl_recovers_two_groups_with_permuted_labels_and_places_a_new_client() -> None:
    data = permuted_groups()
    sim = simulator(grouped(), data)
    sim.run_round(1)  # joint training: no split before round 2
    assert sim.server["membership"].tolist() == [0] * 6
    sim.run_round(2)
    assert sim.server["membership"].tolist() == [0, 0, 0, 1, 1, 1]  # the two label maps, exactly
    models = [personalized(sim, cid, 2) for cid in range(6)]
    for cid in range(6):  # one model per cluster, held by every member
        assert all(torch.equal(models[cid][k], models[3 * (cid // 3)][k]) for k in models[cid])
    assert not torch.equal(models[0]["head.weight"], models[3]["head.weight"])
    # the held-out client (labels flipped) evaluates both cluster models on its training split and keeps the better
    unseen = 6
    view = sim.view(unseen, 2)
    payload = sim.algorithm.configure(sim.server, 2, [unseen])[unseen]
    state = sim.algorithm.adapt_unseen(view, sim.algorithm.init_client(view), payload)
    candidates = payload["clusters"]
    losses = [
        float(F.cross_entropy(view.trainer.predict(candidates[f"cluster_{k}"], view.train_x), view.train_y))
        for k in (0, 1)
    ]
    assert losses[1] < losses[0] and state["cluster"] == 1
    assert all(torch.equal(state["params"][k], sim.server["models"]["cluster_1"][k]) for k in state["params"])
    assert sim.algorithm.personalized_params(view, state, {}) is state["params"]


def test_cfl_members_of_a_cluster_share_its_model_and_unsampled_clients_keep_their_cluster() -> None:
    raw = grouped(4, algorithm={"split_after_round": 0}, train={"rounds": 4, "clients_per_round": 4})
    sim = simulator(raw, permuted_groups())
    for r in range(1, 5):
        before = sim.server["membership"].clone()
        sampled = sample_clients(sim.config, 6, r)
        sim.run_round(r)
        after = sim.server["membership"]
        assert all(int(after[c]) == int(before[c]) for c in range(6) if c not in sampled)
        payloads = sim.algorithm.configure_evaluation(sim.server, r, list(range(6)))
        for cid in range(6):
            assert payloads[cid]["params"] is sim.server["models"][f"cluster_{int(after[cid])}"]
    assert sim.server["splits"] >= 1 and len(sim.server["models"]) == sim.server["splits"] + 1


def test_cfl_runs_with_splits_keep_the_contract(tmp_path: Path) -> None:
    """With splits in rounds 1 and 2 (the conformance suite's default runs never split): clients in reverse order
    or on a separate assembly give the same run; interrupted after the split and resumed it ends bit-identical;
    the server state converts to a record and back."""
    raw = grouped(3, algorithm={"split_after_round": 0}, train={"rounds": 3, "clients_per_round": 5})
    cfg, data = from_dict(raw), permuted_groups()

    def run(executor: Any = None, run_dir: Path | None = None) -> Simulator:
        sim = Simulator(cfg, data, RunDirectory(run_dir) if run_dir else None, progress=False)
        if executor is not None:
            sim.executor = executor(sim.assembly)
        if run_dir is not None:
            sim.run_dir.create()  # type: ignore[union-attr]
        sim.run()
        return sim

    reference = run()
    assert reference.server["splits"] >= 2
    assert_same_run(run(ReversedExecutor), reference)
    assert_same_run(run(IsolatedExecutor), reference)
    with interrupted_at(3):
        run(run_dir=tmp_path)
    resumed = Simulator(cfg, data, RunDirectory(tmp_path), progress=False)
    resumed.restore(RunDirectory(tmp_path).load_checkpoint())
    resumed.run()
    assert_same_run(resumed, reference)
    records = pytest.importorskip("fedpal.flower.records")  # the server state converts to Flower's records exactly
    assert same(records.from_records(records.to_records(reference.server)), reference.server)


def full_batch_sim(**algorithm: Any) -> Simulator:
    """One SGD step per local update (full batch, one epoch), so an update is -lr times a gradient."""
    momentum = algorithm.pop("momentum", 0.0)
    train = {"batch_size": 10_000, "local_epochs": 1, "lr": 0.5, "momentum": momentum}
    return simulator(tiny_config("cfl", train=train, algorithm=algorithm))


def gradient(sim: Simulator, cid: int, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d CE / d params on the client's whole training split, by autograd."""
    view = sim.view(cid, 1)
    module = view.trainer.module
    view.trainer.load(params)
    module.train()
    module.zero_grad()
    F.cross_entropy(module(view.train_x), view.train_y).backward()
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()}  # type: ignore[union-attr]


def client_round(sim: Simulator, cid: int, round: int) -> dict[str, torch.Tensor]:
    """Client cid alone trains this round and the server aggregates its update; returns the update."""
    payload = sim.algorithm.configure(sim.server, round, [cid])[cid]
    sim.clients[cid], reply = sim.algorithm.local_update(sim.view(cid, round), sim.clients[cid], payload)
    sim.server = sim.algorithm.aggregate(sim.server, round, {cid: reply}, sim.reduce)
    return reply["update"]


def test_cfl_nth_local_update_runs_at_the_decayed_learning_rate() -> None:
    sim = full_batch_sim(lr_decay=0.9)
    for n in (1, 2):
        theta = dict(sim.server["models"]["cluster_0"])
        grad = gradient(sim, 0, theta)
        update = client_round(sim, 0, n)
        for k, g in grad.items():  # Delta = -lr * 0.9^n * grad
            assert torch.allclose(update[k], -0.5 * 0.9**n * g, atol=1e-6)
    assert sim.clients[0]["local_updates"] == 2 and "momentum" not in sim.clients[0]


@pytest.mark.parametrize("keep", [True, False])
def test_cfl_momentum_buffers_carry_over_between_a_clients_rounds(keep: bool) -> None:
    """Heavy ball with the buffer kept: round 1 leaves b_1 = g_0; round 2 steps by -lr (0.9 b_1 + g_1). Fresh buffers
    (keep_momentum = false) step by -lr g_1."""
    sim = full_batch_sim(lr_decay=1.0, keep_momentum=keep, momentum=0.9)
    g0 = gradient(sim, 0, dict(sim.server["models"]["cluster_0"]))
    client_round(sim, 0, 1)
    if keep:
        assert all(torch.allclose(sim.clients[0]["momentum"][k], g, atol=1e-7) for k, g in g0.items())
    g1 = gradient(sim, 0, dict(sim.server["models"]["cluster_0"]))
    update = client_round(sim, 0, 2)
    for k in g1:
        expected = -0.5 * (0.9 * g0[k] + g1[k]) if keep else -0.5 * g1[k]
        assert torch.allclose(update[k], expected, atol=1e-6)


def test_cfl_without_scikit_learn_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)  # import fails
    with pytest.raises(UserError, match=r"pip install 'fedpal\[cluster\]'"):
        bipartition(torch.eye(3).numpy())
    with pytest.raises(UserError, match="min_cluster_size_to_split"):
        cfl(min_cluster_size_to_split=1)
