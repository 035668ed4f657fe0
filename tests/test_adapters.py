"""FedMosaic's adapters and A/B alignment (specs/fedmosaic.md §2-§3, mechanism checks of §8 that concern them):
zero output of Co-LoRA at start, frozen A/B, P/Q shapes across architectures, the block rule, the gate, which
parameters train on a model fedpal did not write, the flat state round trip, and what the alignment optimises."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedpal.errors import UserError
from fedpal.models.adapter_alignment import AlignmentSettings, align_to_reference
from fedpal.models.adapters import (
    AdapterSettings,
    DualAdapterLinear,
    adapted_layers,
    adapters_disabled,
    add_dual_adapters,
    block_end_indices,
    co_lora_layers,
    is_cross_architecture_key,
    read_adapters,
    trainable_groups,
    write_adapters,
)

NO_DROPOUT = AdapterSettings(dropout=0.0)


def encoder(width: int, depth: int, seed: int = 0, batch_first: bool = True) -> nn.TransformerEncoder:
    """PyTorch's own transformer encoder (blocks named layers.{i}), no dropout inside the trunk."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


def wrapped_encoder(
    width: int, depth: int, seed: int = 0, settings: AdapterSettings | None = None
) -> nn.TransformerEncoder:
    model = encoder(width, depth)
    add_dual_adapters(model, ["linear1", "linear2"], settings, seed=seed)
    return model


class Mlp(nn.Module):
    """Blocks that are single linear layers (layers.{i}), for inputs [B, d] with one token per example."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def fill_random(model: nn.Module, part: str, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Overwrite one adapter part with random values (what a loaded lora1 or a trained lora2 looks like)."""
    generator = torch.Generator().manual_seed(seed)
    values = {k: scale * torch.randn(v.shape, generator=generator) for k, v in read_adapters(model, part).items()}
    write_adapters(model, part, values)
    return values


def test_block_end_indices_follow_floor_l_over_k() -> None:
    assert block_end_indices(16, 4) == [3, 7, 11, 15]
    assert block_end_indices(28, 4) == [6, 13, 20, 27]
    assert block_end_indices(32, 4) == [7, 15, 23, 31]
    assert block_end_indices(2, 2) == [0, 1]  # the CPU-scale trunks, K = 2
    assert block_end_indices(4, 2) == [1, 3]
    assert block_end_indices(5, 2) == [1, 4]  # the last layer always closes the last block
    with pytest.raises(UserError):
        block_end_indices(1, 2)


def test_adapted_model_equals_the_original_bit_for_bit_at_start() -> None:
    cases = [
        (encoder(16, 4), ["linear1", "linear2"], torch.randn(3, 5, 16)),
        (Mlp(6, 4), r"layers\.\d", torch.randn(7, 6)),
    ]
    for original, targets, x in cases:
        adapted = copy.deepcopy(original)
        add_dual_adapters(adapted, targets)
        layers = dict(adapted_layers(adapted))
        assert any(layer.co_lora for layer in layers.values()) and any(not layer.co_lora for layer in layers.values())
        for layer in layers.values():
            if layer.co_lora:  # the zero comes from P = Q = 0, not from a zero B
                assert layer.B.abs().sum() > 0 and layer.A.abs().sum() > 0
        # against the same frozen trunk (PyTorch's attention rounds differently when its weights require grad),
        # run by the same kernels (in eval a frozen nn.TransformerEncoderLayer would take its fused kernel, which
        # the adapted layers decline)
        original.requires_grad_(False)
        fused = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            for train in (True, False):  # training adds gate noise and adapter dropout: still exactly zero extra
                original.train(train)
                adapted.train(train)
                assert torch.equal(adapted(x), original(x))
        finally:
            torch.backends.mha.set_fastpath_enabled(fused)


def test_co_lora_a_b_get_no_gradient_while_p_q_do() -> None:
    model = wrapped_encoder(16, 4)
    x = torch.randn(4, 5, 16)
    (model(x) * torch.randn(4, 5, 16)).sum().backward()  # a weighted sum: the plain sum of a LayerNorm is constant
    co_lora = co_lora_layers(model)
    assert sorted(layer.layer_index for layer in co_lora.values()) == [1, 1, 3, 3]
    for layer in co_lora.values():
        assert not layer.A.requires_grad and not layer.B.requires_grad
        assert layer.A.grad is None and layer.B.grad is None
        assert layer.lora1_P.grad is None and layer.lora1_Q.grad is None  # the global adapter is frozen
        assert layer.lora2_P.grad.abs().sum() > 0 and layer.lora2_Q.grad.abs().sum() > 0


