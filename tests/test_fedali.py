"""FedAli's mechanisms (spec fedali.md §8): the Sinkhorn plan, the ALP mix, the bank updates, the server k-means,
HART's residual and quirks, byte accounting, and an end-to-end run."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedpal.algorithms.core.kmeans import kmeans
from fedpal.algorithms.weight_sharing.fedali import FedAli, bank_layers
from fedpal.config import from_dict
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.engine.simulator import Simulator
from fedpal.models.alp import (
    ALPLayer,
    ALPSettings,
    cosine_similarity_matrix,
    hard_bank_update,
    sinkhorn_plan,
    sinkhorn_scalings,
    soft_bank_update,
)
from fedpal.models.hart import DropPath, HartBlock, LiteConv, SensorAttention
from fedpal.models.registry import build_model


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layer(width: int = 8, k: int = 4, seed: int = 0, **settings: object) -> ALPLayer:
    torch.manual_seed(seed)
    alp = ALPLayer(width, k)
    alp.settings = dataclasses.replace(alp.settings, **settings)  # type: ignore[arg-type]
    return alp


# ---- the Sinkhorn plan
def test_sinkhorn_marginals_columns_sum_to_one_rows_near_uniform():
    s = torch.rand(512, 64, generator=seeded()) * 2 - 1
    plan = sinkhorn_plan(s, 0.05, 3)
    assert torch.allclose(plan.sum(dim=0), torch.ones(64), atol=1e-5)
    deviation = (plan.sum(dim=1) - 64 / 512).abs() / (64 / 512)
    # Three iterations leave rows within 1 % on average (3.3 % at worst here); more iterations converge.
    assert deviation.mean() < 0.01 and deviation.max() < 0.05
    converged = (sinkhorn_plan(s, 0.05, 10).sum(dim=1) - 64 / 512).abs() / (64 / 512)
    assert converged.max() < 1e-3


def test_scaled_form_equals_the_literal_plan():
    s = torch.rand(300, 40, generator=seeded(1)) * 2 - 1
    kernel, u, v = sinkhorn_scalings(s, 0.05, 3)
    assert torch.allclose(u[:, None] * kernel * v[None, :], sinkhorn_plan(s, 0.05, 3), rtol=1e-4, atol=1e-7)


def test_plan_argmax_is_score_plus_log_column_scaling_and_differs_from_cosine_when_popularity_is_uneven():
    gen = seeded(2)
    # Prototype 0 is everyone's nearest (popular): most tokens sit close to it.
    protos = F.normalize(torch.randn(6, 16, generator=gen), dim=1)
    tokens = protos[0] + 0.35 * torch.randn(200, 16, generator=gen)
    s = cosine_similarity_matrix(tokens, protos)
    plan = sinkhorn_plan(s, 0.05, 3)
    _, _, v = sinkhorn_scalings(s, 0.05, 3)
    assert torch.equal(plan.argmax(dim=1), (s / 0.05 + v.log()).argmax(dim=1))
    assert not torch.equal(plan.argmax(dim=1), s.argmax(dim=1))


def test_plan_argmax_equals_cosine_argmax_when_columns_are_permutations():
    base = torch.rand(12, generator=seeded(3))
    # A circulant similarity: every column is a permutation of every other, so all column scalings are equal.
    s = torch.stack([base.roll(i) for i in range(12)])
    assert torch.equal(sinkhorn_plan(s).argmax(dim=1), s.argmax(dim=1))


# ---- the ALP mix
@pytest.mark.parametrize("training", [True, False])
def test_lambda_zero_leaves_only_the_normalised_token(training: bool):
    alp = layer(lam=0.0)
    alp.train(training)
    h = torch.randn(3, 5, 8, generator=seeded(4))
    assert torch.allclose(alp(h), F.normalize(h, dim=-1), atol=1e-6)


def test_lambda_one_without_glu_returns_global_rows_in_training_and_local_rows_in_inference():
    alp = layer(lam=1.0, use_glu=False, update_banks=False)
    h = torch.randn(2, 4, 8, generator=seeded(5))
    alp.train()
    out = alp(h).reshape(-1, 8)
    assert torch.allclose(out, F.normalize(alp.global_bank[alp.last_assignment], dim=1))
    alp.eval()
    out = alp(h).reshape(-1, 8)
    assert torch.allclose(out, F.normalize(alp.local_bank[alp.last_assignment], dim=1))


def test_inference_uses_only_the_local_bank():
    alp = layer(lam=0.5)
    alp.eval()
    h = torch.randn(2, 4, 8, generator=seeded(6))
    before = alp(h)
    alp.global_bank.mul_(-3.0).add_(1.0)
    assert torch.equal(alp(h), before)
    alp.local_bank.add_(0.5)
    assert not torch.allclose(alp(h), before)


def test_training_never_changes_global_bank_inference_changes_nothing_banks_get_no_gradient():
    alp = layer(lam=0.2, beta=0.9)
    h = torch.randn(4, 4, 8, generator=seeded(7), requires_grad=True)
    local0, global0 = alp.local_bank.clone(), alp.global_bank.clone()
    alp.eval()
    alp(h)
    assert torch.equal(alp.local_bank, local0) and torch.equal(alp.global_bank, global0)
    alp.train()
    alp(h).sum().backward()
    assert torch.equal(alp.global_bank, global0)
    assert not torch.equal(alp.local_bank, local0)
    assert not alp.local_bank.requires_grad and alp.local_bank.grad is None and alp.global_bank.grad is None
    names = {n for n, _ in alp.named_parameters()}
    assert names == {"glu.linear.weight", "glu.linear.bias"}


# ---- bank updates
def test_soft_update_beta_zero_copies_the_top_token_of_each_column():
    tokens = torch.randn(40, 8, generator=seeded(8))
    weights = torch.rand(40, 5, generator=seeded(9))
    bank = torch.randn(5, 8)
    soft_bank_update(bank, tokens, weights, beta=0.0, batch_size=4)  # s = max(1, 4 // 5) = 1
    assert torch.allclose(bank, tokens[weights.argmax(dim=0)])


def test_soft_update_moves_every_prototype_by_exactly_one_minus_beta_toward_its_token():
    tokens = torch.randn(40, 8, generator=seeded(10))
    weights = torch.rand(40, 5, generator=seeded(11))
    bank = torch.randn(5, 8)
    old = bank.clone()
    soft_bank_update(bank, tokens, weights, beta=0.999, batch_size=4)
    target = tokens[weights.argmax(dim=0)]
    assert torch.allclose(bank - old, (1 - 0.999) * (target - old), atol=1e-6)


def test_soft_update_slot_size_is_batch_over_bank_size():
    # B = 64 windows, K = 16 prototypes: s = 4 tokens, weighted by their renormalised plan weights.
    tokens = torch.randn(128, 3, generator=seeded(12))
    weights = torch.rand(128, 16, generator=seeded(13))
    bank = torch.zeros(16, 3)
    soft_bank_update(bank, tokens, weights, beta=0.0, batch_size=64)
    top_w, top_i = weights.topk(4, dim=0)
    expected = torch.stack(
        [(tokens[top_i[:, k]] * (top_w[:, k] / top_w[:, k].sum())[:, None]).sum(0) for k in range(16)]
    )
    assert torch.allclose(bank, expected, atol=1e-6)


def test_hard_update_changes_only_hit_rows_last_write_wins():
    tokens = torch.randn(6, 4, generator=seeded(14))
    weights = torch.zeros(6, 5)
    hits = [1, 3, 1, 1, 3, 0]
    weights[torch.arange(6), torch.tensor(hits)] = 1.0
    bank = torch.randn(5, 4)
    old = bank.clone()
    hard_bank_update(bank, tokens, weights, beta=0.5)
    assert torch.equal(bank[[2, 4]], old[[2, 4]])  # never hit: bit-identical
    for row, last in ((1, 3), (3, 4), (0, 5)):
        assert torch.allclose(bank[row], 0.5 * old[row] + 0.5 * tokens[last])


def test_layer_soft_update_equals_the_plan_based_update():
    alp = layer(width=8, k=4, lam=0.2, beta=0.9)
    h = torch.randn(2, 4, 8, generator=seeded(15))
    tokens = h.reshape(-1, 8)
    plan = sinkhorn_plan(cosine_similarity_matrix(tokens, torch.cat([alp.local_bank, alp.global_bank])))
    expected = alp.local_bank.clone()
    soft_bank_update(expected, tokens, plan[:, :4], 0.9, batch_size=2)
    alp.train()
    alp(h)
    assert torch.allclose(alp.local_bank, expected, atol=1e-6)
    assert torch.equal(alp.last_assignment, plan[:, 4:].argmax(dim=1))


# ---- HART
def test_block_residual_takes_the_pre_norm_input():
    torch.manual_seed(0)
    block = HartBlock(16, 3, 0.0, 0.0, 4, False).eval()

    class Zero(torch.nn.Module):
        def forward(self, h: torch.Tensor, settings: object = None) -> torch.Tensor:
            return torch.zeros_like(h)

    block.alp = Zero()  # type: ignore[assignment]
    with torch.no_grad():
        for module in (block.acc_attention.out, block.gyro_attention.out, block.mlp[3]):
            module.weight.zero_()
            module.bias.zero_()
    x = torch.randn(2, 8, 16)
    assert torch.equal(block(x), x)


def test_liteconv_default_is_a_softmax_kernel_convolution_along_time():
    conv = LiteConv(8, 7).eval()
    x = torch.randn(3, 8, 8)
    kernels = torch.softmax(conv.weight, dim=-1).repeat_interleave(2, dim=0)
    expected = F.conv1d(x.transpose(1, 2), kernels, padding=3, groups=8).transpose(1, 2)
    assert torch.allclose(conv(x), expected, atol=1e-6)


def test_liteconv_quirks_reshape_rows_and_softmax_the_stored_kernel_in_training():
    conv = LiteConv(8, 3, quirks=True)
    x = torch.randn(4, 8, 8)
    stored = conv.weight.detach().clone()
    conv.eval()
    rows = x.reshape(-1, 4, 8)  # row-major, no transpose: runs of Z consecutive values
    per_head = [F.conv1d(rows[:, h : h + 1], stored[h : h + 1], padding=1) for h in range(4)]
    expected = torch.stack(per_head).reshape(4, 8, 8)  # stacked heads first, then reshaped to (B, Z, C)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    conv.train()
    conv(x)
    assert torch.allclose(conv.weight.detach(), torch.softmax(stored, dim=-1))


def test_hart_alp_parameters_exclude_banks():
    model = build_model("hart_alp", (6, 32), 3, 16, 0, "linear", {"width": 16, "blocks": 2, "bank_sizes": [8, 4]})
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert not any("bank" in n for n in params)
    assert sorted(n for n in buffers if "bank" in n) == [
        "backbone.blocks.0.alp.global_bank",
        "backbone.blocks.0.alp.local_bank",
        "backbone.blocks.1.alp.global_bank",
        "backbone.blocks.1.alp.local_bank",
    ]


# ---- server k-means
def test_kmeans_returns_identical_banks_unchanged_and_in_order():
    bank = torch.randn(6, 4, generator=seeded(16))
    stacked = torch.cat([bank, bank, bank])
    for init in (bank, bank + 0.01 * torch.randn(6, 4, generator=seeded(17))):
        assert torch.allclose(kmeans(stacked, init).centres, bank, atol=1e-6)


def test_kmeans_matches_scikit_learn_from_the_same_init():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    gen = np.random.default_rng(0)
    x = np.concatenate([gen.normal(c, 0.5, size=(40, 3)) for c in (-3, 0, 3, 6)]).astype(np.float64)
    init = x[[0, 1, 2, 100, 150, 155]]  # poor init: some clusters start together
    ref = sklearn_cluster.KMeans(6, init=init, n_init=1, max_iter=300, tol=1e-4).fit(x)
    ours = kmeans(torch.from_numpy(x), torch.from_numpy(init))
    assert np.allclose(ours.centres.numpy(), ref.cluster_centers_, atol=1e-8)
    assert ours.iterations == ref.n_iter_


def test_kmeans_relocates_an_empty_cluster_to_the_farthest_point():
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0]], dtype=torch.float64)
    init = torch.tensor([[0.1], [100.0]], dtype=torch.float64)  # cluster 1 starts empty
    result = kmeans(x, init, max_iter=1)
    assert result.relocated == 1
    assert torch.allclose(result.centres, torch.tensor([[0.1], [10.0]], dtype=torch.float64))


# ---- end to end on synthetic [6, 32] windows
def synthetic_har(clients: int = 3, per_class: int = 8, seed: int = 0) -> FederatedData:
    gen = seeded(seed)
    t = torch.linspace(0, 6.28, 32)

    def windows(label: torch.Tensor) -> torch.Tensor:
        wave = torch.sin(t[None, None, :] * (1 + label[:, None, None]))
        return wave.repeat(1, 6, 1) + 0.3 * torch.randn(label.shape[0], 6, 32, generator=gen)

    parts = []
    for _ in range(clients):
        split = []
        for n in (per_class, 2, 3):
            y = torch.arange(3).repeat_interleave(n)
            split.append((windows(y), y))
        parts.append(ClientData(*split[0], *split[1], *split[2]))
    return FederatedData("synthetic_har", 3, ("a", "b", "c"), (6, 32), parts)


def fedali_config(**algorithm: object) -> object:
    return from_dict(
        {
            "seed": 0,
            "model": {"name": "hart_alp", "feature_dim": 16, "width": 16, "blocks": 2, "bank_sizes": [8, 4]},
            "train": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.001, "optimizer": "adam", "threads": 1},
            "eval": {"generalization_samples": 0},
            "run": {"progress": False},
            "algorithm": {"name": "fedali", **algorithm},
        }
    )


def test_fedali_bytes_are_weights_plus_banks_each_way():
    data = synthetic_har()
    sim = Simulator(fedali_config(), data, progress=False)  # type: ignore[arg-type]
    summary = sim.run()
    params = sim.initial_params["hart_alp"]
    weights = sum(v.numel() for k, v in params.items() if not k.endswith(("local_bank", "global_bank")))
    banks = sum(v.numel() for k, v in params.items() if k.endswith(".local_bank"))
    assert banks == (8 + 4) * 16
    sends = 2 * 3  # rounds x clients, full participation
    # down: the weights and G; up: the trained weights, L and the sample count (one 8-byte number), all fp32
    assert summary["bytes"]["down_by_key"] == {"weights": sends * 4 * weights, "global_banks": sends * 4 * banks}
    up = {"weights": sends * 4 * weights, "local_banks": sends * 4 * banks, "num_samples": sends * 8}
    assert summary["bytes"]["up_by_key"] == up
    assert summary["bytes"]["down"] == sends * 4 * (weights + banks)
    assert summary["bytes"]["up"] == sends * (4 * (weights + banks) + 8)
    assert summary["bytes_per_round"] == {"up": summary["bytes"]["up"] / 2, "down": summary["bytes"]["down"] / 2}


def test_fedali_first_round_has_lambda_zero_and_server_banks_come_from_kmeans():
    data = synthetic_har()
    sim = Simulator(fedali_config(), data, progress=False)  # type: ignore[arg-type]
    sim.initialize()
    sim.run_round(1)
    assert sim.server["lam"] == 0.0
    assert all(state["lam"] == 0.0 for state in sim.clients.values())
    sim.run_round(2)
    assert sim.server["lam"] == pytest.approx(0.2)
    algorithm = sim.algorithm
    assert isinstance(algorithm, FedAli)
    layers = bank_layers(sim.initial_params["hart_alp"])
    for p in layers:
        stacked = torch.cat([sim.clients[c]["model"][f"{p}.local_bank"] for c in range(3)])
        n = [data.clients[c].train_y.shape[0] for c in range(3)]
        init = sum(sim.clients[c]["model"][f"{p}.local_bank"] * n[c] for c in range(3)) / sum(n)
        assert torch.allclose(sim.server["banks"][p], kmeans(stacked, init).centres, atol=1e-6)


@pytest.mark.parametrize("persist", [False, True])
def test_fedali_local_banks_reset_to_global_unless_persisted(persist: bool):
    data = synthetic_har()
    sim = Simulator(fedali_config(persist_local_prototypes=persist), data, progress=False)  # type: ignore[arg-type]
    sim.initialize()
    sim.run_round(1)
    own = sim.clients[0]["model"]
    payload = sim.algorithm.configure(sim.server, 2, [0])[0]
    p = bank_layers(own)[0]
    seen: dict[str, torch.Tensor] = {}
    trainer = sim.trainers["hart_alp"]
    original_fit = trainer.fit

    def spy(params, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(params)
        return original_fit(params, *args, **kwargs)

    trainer.fit = spy  # type: ignore[method-assign]
    sim.algorithm.local_update(sim.view(0, 2), sim.clients[0], payload)
    expected = own[f"{p}.local_bank"] if persist else sim.server["banks"][p]
    assert torch.equal(seen[f"{p}.local_bank"], expected)
    assert torch.equal(seen[f"{p}.global_bank"], sim.server["banks"][p])


def test_fedali_is_deterministic_and_learns():
    data = synthetic_har()

    def learning_config() -> object:  # enough training for the three waveforms to be told apart
        config = fedali_config()
        config.train.rounds, config.train.local_epochs, config.train.lr = 3, 3, 3e-3  # type: ignore[attr-defined]
        return config

    untrained = Simulator(learning_config(), data, progress=False)  # type: ignore[arg-type]
    untrained.initialize()
    chance = untrained.evaluate(0)["personalized"]["accuracy"]
    first = Simulator(learning_config(), data, progress=False).run()  # type: ignore[arg-type]
    second = Simulator(learning_config(), data, progress=False).run()  # type: ignore[arg-type]
    # every reported number equal (NaN included, as JSON writes it), wall time aside
    assert json.dumps({**first, "wall_seconds": 0}) == json.dumps({**second, "wall_seconds": 0})
    a = first["last_round"]
    assert chance <= 0.5  # three balanced classes: the initial model is at chance
    assert a["personalized"]["accuracy"] >= 0.9 and a["personalized"]["macro_f1"] >= 0.9
    assert a["global"]["accuracy"] >= 0.9


def test_fedali_rejects_a_model_without_alp_layers():
    from fedpal.errors import ConfigError

    config = fedali_config()
    config.model.name = "hart"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="hart_alp"):
        Simulator(config, synthetic_har(), progress=False)  # type: ignore[arg-type]


def test_alp_settings_travel_with_the_call_and_leave_the_module_unchanged():
    model = build_model("hart_alp", (6, 32), 3, 16, 0, "linear", {"width": 16, "blocks": 1, "bank_sizes": [4]})
    model.eval()
    x = torch.randn(5, 6, 32, generator=seeded(3))
    defaults = [layer.settings for layer in model.modules() if isinstance(layer, ALPLayer)]
    with torch.no_grad():
        plain = model(x)
        mixed = model(x, alp=ALPSettings(lam=0.9))
        again = model(x)
    assert not torch.allclose(plain, mixed)  # the call's lambda acted
    assert torch.equal(plain, again)  # and nothing of it stayed in the module
    assert [layer.settings for layer in model.modules() if isinstance(layer, ALPLayer)] == defaults
    with pytest.raises(TypeError):
        ALPSettings(lamda=0.5)  # type: ignore[call-arg]


# ---- bank movement (the bank_shift diagnostic)
def relative_bank_distance(model: dict[str, torch.Tensor], global_banks: dict[str, torch.Tensor]) -> float:
    """Mean over ALP layers of ||L - G||_F / ||G||_F, from the client's trained model and the round's G."""
    ratios = [
        torch.linalg.matrix_norm(model[f"{p}.local_bank"] - g) / torch.linalg.matrix_norm(g)
        for p, g in global_banks.items()
    ]
    return float(torch.stack(ratios).mean())


def test_bank_shift_is_zero_when_the_banks_do_not_move():
    sim = Simulator(fedali_config(beta=1.0), synthetic_har(), progress=False)  # type: ignore[arg-type]
    sim.initialize()
    sim.run_round(1)
    assert all(state["bank_shift"] == 0.0 for state in sim.clients.values())  # beta = 1: L stays G exactly
    assert sim.evaluate(1)["diagnostics"]["bank_shift"] == 0.0


def test_bank_shift_is_the_relative_distance_of_the_trained_local_banks_from_the_rounds_global_banks():
    sim = Simulator(fedali_config(), synthetic_har(), progress=False)  # type: ignore[arg-type]
    sim.initialize()
    sim.run_round(1)
    global_banks = {p: g.clone() for p, g in sim.server["banks"].items()}  # what round 2 broadcasts
    sim.run_round(2)
    expected = [relative_bank_distance(sim.clients[c]["model"], global_banks) for c in range(3)]
    assert [sim.clients[c]["bank_shift"] for c in range(3)] == pytest.approx(expected, rel=1e-5)
    assert min(expected) > 0  # beta = 0.999: local training moved every client's banks
    assert sim.evaluate(2)["diagnostics"]["bank_shift"] == pytest.approx(sum(expected) / 3, rel=1e-5)


# ---- evaluation batches (the ALP plan is a Sinkhorn over the batch)
def test_fedali_evaluates_in_batches_of_eval_batch_size():
    config = fedali_config()
    config.eval.batch_size = 4  # type: ignore[attr-defined]
    sim = Simulator(config, synthetic_har(), progress=False)  # type: ignore[arg-type]
    sim.initialize()
    sim.run_round(1)
    sim.run_round(2)
    state, payload = sim.clients[0], sim.algorithm.configure_evaluation(sim.server, 2, [0])[0]
    x = sim.data.clients[0].test_x[:10]
    params = sim.algorithm.personalized_params(sim.view(0, 2), state, payload)
    scores = sim.algorithm.predict_scores(sim.view(0, 2), state, payload, params, x)["model"]
    module = sim.trainers["hart_alp"].module
    module.load_state_dict(params)
    module.eval()
    options = {"alp": ALPSettings(lam=0.2)}  # the latest round's influence factor, inference mode
    with torch.no_grad():
        by_four = torch.cat([module(x[i : i + 4], **options) for i in (0, 4, 8)])
        at_once = module(x, **options)
    assert torch.equal(scores, by_four)
    assert not torch.allclose(by_four, at_once)  # the batch changes the plan: the key matters


# ---- FedAli's FedProto baseline: prototypes on HART's pooled encoder output
def hart_config(**algorithm: object) -> object:
    return from_dict(
        {
            "seed": 0,
            "model": {"name": "hart", "feature_dim": 32, "width": 16, "blocks": 2},
            "train": {"rounds": 1, "local_epochs": 2, "batch_size": 8, "lr": 0.003, "optimizer": "adam", "threads": 1},
            "eval": {"generalization_samples": 0},
            "run": {"progress": False},
            "algorithm": {"name": "fedproto", **algorithm},
        }
    )


def pooled_by_hand(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HART's "pooling" layer, from the model's parts: patches, blocks, final LayerNorm, mean over the tokens."""
    backbone: Any = module.backbone
    tokens = backbone.embed(x)
    for block in backbone.blocks:
        tokens = block(tokens)
    return backbone.norm(tokens).mean(dim=1)


