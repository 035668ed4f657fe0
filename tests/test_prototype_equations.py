"""Losses and server steps checked against their equations written out by hand, not against a re-run of the code:
FedKD's adaptive mutual distillation loss, FML's deep-mutual-learning loss, and ProtoNorm's Prototype Upscaling
(PU) at the HtFL benchmark's own settings (its D, s, lambda, batch size, and 10 / 20 / 30 classes)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch
from tests.conftest import simulator, tiny_config
from torch import nn
from torch.nn import functional as F

from fedpal.algorithms.core.contract import AlgorithmSetup
from fedpal.algorithms.core.training import TermBatch, TrainSettings
from fedpal.algorithms.distillation.mutual import MutualBatch
from fedpal.algorithms.prototype.protonorm import ProtoNorm, ProtoNormHyperparameters

# ------------------------------------------------------------------------------------------- hand arithmetic


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def cross_entropy(logits: list[list[float]], labels: list[int]) -> float:
    """mean_i -log softmax(z_i)[y_i]"""
    return sum(-math.log(softmax(z)[y]) for z, y in zip(logits, labels, strict=True)) / len(labels)


def kl_over_elements(target_logits: list[list[float]], input_logits: list[list[float]]) -> float:
    """HtFLlib's nn.KLDivLoss()(log p_input, p_target): sum_ic p_t (log p_t - log p_in), divided by B * C."""
    total, count = 0.0, 0
    for zt, zi in zip(target_logits, input_logits, strict=True):
        for pt, pi in zip(softmax(zt), softmax(zi), strict=True):
            total += pt * (math.log(pt) - math.log(pi))
            count += 1
    return total / count


def batch(logits_a: list[list[float]], logits_b: list[list[float]], **extra: object) -> MutualBatch:
    a, b = torch.tensor(logits_a), torch.tensor(logits_b)
    features_a = extra.pop("features_a", a)
    features_b = extra.pop("features_b", b)
    module = extra.pop("module", None)
    y = torch.tensor(extra.pop("y"))
    return MutualBatch(
        y.new_zeros((len(y), 1)).float(), y, torch.arange(len(y)), 0, features_a, a, features_b, b, module
    )


# ------------------------------------------------------------------------------------------- FedKD


TEACHER = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
STUDENT = [[0.0, 0.0, 0.0], [1.0, 1.0, -2.0]]
LABELS = [0, 1]


def test_fedkd_adaptive_loss_matches_the_paper_written_out() -> None:
    """Wu et al. (2022), Eqs. 1-4 as HtFLlib sums them: with the task losses L_t, L_s (cross-entropy),
    L = L_t + KL(p_s||p_t)/(L_t + L_s) + MSE(H_t, W_h H_s)/(L_t + L_s)
      + L_s + KL(p_t||p_s)/(L_t + L_s) + MSE(H_t, W_h H_s)/(L_t + L_s)."""
    h_t = [[1.0, 2.0], [0.0, 1.0]]
    h_s = [[1.0, 0.0], [2.0, 1.0]]
    w_h = [[1.0, 0.0], [0.0, 2.0]]  # W_h H_s = [[1, 0], [2, 2]]
    mapped = [[sum(w_h[r][k] * h[k] for k in range(2)) for r in range(2)] for h in h_s]
    mse = sum((a - b) ** 2 for ht, hm in zip(h_t, mapped, strict=True) for a, b in zip(ht, hm, strict=True)) / 4
    assert mse == pytest.approx(9 / 4)  # (0, 2) and (-2, -1): 0 + 4 + 4 + 1 over B x D = 4 entries
    ce_t, ce_s = cross_entropy(TEACHER, LABELS), cross_entropy(STUDENT, LABELS)
    scale = ce_t + ce_s
    expected = (
        ce_t
        + kl_over_elements(STUDENT, TEACHER) / scale
        + mse / scale
        + ce_s
        + kl_over_elements(TEACHER, STUDENT) / scale
        + mse / scale
    )
    algorithm = simulator(tiny_config("fedkd")).algorithm
    linear = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(w_h))
    value = algorithm.mutual_loss(
        batch(TEACHER, STUDENT, features_a=torch.tensor(h_t), features_b=torch.tensor(h_s), module=linear, y=LABELS)
    )
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)