def test_p_q_shapes_are_identical_in_a_narrow_shallow_and_a_wide_deep_model() -> None:
    small, large = wrapped_encoder(16, 2), wrapped_encoder(32, 4)
    assert sorted({layer.layer_index for layer in co_lora_layers(small).values()}) == [0, 1]
    assert sorted({layer.layer_index for layer in co_lora_layers(large).values()}) == [1, 3]
    small_pq, large_pq = read_adapters(small, "lora2"), read_adapters(large, "lora2")
    shared = {k: v.shape for k, v in small_pq.items() if is_cross_architecture_key(k)}
    assert shared == {k: v.shape for k, v in large_pq.items() if is_cross_architecture_key(k)}
    assert shared["coLoRA.block1.linear2.P"] == (8, 8) and shared["coLoRA.block1.linear2.Q"] == (1, 8)
    assert len(shared) == 2 * 2 * 2  # K blocks x 2 modules x (P, Q)
    # the frozen A, B differ in shape; the large model's other layers carry ordinary LoRA keyed by module name
    assert read_adapters(small, "frozen")["layers.0.linear1.A"].shape == (8, 16)
    assert read_adapters(large, "frozen")["layers.1.linear1.A"].shape == (8, 32)
    assert large_pq["layers.0.linear1.B"].shape == (64, 8) and not any(k.startswith("layers.") for k in small_pq)


def test_one_seed_gives_one_start_with_orthonormal_frozen_factors() -> None:
    first, second, other = (
        wrapped_encoder(16, 4, seed=3),
        wrapped_encoder(16, 4, seed=3),
        wrapped_encoder(16, 4, seed=4),
    )
    for part in ("lora1", "lora2", "gate", "frozen"):
        a, b = read_adapters(first, part), read_adapters(second, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        read_adapters(first, "frozen")["layers.1.linear1.A"],
        read_adapters(other, "frozen")["layers.1.linear1.A"],
    )
    lora1, lora2 = read_adapters(first, "lora1"), read_adapters(first, "lora2")
    assert all(torch.equal(lora1[k], lora2[k]) for k in lora1)  # global = local at the start
    assert (
        torch.count_nonzero(lora2["layers.0.linear1.A"]) > 0 and torch.count_nonzero(lora2["layers.0.linear1.B"]) == 0
    )
    for layer in co_lora_layers(first).values():
        torch.testing.assert_close(layer.A @ layer.A.T, torch.eye(8), atol=1e-5, rtol=0)  # orthonormal rows
        torch.testing.assert_close(layer.B.T @ layer.B, torch.eye(8), atol=1e-5, rtol=0)  # orthonormal columns


def test_forward_is_the_gated_sum_of_the_two_adapters() -> None:
    model = wrapped_encoder(16, 4, settings=NO_DROPOUT)
    fill_random(model, "lora1", 1)
    fill_random(model, "lora2", 2)
    fill_random(model, "gate", 3)
    model.eval()
    for layer in (model.layers[3].linear2, model.layers[2].linear2):
        d = layer.in_features
        for x in (torch.randn(5, d), torch.randn(5, 3, d)):  # [B, d] (T = 1) and [B, T, d]
            w = torch.sigmoid((x @ layer.gate_weight).reshape(5, -1).mean(dim=1)).reshape(-1, *[1] * (x.dim() - 1))
            if layer.co_lora:
                ad1 = ((x @ layer.A.T) @ layer.lora1_P + layer.lora1_Q) @ layer.B.T
                ad2 = ((x @ layer.A.T) @ layer.lora2_P + layer.lora2_Q) @ layer.B.T
            else:
                ad1 = x @ layer.lora1_A.T @ layer.lora1_B.T
                ad2 = x @ layer.lora2_A.T @ layer.lora2_B.T
            expected = x @ layer.base.weight.T + layer.base.bias + 2.0 * (w * ad1 + (1 - w) * ad2)  # alpha / r = 2
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert model.layers[3].linear2.co_lora and not model.layers[2].linear2.co_lora