def test_fedali_fedproto_prototypes_have_the_encoder_width_and_other_presets_the_feature_size():
    for preset, size in (("fedali", 16), ("", 32), ("htfllib", 32)):  # width 16, model.feature_dim 32
        sim = Simulator(hart_config(preset=preset), synthetic_har(), progress=False)  # type: ignore[arg-type]
        sim.run()
        assert {tuple(p.shape) for p in sim.server["global"].values()} == {(size,)}, preset


def test_pooled_prototypes_are_class_means_of_the_pooled_encoder_output_and_score_by_it():
    config = hart_config(feature="pooled", proto_collection="eval_pass")
    sim = Simulator(config, synthetic_har(), progress=False)  # type: ignore[arg-type]
    sim.initialize()
    algorithm = sim.algorithm
    payload = algorithm.configure(sim.server, 1, [0])[0]
    state, reply = algorithm.local_update(sim.view(0, 1), sim.clients[0], payload)
    module = sim.trainers["hart"].module
    module.load_state_dict(state["params"])
    module.eval()
    client = sim.data.clients[0]
    with torch.no_grad():
        pooled = pooled_by_hand(module, client.train_x)
        for c in range(3):
            assert torch.allclose(reply["prototypes"][str(c)], pooled[client.train_y == c].mean(dim=0), atol=1e-5)
        scored = {"prototypes": {k: v for k, v in reply["prototypes"].items()}}
        scores = algorithm.predict_scores(sim.view(0, 1), state, scored, state["params"], client.test_x)
        pooled_test = pooled_by_hand(module, client.test_x)
        centres = torch.stack([reply["prototypes"][str(c)] for c in range(3)])
        assert torch.equal(scores["prototype"].argmax(dim=1), torch.cdist(pooled_test, centres).argmin(dim=1))
        assert torch.allclose(scores["head"], module(client.test_x), atol=1e-6)