def test_fedkd_distillation_weakens_as_the_task_losses_grow() -> None:
    """The same models' disagreement weighs 1/(L_t + L_s): raising both task losses shrinks the KL and MSE terms."""
    algorithm = simulator(tiny_config("fedkd")).algorithm
    identity = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(3))

    def distillation(labels: list[int]) -> float:
        total = float(algorithm.mutual_loss(batch(TEACHER, STUDENT, module=identity, y=labels)).detach())
        return total - cross_entropy(TEACHER, labels) - cross_entropy(STUDENT, labels)

    easy, hard = [0, 1], [2, 2]  # the classes both models favour / the ones they do not
    assert cross_entropy(TEACHER, hard) + cross_entropy(STUDENT, hard) > cross_entropy(TEACHER, easy) + cross_entropy(
        STUDENT, easy
    )
    assert 0 < distillation(hard) < distillation(easy)


# ------------------------------------------------------------------------------------------- FML


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 0.5), (0.3, 0.8), (1.0, 1.0)])
def test_fml_mutual_loss_matches_deep_mutual_learning_written_out(alpha: float, beta: float) -> None:
    """Shen et al. (2020): L_p = alpha CE(z_p, y) + (1 - alpha) KL(p_s||p_p), L_s = beta CE(z_s, y) + (1 - beta)
    KL(p_p||p_s); the step follows L_p + L_s (HtFLlib's two backward passes accumulate)."""
    personal, shared = TEACHER, STUDENT
    expected = (
        alpha * cross_entropy(personal, LABELS)
        + (1 - alpha) * kl_over_elements(shared, personal)
        + beta * cross_entropy(shared, LABELS)
        + (1 - beta) * kl_over_elements(personal, shared)
    )
    algorithm = simulator(tiny_config("fml", algorithm={"alpha": alpha, "beta": beta})).algorithm
    value = algorithm.mutual_loss(batch(personal, shared, y=LABELS))
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)


def test_fml_kl_terms_vanish_when_the_models_agree() -> None:
    algorithm = simulator(tiny_config("fml", algorithm={"alpha": 0.2, "beta": 0.6})).algorithm
    value = algorithm.mutual_loss(batch(TEACHER, TEACHER, y=LABELS))
    assert float(value.detach()) == pytest.approx((0.2 + 0.6) * cross_entropy(TEACHER, LABELS), rel=1e-6)


# ------------------------------------------------------------------------------------------- PU at benchmark settings

BENCHMARK = tomllib.loads((Path(__file__).resolve().parents[1] / "benchmarks/htfl/config.toml").read_text())
D = int(BENCHMARK["model"]["feature_dim"])
S = float(BENCHMARK["algorithms"]["protonorm"]["scale"])
LAM = float(BENCHMARK["algorithms"]["protonorm"]["lam"])
B = int(BENCHMARK["train"]["batch_size"])
CLASSES = (10, 20, 30)  # the benchmark's MNIST, and the crowded mnist_fashion / mnist_fashion_animal


def protonorm(classes: int, **options: object) -> ProtoNorm:
    hp = ProtoNormHyperparameters(**{"lam": LAM, "scale": S, **options})  # type: ignore[arg-type]
    return ProtoNorm(hp, AlgorithmSetup(classes, TrainSettings(batch_size=B), {}, 0, feature_dim=D))