def test_the_mean_mixing_is_the_even_average_of_the_two_single_adapter_layers_and_ignores_the_gate() -> None:
    """FedDPA's mix: (W0 x + Ad1(x) + W0 x + Ad2(x)) / 2, i.e. the mean of the layer run with lora2 alone and with
    lora1 copied into lora2; the gate takes no part. Every layer ordinary LoRA (num_blocks = 0, the baselines')."""
    model = wrapped_encoder(16, 4, settings=AdapterSettings(dropout=0.0, num_blocks=0))
    assert all(not layer.co_lora for _, layer in adapted_layers(model))
    lora1 = fill_random(model, "lora1", 1)
    lora2 = fill_random(model, "lora2", 2)
    model.eval()
    layer = model.layers[1].linear1
    x = torch.randn(5, 3, layer.in_features)
    with torch.no_grad():
        layer.mixing = "mean"
        mixed = layer(x)
        layer.gate_weight.add_(3.0)
        torch.testing.assert_close(layer(x), mixed, rtol=0, atol=0)
        layer.mixing = "local"
        only_local = layer(x)
        write_adapters(model, "lora2", lora1)
        only_global = layer(x)
        write_adapters(model, "lora2", lora2)
    torch.testing.assert_close(mixed, 0.5 * (only_local + only_global), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(mixed, only_local, atol=1e-3)


def test_gate_is_one_half_at_start_deterministic_in_eval_and_w_noise_never_trains() -> None:
    model = wrapped_encoder(16, 4, settings=NO_DROPOUT)
    layer = model.layers[1].linear1
    x = torch.randn(6, 5, 16)
    layer.eval()
    assert torch.equal(layer.gate(x), torch.full((6,), 0.5))
    layer.train()
    assert not torch.equal(layer.gate(x), torch.full((6,), 0.5))  # training noise on the logit
    fill_random(model, "lora1", 1)  # the global adapter now differs from the local one, so w matters
    fill_random(model, "gate", 2)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
    torch.manual_seed(7)
    first = model(x)
    torch.manual_seed(7)
    assert torch.equal(model(x), first)  # the noise is the pass's seeded generator, like dropout
    (model(x) * torch.randn_like(x)).sum().backward()
    for _, adapted in adapted_layers(model):
        assert adapted.noise_weight.requires_grad and adapted.noise_weight.grad is None
        assert adapted.gate_weight.grad is not None and adapted.gate_weight.grad.abs().sum() > 0
    quiet = wrapped_encoder(16, 4, settings=AdapterSettings(dropout=0.0, gate_noise=False))
    fill_random(quiet, "lora1", 1)
    quiet.train()
    assert torch.equal(quiet(x), quiet(x))


@pytest.mark.parametrize("tokens", [1, 16])
def test_gate_noise_on_the_logit_is_0693_over_root_t(tokens: int) -> None:
    layer = DualAdapterLinear(nn.Linear(4, 4), NO_DROPOUT, torch.Generator().manual_seed(0), layer_index=0, block=0)
    layer.train()
    torch.manual_seed(0)
    x = torch.randn(40_000, tokens, 4) if tokens > 1 else torch.randn(40_000, 4)
    w = layer.gate(x).detach().double()
    logit_std = float(torch.log(w / (1 - w)).std())
    expected = (math.log(2.0) + 1e-5) / math.sqrt(tokens)  # softplus(0) + 1e-5 per token, averaged over T
    assert logit_std == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize(("width", "depth"), [(16, 2), (24, 4)])
def test_a_pytorch_encoder_trains_only_lora2_and_the_gate(width: int, depth: int) -> None:
    model = wrapped_encoder(width, depth)
    fill_random(model, "lora1", 1)  # as after a round: the gate's gradient needs Ad1 != Ad2
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    endings = ("lora2_P", "lora2_Q", "lora2_A", "lora2_B", "gate_weight", "noise_weight")
    assert trainable == {name for name, _ in model.named_parameters() if name.endswith(endings)}
    assert {id(p) for group in trainable_groups(model).values() for p in group} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x = torch.randn(4, 6, width)
    F.mse_loss(model(x), torch.randn(4, 6, width)).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name not in trainable or name.endswith("noise_weight"):
            assert torch.equal(p, before[name]), name
        elif p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p, before[name]), name
    moved = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, before[n])]
    assert any(n.endswith("gate_weight") for n in moved) and any(n.endswith("lora2_P") for n in moved)
    assert any(n.endswith("lora2_B") for n in moved) == (depth > 2)  # the narrow model has Co-LoRA layers only
    # in eval without gradients PyTorch's fused encoder kernel would skip the adapters; they must still count
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        with adapters_disabled(model):
            frozen = model(x)
    assert (adapted - frozen).abs().max() > 1e-4


