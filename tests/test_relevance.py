"""FedMosaic's RELA math (specs/fedmosaic.md §3 steps 1 and 4, §4, mechanism checks of §8): the analytic task
signature against autograd, its independence of the client's adapters, the column-mean cosine similarity, the
relevance weights and their limits, each client's customised lora1, sanitising and the running signature."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedpal.algorithms.core.relevance import (
    _norm_jacobian_diagonal,
    analytic_signature,
    autograd_signature,
    first_round_global,
    global_adapter_for,
    relevance_similarity,
    relevance_weights,
    running_signature,
    sanitize,
)
from fedpal.data.tagged_inputs import WIDTH, tag
from fedpal.models.adapters import (
    AdapterSettings,
    adapted_layers,
    adapters_disabled,
    add_dual_adapters,
    read_adapters,
    write_adapters,
)
from fedpal.models.base import SplitModel
from fedpal.models.mosaic_trunk import mosaic_model

IMAGE = (1, 28, 28)
BLOCK_LINEARS = r"backbone\.trunk\.blocks\.\d+\.(attn\.(qkv|out)|mlp\.(up|down))"
NO_NOISE = AdapterSettings(dropout=0.0, gate_noise=False)


def reference_model(
    projection: str = "pool", feature_dim: int = 64, final_norm: bool = True, seed: int = 0
) -> SplitModel:
    """A small trunk (2 blocks, width 64) on images with 6 classes; optionally without its final LayerNorm."""
    torch.manual_seed(seed)
    model = mosaic_model("small", IMAGE, 6, feature_dim, projection)
    if not final_norm:
        model.backbone.trunk.norm = nn.Identity()
    return model.requires_grad_(False)


def images(n: int, seed: int, classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *IMAGE, generator=g), torch.randint(0, classes, (n,), generator=g)


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((estimate - exact).norm() / exact.norm())


# ---------------------------------------------------------------------------------------------------- signature
@pytest.mark.parametrize(("projection", "feature_dim"), [("pool", 64), ("linear", 32), ("pool", 32)])
def test_analytic_signature_is_the_exact_gradient_without_a_final_norm(projection: str, feature_dim: int) -> None:
    """With an identity final norm every step of the analytic chain is exact (the residual path carries the norm
    input's gradient to the down projection's output), so it must equal autograd's gradient of the mean
    cross-entropy w.r.t. the last block's mlp.down weight: through the pool, and through Linear + ReLU."""
    model = reference_model(projection, feature_dim, final_norm=False)
    x, y = images(8, seed=1)
    analytic, exact = analytic_signature(model, x, y), autograd_signature(model, x, y)
    assert analytic.shape == exact.shape == model.backbone.trunk.blocks[-1].mlp.down.weight.shape == (64, 256)
    assert exact.abs().max() > 1e-3  # a real gradient, not two zeros
    assert float((analytic - exact).abs().max() / exact.abs().max()) < 1e-5
    if projection == "linear":  # the ReLU mask mattered: some projection units were off
        pre = model.backbone.projection[0](model.backbone.trunk(x))
        assert bool((pre <= 0).any()) and bool((pre > 0).any())


def test_analytic_signature_of_mixed_modality_task_rows_is_the_exact_gradient() -> None:
    """Task-tagged rows of two modalities in one batch (the trunk runs each modality as its own group) and a readout
    that masks other tasks' logits: the analytic signature still sums every row's share with 1 / N of the whole
    batch, as autograd's mean cross-entropy does."""
    torch.manual_seed(0)
    model = mosaic_model("small", (WIDTH,), 4, 64, "pool", {"label_tasks": [0, 0, 1, 1]})
    model.backbone.trunk.norm = nn.Identity()
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    rows = torch.cat(
        [tag(torch.randn(5, *IMAGE, generator=g), 0, "image"), tag(torch.randn(4, 6, 128, generator=g), 1, "imu")]
    )
    labels = torch.cat([torch.randint(0, 2, (5,), generator=g), torch.randint(2, 4, (4,), generator=g)])
    order = torch.randperm(9, generator=g)  # interleave the modalities
    rows, labels = rows[order], labels[order]
    analytic, exact = analytic_signature(model, rows, labels), autograd_signature(model, rows, labels)
    assert float((analytic - exact).abs().max() / exact.abs().max()) < 1e-5
    images_only = (rows[:, 1] == 0).nonzero().squeeze(1)
    part = autograd_signature(model, rows[images_only], labels[images_only]) * len(images_only) / 9
    assert relative_error(part, exact) > 0.05  # both modalities contribute