def test_the_fedali_presets_pull_reads_the_pooled_output_of_the_training_pass():
    sim = Simulator(hart_config(preset="fedali"), synthetic_har(), progress=False)  # type: ignore[arg-type]
    sim.initialize()
    module = sim.trainers["hart"].module
    for layer in module.modules():  # no dropout: a train-mode pass can be recomputed exactly
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
        if isinstance(layer, DropPath):
            layer.rate = 0.0
        if isinstance(layer, SensorAttention):
            layer.dropout = 0.0
    algorithm = sim.algorithm
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = algorithm.prototype_term  # type: ignore[attr-defined]

    def spy(params, batch):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            seen.append((batch.features.detach().clone(), pooled_by_hand(module, batch.x)))
        return original(params, batch)

    algorithm.prototype_term = spy  # type: ignore[attr-defined]
    payload = algorithm.configure(sim.server, 1, [0])[0]
    algorithm.local_update(sim.view(0, 1), sim.clients[0], payload)
    assert len(seen) == 2 * 3  # 2 epochs of 3 batches (24 windows, batch 8)
    for features, pooled in seen:
        assert features.shape == (8, 16) and torch.allclose(features, pooled, atol=1e-6)


def test_the_fedali_preset_keeps_the_feature_of_a_model_without_a_pooling_stage():
    config = hart_config(preset="fedali")
    config.model.name, config.model.feature_dim = "mlp", 8  # type: ignore[attr-defined]
    sim = Simulator(config, synthetic_har(), progress=False)  # type: ignore[arg-type]
    sim.run()
    assert {tuple(p.shape) for p in sim.server["global"].values()} == {(8,)}