def test_adapter_state_round_trips_and_p_q_cross_architectures() -> None:
    source = wrapped_encoder(16, 4, seed=0)
    for i, part in enumerate(("lora1", "lora2", "gate")):
        fill_random(source, part, 10 + i)
    target = wrapped_encoder(16, 4, seed=9)  # same trunk, different adapter draw
    states = {part: read_adapters(source, part) for part in ("lora1", "lora2", "gate", "frozen")}
    for part, state in states.items():
        write_adapters(target, part, state)
        back = read_adapters(target, part)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    x = torch.randn(3, 5, 16)
    source.eval()
    target.eval()
    assert torch.equal(source(x), target(x))
    lora2 = states["lora2"]
    with pytest.raises(KeyError):
        write_adapters(target, "lora2", {k: v for k, v in lora2.items() if k != "layers.0.linear1.A"})
    with pytest.raises(KeyError):
        write_adapters(target, "lora2", {**lora2, "layers.9.linear1.A": torch.zeros(8, 16)})
    with pytest.raises(ValueError):
        write_adapters(target, "lora2", {**lora2, "coLoRA.block0.linear1.P": torch.zeros(4, 4)})
    # a wide, deep model's local P, Q load as a narrow one's global P, Q
    wide = wrapped_encoder(32, 4, seed=1)
    fill_random(wide, "lora2", 5)
    peer = {k: v for k, v in read_adapters(wide, "lora2").items() if is_cross_architecture_key(k)}
    narrow = wrapped_encoder(16, 2)
    write_adapters(narrow, "lora1", peer, strict=False)
    assert all(torch.equal(read_adapters(narrow, "lora1")[k], v) for k, v in peer.items())


def test_targets_that_cannot_carry_a_gated_adapter_are_refused() -> None:
    with pytest.raises(UserError, match="MultiheadAttention"):
        add_dual_adapters(encoder(16, 2), ["out_proj"])
    with pytest.raises(UserError, match="batch_first"):
        add_dual_adapters(encoder(16, 2, batch_first=False), ["linear1"])
    with pytest.raises(UserError, match=r"not nn\.Linear"):
        add_dual_adapters(encoder(16, 2), ["norm1"])
    with pytest.raises(UserError, match=r"no nn\.Linear"):
        add_dual_adapters(encoder(16, 2), ["q_proj"])


class ReEmbedded(nn.Module):
    """Every block's layer sees h = u E^T. The reference keeps the first 12 of 24 input dims (E_ref = [I 0]), the
    larger model rotates all 24 (E_big = O, orthogonal), so its best A is A_ref E_ref O^T, itself row-orthonormal:
    A alignment can reach zero error, and the extra dims are noise it must learn to ignore."""

    def __init__(self, embedding: torch.Tensor, depth: int) -> None:
        super().__init__()
        self.register_buffer("embedding", embedding)
        width = embedding.shape[0]
        self.layers = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(width, width)}) for _ in range(depth))

    def hidden(self, u: torch.Tensor) -> torch.Tensor:
        return u @ self.embedding.T

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        h = self.hidden(u)
        return torch.stack([layer["fc"](h) for layer in self.layers]).sum(0)


RANK4 = AdapterSettings(rank=4, alpha=8.0, dropout=0.0)


def re_embedded_pair(seed: int = 0) -> tuple[ReEmbedded, ReEmbedded, torch.Tensor]:
    """(reference of width 12 and depth 2, larger model of width 24 and depth 4, the map M with A* = A_ref M)."""
    rotation, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(seed)))
    keep = torch.eye(12, 24)
    torch.manual_seed(seed)
    reference, big = ReEmbedded(keep, 2), ReEmbedded(rotation, 4)
    add_dual_adapters(reference, ["fc"], RANK4, seed=0)
    add_dual_adapters(big, ["fc"], RANK4, seed=1)
    return reference, big, keep @ rotation.T


def a_mse(big: ReEmbedded, reference: ReEmbedded, a_big: dict, u: torch.Tensor) -> float:
    """Summed over the paired layers: mean((A_big h_big - A_ref h_ref)^2) over all inputs and tokens."""
    h_big, h_ref = big.hidden(u).reshape(-1, 24), reference.hidden(u).reshape(-1, 12)
    ref_layers = co_lora_layers(reference)
    return sum(float(((h_big @ a_big[k].T - h_ref @ ref_layers[k].A.T) ** 2).mean()) for k in ref_layers)