def test_with_the_final_layer_norm_the_diagonal_approximation_differs_slightly() -> None:
    """The LayerNorm's dropped off-diagonal terms are, per token, the projection of gamma * grad / sigma onto the two
    directions 1 and x_hat; for a gradient with no preference for them that is about 2 / d of its energy, a relative
    error near sqrt(2 / 64) = 0.18 at width 64. Measured: 0.092, 0.096, 0.108 for the three seeds; the bound 0.3 leaves
    room, and the error must not vanish (the approximation is really in use)."""
    x, y = images(8, seed=1)
    for seed in range(3):
        model = reference_model(seed=seed)
        analytic, exact = analytic_signature(model, x, y), autograd_signature(model, x, y)
        error = relative_error(analytic, exact)
        assert 1e-3 < error < 0.3, error
        assert float(F.cosine_similarity(analytic.flatten(), exact.flatten(), dim=0)) > 0.95


@pytest.mark.parametrize("norm", [nn.LayerNorm(16), nn.RMSNorm(16, eps=1e-6)], ids=["layernorm", "rmsnorm"])
def test_norm_factor_is_the_diagonal_of_the_norm_jacobian(norm: nn.Module) -> None:
    """The per-coordinate factor is d y_k / d h_k of the norm's exact Jacobian (LayerNorm here; RMSNorm as the
    official model has), with a non-trivial gain gamma."""
    with torch.no_grad():
        norm.weight.copy_(1.0 + torch.rand(16, generator=torch.Generator().manual_seed(0)))
    h = 3.0 + 2.0 * torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    norm = norm.double()
    factor = _norm_jacobian_diagonal(norm, h)
    for b in range(2):
        for t in range(3):
            jacobian = torch.autograd.functional.jacobian(norm, h[b, t])
            torch.testing.assert_close(factor[b, t], jacobian.diagonal(), rtol=1e-10, atol=1e-12)
            assert float((jacobian - jacobian.diagonal().diag()).abs().max()) > 1e-3  # there is something to drop


def test_signature_reads_the_frozen_reference_whatever_the_adapters_hold() -> None:
    """§8: the signature depends on the data only. A reference and a copy carrying trained-looking adapters (random
    lora1, lora2 and gates, which change the copy's outputs) give the same signature bit for bit, both analytic and
    autograd; the copy's adapters are back on afterwards and its trainable flags untouched."""
    reference = reference_model()
    adapted = copy.deepcopy(reference)
    add_dual_adapters(adapted, BLOCK_LINEARS, NO_NOISE, seed=3)
    for part, seed in (("lora1", 1), ("lora2", 2), ("gate", 3)):
        g = torch.Generator().manual_seed(seed)
        write_adapters(
            adapted, part, {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in read_adapters(adapted, part).items()}
        )
    flags = {name: p.requires_grad for name, p in adapted.named_parameters()}
    x, y = images(8, seed=4)
    with torch.no_grad():
        assert relative_error(adapted(x), reference(x)) > 0.01  # the adapters matter when on
        with adapters_disabled(adapted):
            torch.testing.assert_close(adapted(x), reference(x), rtol=0, atol=0)
    assert torch.equal(analytic_signature(adapted, x, y), analytic_signature(reference, x, y))
    assert torch.equal(autograd_signature(adapted, x, y), autograd_signature(reference, x, y))
    assert all(layer.enabled for _, layer in adapted_layers(adapted))
    assert {name: p.requires_grad for name, p in adapted.named_parameters()} == flags

    # the gradient of the adapted model with its adapters on is another matrix: the switch-off is what keeps it out
    probe = copy.deepcopy(adapted)
    down = probe.backbone.trunk.blocks[-1].mlp.down
    down.base.weight.requires_grad_(True)
    F.cross_entropy(probe(x), y).backward()
    assert relative_error(down.base.weight.grad, autograd_signature(reference, x, y)) > 0.01