def crowded_means(classes: int, spread: float, seed: int = 0) -> torch.Tensor:
    """Non-negative (post-ReLU) class means around one shared direction: cosines near 1 when ``spread`` is small."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.rand(D, generator=gen) + 0.5
    return (common + spread * torch.rand(classes, D, generator=gen)) * 3.0


def server_targets(algorithm: ProtoNorm, means: torch.Tensor) -> torch.Tensor:
    """What a client pulls toward: the server's global prototypes times the client's s (PU)."""
    present = torch.ones(means.shape[0], dtype=torch.bool)
    global_protos, _, _, _ = algorithm.make_global(algorithm.init_server(), 1, means, present, {})
    return global_protos * algorithm.target_scale()


def test_the_settings_are_the_benchmarks() -> None:
    assert (D, S, LAM, B) == (64, 28.0, 10.0, 10)  # so a change of the benchmark is noticed here
    assert max(CLASSES) <= D + 1  # a simplex exists (the spec's condition)


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("spread", [1.0, 1e-3, 1e-7])
def test_pu_targets_have_norm_s_and_stay_finite_for_crowded_means(classes: int, spread: float) -> None:
    algorithm = protonorm(classes)
    means = crowded_means(classes, spread)
    targets = server_targets(algorithm, means)
    assert torch.isfinite(targets).all()
    assert torch.allclose(targets.norm(dim=1), torch.full((classes,), S), rtol=1e-5)  # |s p| = s |p| = s
    unit = targets / S
    cos = (unit @ unit.T)[~torch.eye(classes, dtype=torch.bool)]
    start = F.normalize(means, dim=1)
    start_cos = (start @ start.T)[~torch.eye(classes, dtype=torch.bool)]
    assert float(cos.max()) < float(start_cos.max())  # the crowded pair is pushed apart
    assert float(cos.mean()) == pytest.approx(-1 / (classes - 1), abs=1e-3)  # centred: sum of the unit rows ~ 0


@pytest.mark.parametrize("classes", CLASSES)
def test_pu_targets_do_not_depend_on_the_scale_of_the_means(classes: int) -> None:
    """PA normalises first, so averages of norm 1e-6 or 1e6 give the same unit prototypes, hence targets of norm s."""
    algorithm = protonorm(classes)
    means = crowded_means(classes, 0.5)
    reference = server_targets(algorithm, means)
    for factor in (1e-6, 1e6):
        scaled = server_targets(algorithm, means * factor)
        assert torch.isfinite(scaled).all() and torch.allclose(scaled, reference, atol=1e-4 * S)


@pytest.mark.parametrize("classes", CLASSES)
def test_identical_and_dead_means_still_give_finite_targets_of_norm_s(classes: int) -> None:
    algorithm = protonorm(classes)
    means = crowded_means(classes, 0.5)
    means[1] = means[0]  # two classes with the same average: d^2 = 0, the 1e-10 in the force keeps it finite
    means[2] = 0.0  # all-dead ReLU features: the class starts from its own axis
    targets = server_targets(algorithm, means)
    assert torch.isfinite(targets).all()
    assert torch.allclose(targets.norm(dim=1), torch.full((classes,), S), rtol=1e-5)


@pytest.mark.parametrize("classes", CLASSES)
def test_pu_without_pa_sends_s_times_the_normalised_averages(classes: int) -> None:
    algorithm = protonorm(classes, pa=False)
    means = crowded_means(classes, 1e-3)
    means[0] *= 1e-9  # a tiny but non-zero average keeps its direction
    targets = server_targets(algorithm, means)
    assert torch.allclose(targets, S * means / means.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert torch.allclose(targets.norm(dim=1), torch.full((classes,), S), rtol=1e-5)


@pytest.mark.parametrize("classes", CLASSES)
def test_client_pull_at_the_benchmark_settings_is_the_bounded_mse(classes: int) -> None:
    """lam / (B D) sum_i |r_i - s p_i|^2 for a batch of B rows. Dead features r = 0 give lam s^2 / D exactly
    (|s p| = s for every row) and a per-row gradient 2 lam (r - s p) / (B D), of norm 2 lam s / (B D): finite,
    and the same for 10, 20 or 30 classes."""
    algorithm = protonorm(classes)
    targets = server_targets(algorithm, crowded_means(classes, 1e-3))
    y = torch.arange(B) % classes
    features = torch.zeros(B, D, requires_grad=True)
    context = {"targets": targets, "has_target": torch.ones(classes, dtype=torch.bool)}
    term_batch = TermBatch(
        torch.zeros(B, 1), y, torch.arange(B), features, features, torch.ones(B), 0, context, {}, False
    )
    value, _ = algorithm.prototype_term({}, term_batch)
    assert float(value.detach()) == pytest.approx(LAM * S**2 / D, rel=1e-5)
    value.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    row_norms = features.grad.norm(dim=1)
    assert torch.allclose(row_norms, torch.full((B,), 2 * LAM * S / (B * D)), rtol=1e-5)
    # features already at their targets: no pull at all
    on_target = targets[y].clone().requires_grad_(True)
    at_rest = TermBatch(
        torch.zeros(B, 1), y, torch.arange(B), on_target, on_target, torch.ones(B), 0, context, {}, False
    )
    value, _ = algorithm.prototype_term({}, at_rest)
    assert float(value.detach()) == 0.0