def test_a_alignment_reduces_the_projection_error_and_ends_row_orthonormal() -> None:
    reference, big, _ = re_embedded_pair()
    u = torch.randn(400, 3, 24)
    start = {k: layer.A.detach().clone() for k, layer in co_lora_layers(big).items()}
    ref_state = {k: v.clone() for k, v in read_adapters(reference, "frozen").items()}
    settings = AlignmentSettings(samples_a=400, samples_b=100, batch_size=8, epochs=4, lr=1e-2)
    report = align_to_reference(big, reference, u, settings)
    aligned = {k: layer.A.detach() for k, layer in co_lora_layers(big).items()}
    before, after = a_mse(big, reference, start, u), a_mse(big, reference, aligned, u)
    assert report.steps == 4 * 400 // 8
    assert report.a_mse_before == pytest.approx(before, rel=1e-5)
    assert report.a_mse_after == pytest.approx(after, rel=1e-5)
    assert after < 0.02 * before
    for a in aligned.values():
        torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=0)
    # the objective: MSE + 0.5 x mean over layers of the mean squared off-diagonal cosine of A's columns
    ortho = []
    for a in start.values():  # 24 columns of length r = 4
        unit = a / a.norm(dim=0, keepdim=True)
        cos = unit.T @ unit
        ortho.append(float((cos**2).sum() - (cos.diagonal() ** 2).sum()) / (24 * 23))
    assert report.a_loss_before == pytest.approx(before + 0.5 * sum(ortho) / len(ortho), rel=1e-5)
    assert all(torch.equal(read_adapters(reference, "frozen")[k], v) for k, v in ref_state.items())  # untouched


def whitened_error(x_big: torch.Tensor, x_ref: torch.Tensor, t: torch.Tensor) -> float:
    """||(X_big - X_ref T^T) S_big^-1/2||_F^2 with centred outputs and S = X^T X + 1e-4 I, by an SVD square root."""
    xb = (x_big - x_big.mean(0)).double()
    xr = (x_ref - x_ref.mean(0)).double()
    u, s, _ = torch.linalg.svd(xb.T @ xb + 1e-4 * torch.eye(xb.shape[1], dtype=torch.float64))
    return float((((xb - xr @ t.T) @ (u / s.sqrt()) @ u.T) ** 2).sum())


def b_outputs(model: ReEmbedded, u: torch.Tensor, width: int) -> dict:
    h = model.hidden(u).reshape(-1, width)
    return {k: h @ layer.A.T @ layer.B.T for k, layer in co_lora_layers(model).items()}


def test_b_alignment_maps_rotated_codes_and_keeps_b_when_codes_already_agree() -> None:
    u = torch.randn(100, 3, 24)
    settings = AlignmentSettings(samples_a=100, samples_b=100, epochs=0)  # A is set by hand, not trained
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(5)))
    for turn in (torch.eye(4), rotation):
        reference, big, best = re_embedded_pair()
        ref_layers, big_layers = co_lora_layers(reference), co_lora_layers(big)
        with torch.no_grad():
            for k, layer in big_layers.items():  # codes A_big h_big = turn (A_ref h_ref): row-orthonormal A_big
                layer.A.copy_(turn @ ref_layers[k].A @ best)
                layer.lora2_P.fill_(1.0)
                layer.lora1_Q.fill_(1.0)
        old_b = {k: layer.B.detach().clone() for k, layer in big_layers.items()}
        x_big, x_ref = b_outputs(big, u, 24), b_outputs(reference, u, 12)
        report = align_to_reference(big, reference, u, settings)
        for row in report.layers:
            k = (row.block, row.site)
            new_b, ref_b = big_layers[k].B.detach().double(), ref_layers[k].B.detach().double()
            mapping = new_b @ torch.linalg.pinv(ref_b)  # B_big = T B_ref, so T restricted to B_ref's range
            implied = old_b[k].double() @ torch.linalg.pinv(ref_b)
            before, after = whitened_error(x_big[k], x_ref[k], implied), whitened_error(x_big[k], x_ref[k], mapping)
            assert row.b_mismatch_before == pytest.approx(before, rel=1e-4, abs=1e-6)
            assert row.b_mismatch_after == pytest.approx(after, rel=1e-4, abs=1e-6)
            assert row.b_canonical_correlation == pytest.approx(1.0, abs=1e-4)  # the codes are linearly related
            assert after < 1e-3
            if turn is rotation:
                assert before > 1.0  # unrelated coordinates before: the rotation is far from the identity
            else:  # codes already equal: the CCA map gives back the model's own B (T B_ref = B_big)
                torch.testing.assert_close(new_b.float(), old_b[k], atol=1e-4, rtol=0)
        for layer in (*big_layers.values(), *ref_layers.values()):
            for name in layer.adapter_names("lora1") + layer.adapter_names("lora2"):
                assert torch.count_nonzero(getattr(layer, name)) == 0  # P, Q reset to 0
