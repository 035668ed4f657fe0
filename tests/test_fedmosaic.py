"""FedMosaic and its adapter baselines in the engine (spec fedmosaic.md §8, the checks that need the algorithm): no
sharing in the first round, lora1 from the other clients by relevance, what trains and what stays frozen, the
signature in the reply, relevance that finds the clients with the same task, and the A/B alignment a mixed-size run
does before training. The RELA math itself is tested in test_relevance.py, the adapter layer in test_adapters.py."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from tests.conftest import tiny_config

from fedpal.config import from_dict
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.data.federated import build_federated_data
from fedpal.engine.simulator import Simulator
from fedpal.errors import ConfigError
from fedpal.models.adapters import adapted_layers, set_adapter_mixing

MOSAIC = {"name": "mosaic_small", "feature_dim": 8, "adapters": True, "adapter_init": "random"}


def config(name: str = "fedmosaic", family: bool = False, **algorithm: Any) -> Any:
    model = {**MOSAIC, "family": "mosaic"} if family else dict(MOSAIC)
    raw = tiny_config(name, model=model, train={"rounds": 2}, algorithm={"local_steps": 6, **algorithm})
    raw["eval"]["generalization_samples"] = 0
    return from_dict(raw)


def two_task_clients(per_client: int = 60) -> FederatedData:
    """Four clients of the 8x8 digits: clients 0 and 2 hold digits 0-4, clients 1 and 3 digits 5-9 (so with a
    two-trunk family each task has one small and one large client)."""
    cfg = from_dict(tiny_config("local", data={"partition": "iid", "num_clients": 1, "max_samples": 1797}))
    pool = build_federated_data(cfg.data, 0).clients[0]
    x = torch.cat([pool.train_x, pool.val_x, pool.test_x])
    y = torch.cat([pool.train_y, pool.val_y, pool.test_y])
    low, high = torch.nonzero(y < 5).squeeze(1), torch.nonzero(y >= 5).squeeze(1)
    clients = []
    for cid in range(4):
        rows = (low if cid % 2 == 0 else high)[(cid // 2) * per_client : (cid // 2 + 1) * per_client]
        tr, va, te = rows[: per_client // 2], rows[per_client // 2 : 3 * per_client // 4], rows[3 * per_client // 4 :]
        clients.append(ClientData(x[tr], y[tr], x[va], y[va], x[te], y[te]))
    return FederatedData("digits", 10, tuple(str(c) for c in range(10)), (1, 8, 8), clients)


def test_an_adapter_method_refuses_a_model_without_adapters() -> None:
    raw = tiny_config("fedmosaic", model={"name": "mosaic_small", "feature_dim": 8})
    cfg = from_dict(raw)
    with pytest.raises(ConfigError, match=r"model\.adapters = true"):
        Simulator(cfg, build_federated_data(cfg.data, cfg.seed), progress=False)


def test_the_first_round_shares_nothing_and_later_rounds_mix_the_other_clients() -> None:
    sim = Simulator(config(), two_task_clients(), progress=False)
    algorithm = sim.algorithm
    nothing_known = algorithm.init_server()
    assert algorithm.configure(nothing_known, 1, [0, 1, 2, 3]) == {cid: {} for cid in range(4)}
    sim.run()
    payloads = algorithm.configure(sim.server, 3, [0, 1, 2, 3])
    stored = sim.server["lora2"]
    omega, _ = algorithm.weights(sim.server, [0, 1, 2, 3])
    for cid, payload in payloads.items():
        lora1 = payload["lora1"]
        for key, tensor in lora1.items():  # one architecture: every key is the omega-weighted mean of the others
            expected = sum(float(omega[cid, j]) * stored[str(j)][key].double() for j in range(4) if j != cid)
            torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-9)
        assert float(omega[cid, cid]) == 0.0 and math.isclose(float(omega[cid].sum()), 1.0)


def test_relevance_prefers_the_client_with_the_same_task() -> None:
    """Clients 0 and 2 share a task (digits 0-4), 1 and 3 the other: each client's signature is closest to its
    task partner's, and RELA gives that partner the largest weight. Single-example signatures are noisy, so this
    takes 20 of them a round (the official every-10th-step rule with 40 steps gives 4)."""
    sim = Simulator(config(local_steps=40, signature_every=2), two_task_clients(), progress=False)
    sim.run()
    matrices = sim.algorithm.server_matrices(sim.server)
    relevance, weights = matrices["relevance"], matrices["weights"]
    for cid in range(4):
        partner = (cid + 2) % 4
        others = [j for j in range(4) if j not in (cid, partner)]
        assert all(relevance[cid, partner] > relevance[cid, j] for j in others)
        assert int(weights[cid].argmax()) == partner


def test_local_training_moves_lora2_and_the_gate_only() -> None:
    """lora1 and the frozen trunk stay as loaded, lora2 and w_gate move, w_noise never trains (no gradient reaches
    it), and the reply carries lora2 and the sanitised signature (40 % of the reference's down-projection rows)."""
    sim = Simulator(config(), two_task_clients(), progress=False)
    algorithm = sim.algorithm
    view = sim.assembly.view(0, 1)
    state = algorithm.init_client(view)
    before = {name: p.detach().clone() for name, p in view.trainer.module.named_parameters()}
    new_state, reply = algorithm.local_update(view, state, {})
    for key in state["lora1"]:
        torch.testing.assert_close(new_state["lora1"][key], state["lora1"][key], rtol=0, atol=0)
    assert any(not torch.equal(new_state["lora2"][k], state["lora2"][k]) for k in state["lora2"])
    gates = [k for k in new_state["gate"] if k.endswith(".gate")]
    noises = [k for k in new_state["gate"] if k.endswith(".noise")]
    assert gates and noises
    assert any(not torch.equal(new_state["gate"][k], state["gate"][k]) for k in gates)
    assert all(torch.equal(new_state["gate"][k], state["gate"][k]) for k in noises)
    frozen = [n for n in before if ".base." in n or n.startswith("head.") or ".A" in n[-2:] or ".B" in n[-2:]]
    after = dict(view.trainer.module.named_parameters())
    assert frozen and all(torch.equal(after[n], before[n]) for n in frozen)
    assert set(reply) == {"lora2", "signature"}
    assert reply["signature"].shape == (math.floor(0.4 * 64), 4 * 64)


def test_the_gate_is_one_half_at_the_start_and_deterministic_in_evaluation() -> None:
    sim = Simulator(config(), two_task_clients(), progress=False)
    module = sim.assembly.trainers["mosaic_small"].module
    set_adapter_mixing(module, "gated")
    x = sim.data.clients[0].test_x[:5]
    layer = next(layer for _, layer in adapted_layers(module))
    inputs = torch.randn(5, 3, layer.in_features)
    module.eval()
    torch.testing.assert_close(layer.gate(inputs), torch.full((5,), 0.5))
    with torch.no_grad():
        torch.testing.assert_close(module(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sft", "fedavg_lora", "ditto_lora"])
def test_single_adapter_baselines_run_without_the_gate(name: str) -> None:
    """The baselines' one adapter: the output is W0 x + Ad2(x); the gate and lora1 take no part, so changing them
    changes nothing."""
    sim = Simulator(config(name), two_task_clients(), progress=False)
    sim.run()
    view = sim.assembly.view(0, 2)
    params = sim.algorithm.personalized_params(view, sim.clients[0], {})
    x = sim.data.clients[0].test_x
    module = view.trainer.module
    module.eval()
    with torch.no_grad():
        module.load_state_dict(params, strict=False)
        plain = module(x)
        for _, layer in adapted_layers(module):
            layer.gate_weight.add_(1.0)
            for attribute in layer.adapter_names("lora1"):
                getattr(layer, attribute).add_(0.5)
        torch.testing.assert_close(module(x), plain, rtol=0, atol=0)


def test_feddpa_global_adapter_is_the_plain_mean_of_its_architecture() -> None:
    sim = Simulator(config("feddpa", family=True), two_task_clients(), progress=False)
    sim.run()
    payloads = sim.algorithm.configure(sim.server, 3, [0, 1, 2, 3])
    # family order: clients 0, 2 run the small trunk, 1, 3 the large; each gets its architecture's mean
    assert payloads[0]["lora1"].keys() == payloads[2]["lora1"].keys()
    for key in payloads[0]["lora1"]:
        torch.testing.assert_close(payloads[0]["lora1"][key], payloads[2]["lora1"][key], rtol=0, atol=0)
    assert payloads[0]["lora1"].keys() != payloads[1]["lora1"].keys()


@pytest.mark.parametrize("stale_states", ["use_latest", "skip"])
def test_a_client_absent_last_round_is_left_out_only_when_stale_states_skip(stale_states: str) -> None:
    """Client 3 last uploaded in round 1, the others in round 2: for round 3, its stored adapter reaches client 0's
    lora1 under the official "use_latest" and not under "skip"."""
    sim = Simulator(config(stale_states=stale_states), two_task_clients(), progress=False)
    sim.run()
    state = {**sim.server, "updated": {**sim.server["updated"], "3": 1}}
    assert state["updated"]["0"] == 2
    before = sim.algorithm.configure(state, 3, [0])[0]["lora1"]
    moved = {**state, "lora2": {**state["lora2"], "3": {k: t + 1.0 for k, t in state["lora2"]["3"].items()}}}
    after = sim.algorithm.configure(moved, 3, [0])[0]["lora1"]
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert changed == (stale_states == "use_latest")


BASELINES = ["sft", "fedavg_lora", "ditto_lora", "feddpa"]


@pytest.mark.parametrize("name", ["fedmosaic", *BASELINES])
def test_only_fedmosaic_has_co_lora_and_the_baselines_train_a_and_b_in_every_layer(name: str) -> None:
    """The official code gives the baselines plain LoRA (or DualLoRA) with A and B trained in every layer;
    Co-LoRA (frozen A, B, P and Q shared across sizes) is FedMosaic's alone."""
    sim = Simulator(config(name), two_task_clients(), progress=False)
    layers = [layer for _, layer in adapted_layers(sim.assembly.trainers["mosaic_small"].module)]
    assert layers
    if name == "fedmosaic":
        assert any(layer.co_lora for layer in layers)
        return
    assert not any(layer.co_lora for layer in layers)
    view = sim.assembly.view(0, 1)
    state = sim.algorithm.init_client(view)
    new_state, _ = sim.algorithm.local_update(view, state, {})
    for suffix in (".A", ".B"):
        keys = [k for k in state["lora2"] if k.endswith(suffix)]
        assert len(keys) == len(layers)
        assert all(not torch.equal(new_state["lora2"][k], state["lora2"][k]) for k in keys)


def test_feddpa_trains_its_global_adapter_alone_first_then_its_local_one_in_the_even_mix() -> None:
    """The first half of the steps sees lora1 alone (so the client's lora2 cannot change what goes up); the second
    half trains lora2 against the lora1 just trained, which it leaves as it was; the reply is that lora1."""
    sim = Simulator(config("feddpa"), two_task_clients(), progress=False)
    algorithm = sim.algorithm
    state = algorithm.init_client(sim.assembly.view(0, 1))
    new_state, reply = algorithm.local_update(sim.assembly.view(0, 1), state, {})
    keys = list(state["lora1"])
    assert any(not torch.equal(reply["lora1"][k], state["lora1"][k]) for k in keys)
    assert all(torch.equal(new_state["lora1"][k], reply["lora1"][k]) for k in keys)
    assert any(not torch.equal(new_state["lora2"][k], state["lora2"][k]) for k in state["lora2"])
    other = {**state, "lora2": {k: t + 0.05 for k, t in state["lora2"].items()}}
    other_state, other_reply = algorithm.local_update(sim.assembly.view(0, 1), other, {})
    assert all(torch.equal(other_reply["lora1"][k], reply["lora1"][k]) for k in keys)
    assert any(not torch.equal(other_state["lora2"][k], new_state["lora2"][k]) for k in state["lora2"])


@pytest.mark.parametrize("name", ["fedavg_lora", "ditto_lora", "feddpa"])
def test_the_averaging_baselines_weigh_every_client_of_an_architecture_alike(name: str) -> None:
    """The official fedavg_aggregate_state_dict: a plain mean, whatever the clients' sample counts."""
    sim = Simulator(config(name), two_task_clients(), progress=False)
    algorithm = sim.algorithm
    key = algorithm.upload_key
    replies = {cid: {key: {"k": torch.full((2,), float(cid))}, "num_samples": 10 * (cid + 1)} for cid in range(4)}
    state = algorithm.aggregate(algorithm.init_server(), 1, replies, sim.reduce)
    sent = algorithm.configure(state, 2, [3])[3][algorithm.payload_key]
    torch.testing.assert_close(sent["k"], torch.full((2,), 1.5))


def test_ditto_pulls_by_the_fedmosaic_codes_coefficient() -> None:
    """The official Ditto adds 0.001 ||v - w||^2 to the personal loss: lam / 2 = 0.001 by default."""
    sim = Simulator(config("ditto_lora"), two_task_clients(), progress=False)
    anchor = {"a": torch.zeros(3), "b": torch.ones(2)}
    current = {"a": torch.nn.Parameter(torch.tensor([1.0, 2.0, 0.0])), "b": torch.nn.Parameter(torch.zeros(2))}
    torch.testing.assert_close(sim.algorithm.proximal(anchor)(current), torch.tensor(0.001 * (1 + 4 + 2)))


def test_a_mixed_size_run_shares_co_lora_across_trunks_and_lora_within() -> None:
    sim = Simulator(config(family=True), two_task_clients(), progress=False)
    sim.run()
    payload = sim.algorithm.configure(sim.server, 3, [0])[0]["lora1"]
    omega, homo = sim.algorithm.weights(sim.server, [0, 1, 2, 3])
    stored = sim.server["lora2"]
    for key, tensor in payload.items():
        if key.startswith("coLoRA."):  # P, Q from all three others, small and large
            expected = sum(float(omega[0, j]) * stored[str(j)][key].double() for j in (1, 2, 3))
        else:  # the small trunk's other adapters from client 2 only (the one other small client)
            expected = stored["2"][key].double()
            assert math.isclose(float(homo[0, 2]), 1.0)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-9)


def test_aligned_adapters_need_public_inputs_and_align_the_large_trunk() -> None:
    raw = config(family=True)
    aligned = from_dict({**raw.to_dict(), "model": {**raw.to_dict()["model"], "adapter_init": "aligned"}})
    data = two_task_clients()
    with pytest.raises(ConfigError, match="public inputs"):
        Simulator(aligned, data, progress=False)
    data.public_x = torch.cat([c.train_x for c in data.clients])
    random_start = Simulator(raw, data, progress=False).assembly.trainers["mosaic_large"].module
    aligned_start = Simulator(aligned, data, progress=False).assembly.trainers["mosaic_large"].module
    small = Simulator(aligned, data, progress=False).assembly.trainers["mosaic_small"].module
    random_a = {n: p for n, p in random_start.named_parameters() if n.endswith(".A")}
    aligned_a = {n: p for n, p in aligned_start.named_parameters() if n.endswith(".A")}
    assert random_a.keys() == aligned_a.keys() and random_a
    assert all(not torch.equal(random_a[n], aligned_a[n]) for n in random_a)
    small_random = Simulator(raw, data, progress=False).assembly.trainers["mosaic_small"].module
    for (n1, p1), (n2, p2) in zip(small.named_parameters(), small_random.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)  # the reference is not changed


@pytest.mark.parametrize("ortho", ["columns", "rows"])
def test_the_alignment_takes_its_orthogonality_term_from_model_adapter_align_ortho(ortho: str, monkeypatch) -> None:
    from fedpal.engine import assembly

    seen = []
    monkeypatch.setattr(assembly, "align_trunks", lambda modules, x, settings=None: seen.append(settings))
    raw = config(family=True).to_dict()
    model = {**raw["model"], "adapter_init": "aligned", "adapter_align_ortho": ortho}
    data = two_task_clients()
    data.public_x = torch.cat([c.train_x for c in data.clients])
    Simulator(from_dict({**raw, "model": model}), data, progress=False)
    assert len(seen) == 1 and seen[0].ortho == ortho


@pytest.mark.parametrize("scale", ["raw", "unit"])
def test_a_round_signature_is_the_mean_of_the_sampled_examples_signatures(scale: str) -> None:
    """g = the mean over the last example of every signature_every-th step's batch of its signature (kept rows),
    each scaled to unit norm first with signature_scale = "unit"; no noise here, so it is exact."""
    from fedpal.algorithms.core.relevance import analytic_signature

    sim = Simulator(
        config(signature_every=1, signature_noise=0.0, signature_scale=scale), two_task_clients(), progress=False
    )
    algorithm = sim.algorithm
    view = sim.assembly.view(0, 1)
    batches = [torch.tensor([0, 3]), torch.tensor([5, 7])]
    got = algorithm.signature_of(view, batches, None)
    reference = algorithm.reference(view)
    expected = []
    for i in (3, 7):
        g = analytic_signature(reference, view.train_x[i : i + 1], view.train_y[i : i + 1])
        g = g / g.norm() if scale == "unit" else g
        expected.append(g[: math.floor(0.4 * g.shape[0])])
    torch.testing.assert_close(got, torch.stack(expected).mean(dim=0), rtol=1e-5, atol=1e-12)
