"""Mechanism checks for the prototype-method server math: ProtoNorm's Prototype Alignment (PA) and FedTGP's
trainable prototypes with the adaptive-margin contrastive loss (specs: protonorm.md §8, fedproto_fedtgp.md §8)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from fedpal.algorithms.prototype.alignment import (
    AlignmentResult,
    align_prototypes,
    pairwise_cosine_stats,
    pairwise_force,
    prototype_energy,
)
from fedpal.algorithms.prototype.trainable import (
    PrototypeGenerator,
    adaptive_margin,
    margin_contrastive_loss,
    train_generator,
)

# ----------------------------------------------------------------------------------------------------------------
# helpers


def crowded_prototypes(c: int, d: int, seed: int = 0) -> torch.Tensor:
    """Non-negative rows (like ReLU features) with a common offset: class means that crowd together."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, d, generator=g).abs() + 0.5


def off_diagonal_cosines(x: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(x.to(torch.float64), dim=1)
    cos = unit @ unit.T
    mask = ~torch.eye(x.shape[0], dtype=torch.bool)
    return cos[mask]


def min_pairwise_distance(x: torch.Tensor) -> float:
    unit = F.normalize(x.to(torch.float64), dim=1)
    dist = torch.cdist(unit, unit)
    dist.fill_diagonal_(math.inf)
    return float(dist.min())


def reference_pa(x: torch.Tensor, steps: int = 500, early_stop: int | None = 10) -> tuple[torch.Tensor, int]:
    """A plain, per-step transcription of the PA loop (explicit [C, C, D] differences, float64) with the official
    early-stop rule, written independently of the module: returns (points, updates applied)."""
    x = x.to(torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    c = x.shape[0]
    v = torch.zeros_like(x)
    lr = 0.1
    previous = None
    same = 0
    applied = 0
    for t in range(steps):
        diff = x[:, None, :] - x[None, :, :]
        d2 = (diff**2).sum(-1) + 1e-6 * torch.eye(c, dtype=x.dtype)
        w = 1.0 / (d2 + 1e-10)
        w.fill_diagonal_(0.0)
        force = (w[:, :, None] * diff).sum(1)
        v = 0.9 * v + lr * force
        x = x + v
        x = x / x.norm(dim=1, keepdim=True)
        applied += 1
        if t % 10 == 0:
            lr *= 0.95
        if early_stop is None or t < early_stop:
            continue
        m = float(f"{float(force.norm(dim=1).mean()):.4f}")
        if t == early_stop:
            previous = m
            continue
        same = same + 1 if m == previous else 0
        previous = m
        if same == 10:
            break
    return x, applied


# ----------------------------------------------------------------------------------------------------------------
# Prototype Alignment


@pytest.mark.parametrize("dim", [16, 64])
def test_pa_without_early_stop_reaches_the_regular_simplex(dim: int) -> None:
    start = crowded_prototypes(10, dim)
    result = align_prototypes(start, steps=500, early_stop=None)
    assert isinstance(result, AlignmentResult)
    assert result.iterations == 500
    assert result.prototypes.shape == (10, dim)
    assert torch.allclose(result.prototypes.norm(dim=1).double(), torch.ones(10, dtype=torch.float64), atol=1e-6)
    cos = off_diagonal_cosines(result.prototypes)
    assert float((cos + 1.0 / 9.0).abs().max()) < 1e-3
    # the start is far from it (so the check can fail)
    assert float((off_diagonal_cosines(start) + 1.0 / 9.0).abs().max()) > 0.5
    # the log-energy force at the regular simplex is radial with norm (C - 1) / 2
    assert result.final_force == pytest.approx(4.5, abs=1e-3)


@pytest.mark.parametrize(("classes", "dim"), [(10, 64), (10, 16), (30, 64)])
def test_pa_official_early_stop_centres_and_separates(classes: int, dim: int) -> None:
    start = crowded_prototypes(classes, dim, seed=3)
    result = align_prototypes(start)
    # earliest stop is t = 20, i.e. 21 updates; it must stop before the budget of 500
    assert 21 <= result.iterations < 500
    cos = off_diagonal_cosines(result.prototypes)
    assert float(cos.mean()) == pytest.approx(-1.0 / (classes - 1), abs=1e-3)
    assert min_pairwise_distance(result.prototypes) > min_pairwise_distance(start)
    assert torch.allclose(result.prototypes.norm(dim=1).double(), torch.ones(classes, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("early_stop", [10, None])
def test_pa_matches_a_step_by_step_transcription(seed: int, early_stop: int | None) -> None:
    start = crowded_prototypes(8, 12, seed=seed)
    result = align_prototypes(start.double(), early_stop=early_stop)
    expected, applied = reference_pa(start, early_stop=early_stop)
    assert result.iterations == applied
    assert torch.allclose(result.prototypes, expected, atol=1e-8)


def test_pa_early_stop_never_before_t_20() -> None:
    # C = 1: the force is identically 0, so the rounded mean is constant from t = 10 on -> stop at t = 20
    result = align_prototypes(torch.tensor([[3.0, 4.0]]))
    assert result.iterations == 21
    assert result.final_force == 0.0
    assert torch.allclose(result.prototypes, torch.tensor([[0.6, 0.8]]))
    later = align_prototypes(torch.tensor([[3.0, 4.0]]), early_stop=30)
    assert later.iterations == 41


def test_pa_single_class_returns_the_normalised_input() -> None:
    x = torch.tensor([[0.0, -2.0, 0.0, 0.0]])
    for early_stop in (10, None):
        out = align_prototypes(x, early_stop=early_stop).prototypes
        assert torch.isfinite(out).all()
        assert torch.equal(out, torch.tensor([[0.0, -1.0, 0.0, 0.0]]))


def test_pa_is_invariant_to_positive_row_scaling() -> None:
    start = crowded_prototypes(10, 16, seed=5).double()
    scales = torch.tensor([0.01, 0.5, 1.0, 3.0, 7.0, 80.0, 0.2, 1e3, 2.0, 9.0], dtype=torch.float64)
    for early_stop in (10, None):
        plain = align_prototypes(start, early_stop=early_stop)
        scaled = align_prototypes(start * scales[:, None], early_stop=early_stop)
        assert plain.iterations == scaled.iterations
        assert torch.allclose(plain.prototypes, scaled.prototypes, atol=1e-9)


def test_pa_permuting_classes_permutes_the_output() -> None:
    start = crowded_prototypes(10, 16, seed=6).double()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    for early_stop in (10, None):
        plain = align_prototypes(start, early_stop=early_stop)
        permuted = align_prototypes(start[perm], early_stop=early_stop)
        assert plain.iterations == permuted.iterations
        assert torch.allclose(plain.prototypes[perm], permuted.prototypes, atol=1e-9)


@pytest.mark.parametrize("early_stop", [10, None])
def test_pa_two_classes_become_antipodal(early_stop: int | None) -> None:
    start = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1]])  # cosine ≈ 0.99
    out = align_prototypes(start, early_stop=early_stop).prototypes
    cos = float(F.cosine_similarity(out[0:1].double(), out[1:2].double()))
    assert cos == pytest.approx(-1.0, abs=1e-4)


@pytest.mark.parametrize("energy", ["log", "coulomb"])
def test_force_is_minus_the_energy_gradient(energy: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    force = pairwise_force(x, energy)

    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(prototype_energy(leaf, energy), leaf)
    assert torch.allclose(force, -grad, rtol=1e-9, atol=1e-9)

    # central finite differences on every coordinate
    h = 1e-6
    numeric = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for k in range(x.shape[1]):
            plus, minus = x.clone(), x.clone()
            plus[i, k] += h
            minus[i, k] -= h
            numeric[i, k] = (prototype_energy(plus, energy) - prototype_energy(minus, energy)) / (2 * h)
    assert torch.allclose(force, -numeric, rtol=1e-5, atol=1e-6)


def test_log_and_coulomb_forces_differ_and_match_their_formulas() -> None:
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    # distance 2: log force magnitude 2/4 = 0.5; Coulomb 2/8 = 0.25; point 0 is pushed towards -x
    assert torch.allclose(pairwise_force(x, "log"), torch.tensor([[-0.5, 0.0], [0.5, 0.0]], dtype=torch.float64))
    assert torch.allclose(pairwise_force(x, "coulomb"), torch.tensor([[-0.25, 0.0], [0.25, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError):
        pairwise_force(x, "gravity")


def test_pa_coulomb_energy_also_reaches_the_simplex() -> None:
    result = align_prototypes(crowded_prototypes(6, 16, seed=2), energy="coulomb", early_stop=None)
    cos = off_diagonal_cosines(result.prototypes)
    assert float((cos + 1.0 / 5.0).abs().max()) < 1e-3


@pytest.mark.parametrize("early_stop", [10, None])
def test_pa_thirty_classes_in_64_dims_stays_finite(early_stop: int | None) -> None:
    result = align_prototypes(crowded_prototypes(30, 64, seed=1), early_stop=early_stop)
    assert torch.isfinite(result.prototypes).all()
    assert math.isfinite(result.final_force)
    stats = pairwise_cosine_stats(result.prototypes)
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["cos_mean"] == pytest.approx(-1.0 / 29.0, abs=1e-3)
    assert stats["norm_mean"] == pytest.approx(1.0, abs=1e-6)


def test_pa_output_dtype_and_input_validation() -> None:
    start = crowded_prototypes(4, 6)
    assert align_prototypes(start).prototypes.dtype == torch.float32
    assert align_prototypes(start.double()).prototypes.dtype == torch.float64
    with pytest.raises(ValueError, match="zero-norm"):
        align_prototypes(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError):
        align_prototypes(start, energy="gravity")
    with pytest.raises(ValueError):
        align_prototypes(torch.ones(3))
    with pytest.raises(ValueError):
        align_prototypes(torch.tensor([[1.0, float("nan")]]))


def test_cosine_stats_on_known_configurations() -> None:
    basis = 2.0 * torch.eye(4)
    stats = pairwise_cosine_stats(basis)
    assert stats["cos_min"] == pytest.approx(0.0, abs=1e-12)
    assert stats["cos_mean"] == pytest.approx(0.0, abs=1e-12)
    assert stats["cos_max"] == pytest.approx(0.0, abs=1e-12)
    assert stats["angle_min_deg"] == pytest.approx(90.0)
    assert stats["angle_mean_deg"] == pytest.approx(90.0)
    assert stats["norm_mean"] == pytest.approx(2.0)

    # three directions in a plane: 0°, 90°, 180° -> pair angles 90, 180, 90; cosines 0, -1, 0; norms 1, 2, 3
    plane = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    stats = pairwise_cosine_stats(plane)
    assert stats["cos_min"] == pytest.approx(-1.0)
    assert stats["cos_max"] == pytest.approx(0.0, abs=1e-12)
    assert stats["cos_mean"] == pytest.approx(-1.0 / 3.0)
    assert stats["angle_min_deg"] == pytest.approx(90.0)
    assert stats["angle_mean_deg"] == pytest.approx(120.0)
    assert stats["norm_mean"] == pytest.approx(2.0)

    single = pairwise_cosine_stats(torch.tensor([[3.0, 4.0]]))
    assert math.isnan(single["cos_mean"]) and single["norm_mean"] == pytest.approx(5.0)


# ----------------------------------------------------------------------------------------------------------------
# FedTGP: adaptive margin


def line_means() -> torch.Tensor:
    """Class means on a line at 0, 1, 4, 10 (in R^2): gaps 1, 1, 3, 6."""
    return torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0], [10.0, 0.0]])


def test_margin_is_the_largest_nearest_class_gap_capped_by_tau() -> None:
    present = torch.ones(4, dtype=torch.bool)
    assert adaptive_margin(line_means(), present, tau=100.0) == pytest.approx(6.0)
    assert adaptive_margin(line_means(), present, tau=5.0) == pytest.approx(5.0)
    assert adaptive_margin(line_means(), present, tau=0.5) == pytest.approx(0.5)  # tau below every gap


def test_margin_ignores_absent_classes() -> None:
    means = torch.cat([line_means(), torch.tensor([[10.5, 0.0], [float("nan"), 0.0]])])
    present = torch.tensor([True, True, True, True, False, False])
    # class 4 (absent) would shrink class 3's gap to 0.5; class 5 holds NaN: both must be ignored
    assert adaptive_margin(means, present, tau=100.0) == pytest.approx(6.0)
    # with class 4 present the maximum gap becomes class 2's 3
    present[4] = True
    assert adaptive_margin(means, present, tau=100.0) == pytest.approx(3.0)


def test_margin_with_fewer_than_two_present_classes_is_tau() -> None:
    one = torch.tensor([True, False, False, False])
    assert adaptive_margin(line_means(), one, tau=7.0) == 7.0
    assert adaptive_margin(line_means(), torch.zeros(4, dtype=torch.bool), tau=7.0) == 7.0


# ----------------------------------------------------------------------------------------------------------------
# FedTGP: loss and gradient


def test_zero_margin_loss_is_cross_entropy_over_negative_distances() -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.rand(7, 5, generator=g) * 4
    y = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    assert torch.allclose(margin_contrastive_loss(d, y, 0.0), F.cross_entropy(-d, y))
    # with a margin the true class's distance is enlarged: -log softmax(-(d + m e_y))_y
    m = 1.5
    rows = torch.arange(7)
    manual = (torch.logsumexp(-(d + m * F.one_hot(y, 5)), dim=1) + d[rows, y] + m).mean()
    assert torch.allclose(margin_contrastive_loss(d, y, m), manual)
    assert margin_contrastive_loss(d, y, m) > margin_contrastive_loss(d, y, 0.0)


@pytest.mark.parametrize("margin", [0.0, 2.0])
def test_loss_gradient_pulls_the_true_prototype_and_pushes_the_others(margin: float) -> None:
    g = torch.Generator().manual_seed(1)
    outputs = torch.randn(5, 8, generator=g, requires_grad=True)
    point = torch.randn(1, 8, generator=g)
    label = torch.tensor([3])
    before = torch.cdist(point, outputs).detach().squeeze(0)
    loss = margin_contrastive_loss(torch.cdist(point, outputs), label, margin)
    loss.backward()
    assert outputs.grad is not None
    with torch.no_grad():
        moved = outputs - 1e-3 * outputs.grad
    after = torch.cdist(point, moved).squeeze(0)
    assert after[3] < before[3]
    others = torch.tensor([0, 1, 2, 4])
    assert bool((after[others] > before[others]).all())


# ----------------------------------------------------------------------------------------------------------------
# FedTGP: generator and its training


def separated_pairs(c: int = 5, d: int = 8, per_class: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` client prototypes per class, tight around well-separated class centres."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(c, d, generator=g)
    protos = (centres[:, None, :] + 0.3 * torch.randn(c, per_class, d, generator=g)).reshape(-1, d)
    return protos, torch.arange(c).repeat_interleave(per_class)


def test_generator_layout_and_forward() -> None:
    gen = PrototypeGenerator(5, 8)
    shapes = {name: tuple(p.shape) for name, p in gen.named_parameters()}
    assert shapes == {
        "embedding.weight": (5, 8),
        "hidden.0.weight": (8, 8),
        "hidden.0.bias": (8,),
        "out.weight": (8, 8),
        "out.bias": (8,),
    }
    labels = torch.tensor([4, 0, 0])
    hidden = torch.relu(gen.embedding.weight[labels] @ gen.hidden[0].weight.T + gen.hidden[0].bias)
    manual = hidden @ gen.out.weight.T + gen.out.bias
    assert torch.allclose(gen(labels), manual)
    assert torch.allclose(gen.all_prototypes(), gen(torch.arange(5)))
    assert PrototypeGenerator(5, 8, hidden_dim=3).hidden[0].out_features == 3
    # seeded initialisation is reproducible
    a = PrototypeGenerator(5, 8, generator=torch.Generator().manual_seed(3))
    b = PrototypeGenerator(5, 8, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_training_separates_prototypes_by_the_margin() -> None:
    protos, labels = separated_pairs()
    means = torch.stack([protos[labels == c].mean(0) for c in range(5)])
    delta = adaptive_margin(means, torch.ones(5, dtype=torch.bool), tau=3.0)
    assert delta == 3.0  # every gap is larger than tau here
    gen = PrototypeGenerator(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        initial = float(margin_contrastive_loss(torch.cdist(protos, gen.all_prototypes()), labels, delta))
    rng = torch.Generator().manual_seed(2)
    losses = [train_generator(gen, protos, labels, margin=delta, generator=rng) for _ in range(3)]
    assert losses[-1] < 0.5 * initial
    assert losses[-1] < losses[0]
    with torch.no_grad():
        dist = torch.cdist(protos, gen.all_prototypes())
    d_true = dist.gather(1, labels[:, None]).squeeze(1)
    d_other = dist.masked_fill(F.one_hot(labels, 5).bool(), math.inf).min(dim=1).values
    assert float((d_true + delta < d_other).float().mean()) >= 0.8


def test_generator_covers_absent_classes_and_trains_against_all_outputs() -> None:
    protos, labels = separated_pairs()
    keep = labels < 3  # classes 3 and 4 are absent from this round's pairs
    gen = PrototypeGenerator(5, 8, generator=torch.Generator().manual_seed(1))
    before = gen.all_prototypes().detach().clone()
    embedding_before = gen.embedding.weight.detach().clone()
    train_generator(gen, protos[keep], labels[keep], margin=1.0, epochs=5, generator=torch.Generator().manual_seed(0))
    after = gen.all_prototypes().detach()
    assert after.shape == (5, 8)
    assert torch.isfinite(after).all()
    # absent classes still appear as negatives in the softmax, so their embeddings are trained too
    assert not torch.equal(gen.embedding.weight.detach()[3:], embedding_before[3:])
    assert not torch.allclose(after[3:], before[3:])


def test_train_generator_is_deterministic_given_the_generator() -> None:
    protos, labels = separated_pairs(seed=4)
    base = PrototypeGenerator(5, 8, generator=torch.Generator().manual_seed(0))
    runs = []
    for seed in (7, 7, 8):
        gen = copy.deepcopy(base)
        loss = train_generator(gen, protos, labels, margin=1.0, epochs=3, generator=torch.Generator().manual_seed(seed))
        runs.append((loss, [p.detach().clone() for p in gen.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1], strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[2][1], strict=True))


def test_train_generator_validates_its_inputs() -> None:
    gen = PrototypeGenerator(3, 4)
    rng = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        train_generator(gen, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), margin=1.0, generator=rng)
    with pytest.raises(ValueError):
        train_generator(gen, torch.zeros(2, 4), torch.tensor([0, 3]), margin=1.0, generator=rng)
    with pytest.raises(ValueError):
        train_generator(gen, torch.zeros(2, 5), torch.tensor([0, 1]), margin=1.0, generator=rng)


def test_one_training_step_is_sgd_on_the_acl_over_l2_distances_to_all_outputs() -> None:
    protos, labels = separated_pairs(per_class=1)  # 5 pairs, one batch of 10 -> a single full-batch step
    protos, labels = protos[:3], labels[:3]  # classes 3 and 4 only appear as negatives
    gen = PrototypeGenerator(5, 8, generator=torch.Generator().manual_seed(0))
    manual = copy.deepcopy(gen)
    loss = train_generator(gen, protos, labels, margin=0.7, epochs=1, lr=0.05, generator=torch.Generator())

    expected_loss = margin_contrastive_loss(torch.cdist(protos, manual.all_prototypes()), labels, 0.7)
    grads = torch.autograd.grad(expected_loss, list(manual.parameters()))
    assert loss == pytest.approx(float(expected_loss.detach()), rel=1e-6)
    for p, q, g in zip(gen.parameters(), manual.parameters(), grads, strict=True):
        assert torch.allclose(p, q - 0.05 * g, atol=1e-6)