# --------------------------------------------------------------------------------------------------- similarity
def test_similarity_is_the_mean_over_columns_of_their_cosines_and_zero_columns_count_zero() -> None:
    first = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # columns (1, 0) and (0, 0)
    second = torch.tensor([[2.0, 50.0], [2.0, 0.0]])  # columns (2, 2) and (50, 0): a column's scale does not count
    third = -second
    s = relevance_similarity([first, second, third])
    expected = torch.tensor(
        [
            [0.5, 0.5 / math.sqrt(2), -0.5 / math.sqrt(2)],
            [0.5 / math.sqrt(2), 1.0, -1.0],
            [-0.5 / math.sqrt(2), -1.0, 1.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(s, expected, rtol=0, atol=1e-12)
    # a column-wise comparison, not one cosine of the flattened matrices
    flat = F.cosine_similarity(first.flatten().double(), second.flatten().double(), dim=0)
    assert abs(float(flat) - float(s[0, 1])) > 0.05


def prototype_task(classes: list[int], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of a task: a fixed random pattern per class (shared by every client) plus noise of the client's own."""
    patterns = torch.rand(6, *IMAGE, generator=torch.Generator().manual_seed(100))
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    return patterns[y] + 0.3 * torch.randn(n, *IMAGE, generator=g), y


def test_identical_data_give_similarity_one_and_another_task_clearly_less() -> None:
    """§8 with sanitised signatures on one reference: identical data -> S ~ 1 (noise only); two clients drawing
    different samples of one task stay close, while clients of a task with disjoint classes are far apart, and
    the relevance weights send most of each client's weight to the client of its own task.
    (Measured: identical 0.9989, same task 0.87, disjoint tasks -0.66 to -0.82.)"""
    reference = reference_model()
    x, y = prototype_task([0, 1, 2], 32, seed=0)
    same = analytic_signature(reference, x, y)
    twins = [sanitize(same, torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert float(relevance_similarity(twins)[0, 1]) > 0.99

    tasks = [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    signatures = [
        sanitize(
            analytic_signature(reference, *prototype_task(classes, 32, seed=10 + c)), torch.Generator().manual_seed(c)
        )
        for c, classes in enumerate(tasks)
    ]
    s = relevance_similarity(signatures)
    for i, j in ((0, 1), (2, 3)):
        assert float(s[i, j]) > 0.6
    for i in (0, 1):
        for j in (2, 3):
            assert float(s[i, j]) < 0.2
    weights = relevance_weights(s)
    partner = {0: 1, 1: 0, 2: 3, 3: 2}
    for i, j in partner.items():
        assert int(weights[i].argmax()) == j and float(weights[i, j]) > 0.7


# ------------------------------------------------------------------------------------------------------ weights
SIMILARITY = torch.tensor(
    [
        [1.0, 0.2, 0.9, -0.3],
        [0.2, 1.0, 0.1, 0.4],
        [0.9, 0.1, 1.0, 0.5],
        [-0.3, 0.4, 0.5, 1.0],
    ],
    dtype=torch.float64,
)


def test_weights_are_the_softmax_over_the_other_clients() -> None:
    omega = relevance_weights(SIMILARITY, tau=0.5)
    assert torch.equal(omega.diagonal(), torch.zeros(4, dtype=torch.float64))  # S_ii = 1 is every row's largest
    torch.testing.assert_close(omega.sum(dim=1), torch.ones(4, dtype=torch.float64))
    row = [math.exp(SIMILARITY[0, j].item() / 0.5) for j in (1, 2, 3)]
    torch.testing.assert_close(omega[0, 1:], torch.tensor(row, dtype=torch.float64) / sum(row))


def test_a_cold_softmax_picks_the_most_similar_peer_and_a_hot_one_is_uniform() -> None:
    cold = relevance_weights(SIMILARITY, tau=1e-4)
    most_similar = [2, 3, 0, 2]  # the largest S_ij over j != i
    assert torch.equal(cold, F.one_hot(torch.tensor(most_similar), 4).to(torch.float64))
    hot = relevance_weights(SIMILARITY, tau=1e4)
    uniform = (torch.ones(4, 4, dtype=torch.float64) - torch.eye(4, dtype=torch.float64)) / 3
    torch.testing.assert_close(hot, uniform, rtol=0, atol=1e-3)


def test_homogeneous_weights_stay_within_an_architecture() -> None:
    architectures = ["small", "large", "small", "small"]
    homo = relevance_weights(SIMILARITY, tau=0.5, architectures=architectures)
    for i, a in enumerate(architectures):
        for j, b in enumerate(architectures):
            if a != b or i == j:
                assert homo[i, j] == 0.0
    assert torch.equal(homo[1], torch.zeros(4, dtype=torch.float64))  # alone in its architecture
    torch.testing.assert_close(homo[[0, 2, 3]].sum(dim=1), torch.ones(3, dtype=torch.float64))
    row = torch.tensor([math.exp(0.9 / 0.5), math.exp(-0.3 / 0.5)], dtype=torch.float64)
    torch.testing.assert_close(homo[0, [2, 3]], row / row.sum())
    assert torch.equal(relevance_weights(torch.ones(1, 1)), torch.zeros(1, 1, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------- global adapter
P_KEY, A_KEY = "coLoRA.block0.mlp.down.P", "blocks.0.mlp.up.A"


def four_clients() -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """Three small clients and one large one: the Co-LoRA P has one shape everywhere, the LoRA A of the same module
    name differs in shape between the architectures. Client j's tensors are filled with j + 1."""
    shapes = {"small": (2, 4), "large": (2, 8)}
    architectures = ["small", "small", "large", "small"]
    states = [
        {P_KEY: torch.full((2, 2), float(j + 1)), A_KEY: torch.full(shapes[arch], float(j + 1))}
        for j, arch in enumerate(architectures)
    ]
    return states, architectures


# by hand, rows summing to 1 over j != i; omega^homo's proportions among same-architecture peers differ from omega's
OMEGA = torch.tensor(
    [[0.0, 0.2, 0.5, 0.3], [0.6, 0.0, 0.3, 0.1], [0.25, 0.25, 0.0, 0.5], [0.1, 0.2, 0.7, 0.0]], dtype=torch.float64
)
OMEGA_HOMO = torch.tensor(
    [[0.0, 0.8, 0.0, 0.2], [0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0], [0.4, 0.6, 0.0, 0.0]], dtype=torch.float64
)


def test_global_adapter_is_the_hand_computed_weighted_sum() -> None:
    """P from every other client by omega, A only from same-architecture peers by omega^homo; the large client is
    alone in its architecture and keeps its own A. (Four clients, so a small client has two same-architecture peers
    whose omega and omega^homo proportions differ.)"""
    states, architectures = four_clients()
    expected = {
        0: {P_KEY: 0.2 * 2 + 0.5 * 3 + 0.3 * 4, A_KEY: 0.8 * 2 + 0.2 * 4},
        1: {P_KEY: 0.6 * 1 + 0.3 * 3 + 0.1 * 4, A_KEY: 0.5 * 1 + 0.5 * 4},
        2: {P_KEY: 0.25 * 1 + 0.25 * 2 + 0.5 * 4, A_KEY: 3.0},
        3: {P_KEY: 0.1 * 1 + 0.2 * 2 + 0.7 * 3, A_KEY: 0.4 * 1 + 0.6 * 2},
    }
    for i, values in expected.items():
        lora1 = global_adapter_for(i, states, architectures, OMEGA, OMEGA_HOMO)
        assert lora1.keys() == states[i].keys()
        for key, value in values.items():
            torch.testing.assert_close(lora1[key], torch.full(states[i][key].shape, value))
            assert lora1[key].data_ptr() != states[i][key].data_ptr()  # a copy, never the state itself


def test_global_adapter_never_contains_the_clients_own_tensors() -> None:
    """Client 0's own tensors are NaN: a zero weight on them would still give NaN, so a finite result shows they are
    not in the sum at all."""
    states, architectures = four_clients()
    states[0] = {key: torch.full_like(value, math.nan) for key, value in states[0].items()}
    lora1 = global_adapter_for(0, states, architectures, OMEGA, OMEGA_HOMO)
    assert all(bool(torch.isfinite(value).all()) for value in lora1.values())


def test_clients_without_a_state_are_skipped_and_the_weights_renormalised() -> None:
    states, architectures = four_clients()
    one_missing: list[dict[str, torch.Tensor] | None] = [states[0], None, states[2], states[3]]
    lora1 = global_adapter_for(0, one_missing, architectures, OMEGA, OMEGA_HOMO)
    torch.testing.assert_close(lora1[P_KEY], torch.full((2, 2), (0.5 * 3 + 0.3 * 4) / 0.8))
    torch.testing.assert_close(lora1[A_KEY], torch.full((2, 4), 4.0))  # 0.2 / 0.2 on client 3
    two_missing: list[dict[str, torch.Tensor] | None] = [states[0], None, states[2], None]
    lora1 = global_adapter_for(0, two_missing, architectures, OMEGA, OMEGA_HOMO)
    torch.testing.assert_close(lora1[P_KEY], torch.full((2, 2), 3.0))  # 0.5 / 0.5 on client 2
    torch.testing.assert_close(lora1[A_KEY], torch.full((2, 4), 1.0))  # no same-architecture peer left: own A
    with pytest.raises(ValueError, match="own lora2"):
        global_adapter_for(1, one_missing, architectures, OMEGA, OMEGA_HOMO)


def test_first_round_global_is_a_copy_of_the_own_lora2() -> None:
    states, _ = four_clients()
    lora1 = first_round_global(states[0])
    assert lora1.keys() == states[0].keys()
    for key, value in lora1.items():
        assert torch.equal(value, states[0][key]) and value.data_ptr() != states[0][key].data_ptr()


def adapted(size: str, seed: int) -> SplitModel:
    torch.manual_seed(0)
    model = mosaic_model(size, IMAGE, 6, 64, "pool")
    add_dual_adapters(model, BLOCK_LINEARS, NO_NOISE, seed=0)
    g = torch.Generator().manual_seed(seed)
    write_adapters(
        model, "lora2", {k: torch.randn(v.shape, generator=g) for k, v in read_adapters(model, "lora2").items()}
    )
    return model


def test_real_adapters_mix_p_q_across_architectures_and_a_b_within_and_order_does_not_matter() -> None:
    """Five clients on the two trunk sizes (small: 2 blocks, all Co-LoRA at K = 2; large: 4 blocks, blocks 0 and 2
    ordinary LoRA). Client 0's lora1 loads into its model; its Co-LoRA keys mix all four peers, its A, B keys only the
    two other large clients; listing the clients in another order (weights permuted alike) gives the same lora1."""
    architectures = ["large", "small", "large", "small", "large"]
    models = [adapted(arch, seed=j) for j, arch in enumerate(architectures)]
    states = [read_adapters(model, "lora2") for model in models]
    similarity = torch.rand(5, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    omega = relevance_weights(similarity)
    homo = relevance_weights(similarity, architectures=architectures)
    lora1 = global_adapter_for(0, states, architectures, omega, homo)
    write_adapters(models[0], "lora1", lora1)  # every key, every shape of the large model

    co_lora = [k for k in lora1 if k.startswith("coLoRA.")]
    plain = [k for k in lora1 if not k.startswith("coLoRA.")]
    assert co_lora and plain and all(k in states[1] for k in co_lora) and not any(k in states[1] for k in plain)
    for key in co_lora:
        expected = sum(float(omega[0, j]) * states[j][key].double() for j in range(1, 5))
        torch.testing.assert_close(lora1[key], expected.float())
    for key in plain:  # the two other large clients, omega^homo already sums to 1 over them
        expected = float(homo[0, 2]) * states[2][key].double() + float(homo[0, 4]) * states[4][key].double()
        torch.testing.assert_close(lora1[key], expected.float())

    order = [3, 2, 4, 0, 1]  # position p holds client order[p]
    shuffled = global_adapter_for(
        order.index(0),
        [states[j] for j in order],
        [architectures[j] for j in order],
        omega[order][:, order],
        homo[order][:, order],
    )
    assert shuffled.keys() == lora1.keys()
    for key, value in lora1.items():
        torch.testing.assert_close(shuffled[key], value, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ sanitise and running
def test_sanitize_keeps_the_first_rows_and_adds_the_seeded_noise() -> None:
    signature = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    clean = sanitize(signature, torch.Generator().manual_seed(1), noise_std=0.0)
    assert torch.equal(clean, signature[:25])  # floor(0.4 * 64) = 25 rows: the first ones (output dimensions)
    assert sanitize(torch.zeros(7, 3), torch.Generator().manual_seed(1)).shape == (2, 3)  # floor(2.8)
    assert sanitize(torch.zeros(10, 3), torch.Generator().manual_seed(1)).shape == (4, 3)

    noise = sanitize(torch.zeros(1000, 500), torch.Generator().manual_seed(2))  # 400 x 500 entries
    assert noise.shape == (400, 500)
    assert abs(float(noise.std()) / 1e-4 - 1.0) < 0.01 and abs(float(noise.mean())) < 1e-6
    again = sanitize(torch.zeros(1000, 500), torch.Generator().manual_seed(2))
    other = sanitize(torch.zeros(1000, 500), torch.Generator().manual_seed(3))
    assert torch.equal(noise, again) and not torch.equal(noise, other)


def test_running_signature_halves_the_past_each_round() -> None:
    means = [torch.full((2, 3), v) for v in (4.0, 8.0, 16.0)]
    g = running_signature(None, means[0])
    assert torch.equal(g, means[0]) and g.data_ptr() != means[0].data_ptr()
    for mean in means[1:]:
        g = running_signature(g, mean)
    torch.testing.assert_close(g, torch.full((2, 3), 16.0 / 2 + 8.0 / 4 + 4.0 / 4))
