"""The robust aggregation rules (fedpal.robustness): hand-computed cases of each rule's equation, the limiting cases
where a rule must equal the mean, order invariance, resistance to outliers at 1e6, the refusals of impossible
configurations, and the class-wise rules for prototypes."""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch

from fedpal.common.tensors import Tensors
from fedpal.engine.mean_fold import weighted_mean
from fedpal.engine.reduction import MeanReducer
from fedpal.errors import UserError
from fedpal.robustness.bulyan import Bulyan, mean_nearest_median
from fedpal.robustness.class_wise import class_wise
from fedpal.robustness.coordinate_median import coordinate_median
from fedpal.robustness.krum import Krum, MultiKrum, krum_scores, squared_distances
from fedpal.robustness.norm_bound import NormBound, bound_norm, joint_norm
from fedpal.robustness.rule import RULE_NAMES, build_rule
from fedpal.robustness.trimmed_mean import TrimmedMean, trimmed_count

# settings that make every rule usable with 7 or more clients (Bulyan's 4f+3 = 7 at f = 1)
SETTINGS: dict[str, dict[str, float]] = {
    "mean": {},
    "median": {},
    "trimmed_mean": {"beta": 0.2},
    "krum": {"f": 1},
    "multikrum": {"f": 1},
    "bulyan": {"f": 1},
    "norm_bound": {"C": 1.0},
}
ROBUST = ("median", "trimmed_mean", "krum", "multikrum", "bulyan")  # the rules meant to resist outliers


def scalars(values: list[float], dtype: torch.dtype = torch.float64) -> dict[int, Tensors]:
    """Client i holds the one-coordinate tensor values[i]."""
    return {i: {"w": torch.tensor([v], dtype=dtype)} for i, v in enumerate(values)}


def random_parts(
    seed: int, n: int, ids: list[int] | None = None
) -> tuple[dict[int, Tensors], dict[int, float], Tensors]:
    """n clients with two float32 tensors each, positive weights, and a reference (the last broadcast)."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(range(n)) if ids is None else ids
    reference = {"a": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)}
    parts = {cid: {k: v + torch.randn(v.shape, generator=gen) for k, v in reference.items()} for cid in ids}
    weights = {cid: float(torch.randint(1, 50, (), generator=gen)) for cid in ids}
    return parts, weights, reference


def assert_close(actual: Tensors, expected: Tensors, tol: float = 1e-7) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        assert torch.allclose(actual[k].double(), expected[k].double(), atol=tol, rtol=0), (k, actual[k], expected[k])


def assert_identical(actual: Tensors, expected: Tensors) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        assert actual[k].dtype == expected[k].dtype and torch.equal(actual[k], expected[k]), k


# ---- hand-computed cases


def test_median_odd_and_even_counts_by_hand() -> None:
    # per coordinate: odd count {5, -1, 3} -> 3; even count {1, 2, 3, 10} -> mean of the middle two (2 + 3) / 2
    assert coordinate_median(scalars([5.0, -1.0, 3.0]))["w"].item() == 3.0
    assert coordinate_median(scalars([10.0, 1.0, 3.0, 2.0]))["w"].item() == 2.5
    # two coordinates sorted independently: column 0 {4, 0, 2, 8} -> 3, column 1 {-1, 7, 5, 6} -> 5.5
    parts = {i: {"w": torch.tensor(row)} for i, row in enumerate([[4.0, -1.0], [0.0, 7.0], [2.0, 5.0], [8.0, 6.0]])}
    out = coordinate_median(parts, {0: 100.0, 1: 1.0, 2: 1.0, 3: 1.0})  # weights do not move the median
    assert out["w"].tolist() == [3.0, 5.5] and out["w"].dtype == torch.float32


def test_trimmed_mean_by_hand() -> None:
    values = [0.5, 1.0, 2.0, 100.0]
    # beta 0.25 of 4 trims one value per side: mean of {1, 2}
    assert TrimmedMean(beta=0.25)(scalars(values))["w"].item() == pytest.approx(1.5, abs=1e-7)
    # beta 0.2 of 4 trims floor(0.8) = 0: the plain (unweighted) mean
    assert TrimmedMean()(scalars(values), {0: 9.0, 1: 1.0, 2: 1.0, 3: 1.0})["w"].item() == pytest.approx(25.875)
    # ten clients, beta 0.2 trims two per side: {1..9, 1000} -> mean of {3, ..., 8} = 5.5
    assert TrimmedMean()(scalars([*range(1, 10), 1000.0]))["w"].item() == pytest.approx(5.5, abs=1e-7)
    assert [trimmed_count(0.29, 100), trimmed_count(0.2, 5), trimmed_count(0.2, 4)] == [29, 1, 0]


# five points in the plane; squared distances: d01=1 d02=1 d03=8 d04=200 d12=2 d13=5 d14=181 d23=5 d24=181 d34=128.
# With f = 1 each point's score sums its n - f - 2 = 2 nearest others:
# p0: 1+1 = 2, p1: 1+2 = 3, p2: 1+2 = 3, p3: 5+5 = 10, p4: 128+181 = 309.
FIVE_POINTS = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (2.0, 2.0), (10.0, 10.0)]


def five_points(ids: list[int] | None = None, shift: tuple[float, float] = (0.0, 0.0)) -> dict[int, Tensors]:
    ids = list(range(5)) if ids is None else ids
    return {
        cid: {"w": torch.tensor(p, dtype=torch.float64) + torch.tensor(shift)}
        for cid, p in zip(ids, FIVE_POINTS, strict=True)
    }


def test_krum_scores_and_choice_by_hand() -> None:
    vectors = torch.tensor(FIVE_POINTS, dtype=torch.float64)
    assert squared_distances(vectors)[0].tolist() == pytest.approx([0.0, 1.0, 1.0, 8.0, 200.0], rel=1e-12)
    assert krum_scores(squared_distances(vectors), f=1) == pytest.approx([2.0, 3.0, 3.0, 10.0, 309.0], rel=1e-12)
    parts = five_points()
    assert Krum(f=1).select(parts) == 0
    assert_identical(Krum(f=1)(parts), parts[0])  # the chosen reply itself
    # deltas from a reference: same distances, same choice, and the reply comes back unchanged
    shifted = five_points(shift=(3.0, -2.0))
    reference = {"w": torch.tensor([3.0, -2.0], dtype=torch.float64)}
    assert Krum(f=1).select(shifted, reference) == 0
    assert_identical(Krum(f=1)(shifted, None, reference), shifted[0])


def test_multikrum_selection_by_hand() -> None:
    parts = five_points()
    # m = 2: p0 (score 2), then p1 and p2 tie at 3 -> the lower client id, p1
    assert MultiKrum(f=1, m=2).select(parts) == [0, 1]
    assert MultiKrum(f=1, m=2)(parts)["w"].tolist() == [0.5, 0.0]
    # sample-weighted mean of the chosen ones: (0*1 + 1*3) / 4
    weights = {0: 1.0, 1: 3.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert MultiKrum(f=1, m=2)(parts, weights)["w"].tolist() == [0.75, 0.0]
    # give p2 the lower id: the tie now goes to p2
    relabelled = five_points(ids=[10, 30, 20, 40, 50])
    assert MultiKrum(f=1, m=2).select(relabelled) == [10, 20]
    # default m = n - f = 4 drops only the outlier p4: mean of p0..p3 = (3/4, 3/4)
    assert MultiKrum(f=1).select(parts) == [0, 1, 2, 3]
    assert MultiKrum(f=1)(parts)["w"].tolist() == [0.75, 0.75]


def test_bulyan_selection_and_coordinate_step_by_hand() -> None:
    # n = 7 = 4f+3 at f = 1: the theta = 5 lowest Krum scores, then the mean of beta = 3 values nearest the median.
    # Values 0, 1, 3, 4, 6, 100, -100 (clients 0..6); scores over the n - f - 2 = 4 nearest others:
    #   0: 1+9+16+36 = 62   1: 1+4+9+25 = 39   3: 1+4+9+9 = 23   4: 1+4+9+16 = 30   6: 4+9+25+36 = 74
    #   100: 94^2+96^2+97^2+99^2 = 37262   -100: 100^2+101^2+103^2+104^2 = 41626
    # chosen {0, 1, 3, 4, 6} (clients 0..4): median 3, nearest three 3, 4, 1 -> 8/3
    vectors = torch.tensor([[0.0], [1.0], [3.0], [4.0], [6.0], [100.0], [-100.0]], dtype=torch.float64)
    assert krum_scores(squared_distances(vectors), f=1) == pytest.approx(
        [62.0, 39.0, 23.0, 30.0, 74.0, 37262.0, 41626.0], rel=1e-12
    )
    parts = scalars([0.0, 1.0, 3.0, 4.0, 6.0, 100.0, -100.0])
    assert Bulyan(f=1).select(parts) == [0, 1, 2, 3, 4]
    assert Bulyan(f=1)(parts)["w"].item() == pytest.approx(8 / 3, abs=1e-12)
    # the coordinate step alone, per column: column 0 as above -> 8/3; column 1 {10, -2, 0, 1, 7}: median 1,
    # distances 9, 3, 1, 0, 6 -> nearest 1, 0, -2 -> -1/3
    values = torch.tensor([[0.0, 10.0], [1.0, -2.0], [3.0, 0.0], [4.0, 1.0], [6.0, 7.0]], dtype=torch.float64)
    assert torch.allclose(mean_nearest_median(values, 3), torch.tensor([8 / 3, -1 / 3], dtype=torch.float64))
    # equal distances to the median go to the lower row: {0, 2, 4}, median 2, nearest two are 2 and 0 -> 1
    assert mean_nearest_median(torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64), 2).item() == 1.0


def test_norm_bound_by_hand_is_joint_over_the_set_and_uses_the_reference() -> None:
    reference = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}
    # client 0 moved (3, 4) over the two tensors (joint norm 5), client 1 moved (0.3, 0.4) (norm 0.5); C = 1:
    # client 0 becomes (0.6, 0.8), client 1 is inside; weighted 1:3 -> (0.6 + 0.9, 0.8 + 1.2) / 4 = (0.375, 0.5)
    parts = {
        0: {"a": torch.tensor([4.0]), "b": torch.tensor([5.0])},
        1: {"a": torch.tensor([1.3]), "b": torch.tensor([1.4])},
    }
    out = NormBound(C=1.0)(parts, {0: 1.0, 1: 3.0}, reference)
    assert_close(out, {"a": torch.tensor([1.375]), "b": torch.tensor([1.5])})
    # a per-tensor bound would have left (1, 1) for client 0; without the reference the values themselves are bounded
    alone = NormBound(C=1.0)({0: parts[0]}, None, reference)
    assert_close(alone, {"a": torch.tensor([1.6]), "b": torch.tensor([1.8])})
    assert_close(
        NormBound(C=1.0)({0: parts[0]}),
        {"a": torch.tensor([4 / math.sqrt(41)]), "b": torch.tensor([5 / math.sqrt(41)])},
    )


def test_norm_bound_clipped_norms_and_untouched_inside() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        delta = {
            "a": torch.randn(5, 3, generator=gen, dtype=torch.float64),
            "b": torch.randn(7, generator=gen, dtype=torch.float64),
        }
        bound = float(torch.rand((), generator=gen, dtype=torch.float64)) * 2 * joint_norm(delta)
        clipped = bound_norm(delta, bound)
        assert joint_norm(clipped) <= bound * (1 + 1e-6)
        if joint_norm(delta) > bound:  # clipped deltas keep their direction and land on the sphere of radius C
            assert joint_norm(clipped) == pytest.approx(bound, rel=1e-12)
            assert_close(clipped, {k: v * bound / joint_norm(delta) for k, v in delta.items()}, tol=1e-12)
        else:
            assert all(clipped[k] is delta[k] for k in delta)  # inside: the very same tensors
    # the rule: a client already inside the bound contributes its reply exactly
    parts, _, reference = random_parts(1, 1)
    assert_identical(NormBound(C=1e6)(parts, None, reference), parts[0])


def test_mean_is_bit_identical_to_todays_weighted_mean() -> None:
    parts, weights, reference = random_parts(3, 6, ids=[7, 2, 9, 0, 4, 5])
    expected = weighted_mean([(parts[c], weights[c]) for c in sorted(parts)])
    assert_identical(build_rule("mean")(parts, weights, reference), expected)
    assert_identical(build_rule("mean")(parts, weights), MeanReducer()(parts, weights, reference=reference))
    uniform = weighted_mean([(parts[c], 1.0) for c in sorted(parts)])
    assert_identical(build_rule("mean")(parts, None), uniform)


# ---- limiting cases: no adversary


@pytest.mark.parametrize("name", RULE_NAMES)
def test_every_rule_is_the_mean_when_all_clients_agree(name: str) -> None:
    gen = torch.Generator().manual_seed(4)
    reference = {"a": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)}
    reply = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in reference.items()}
    parts = {cid: {k: v.clone() for k, v in reply.items()} for cid in range(7)}
    weights = {cid: float(cid + 1) for cid in parts}
    expected = weighted_mean([(parts[c], weights[c]) for c in sorted(parts)])
    assert_close(build_rule(name, **SETTINGS[name])(parts, weights, reference), expected)


def test_rules_are_the_mean_on_symmetric_data() -> None:
    # points c + s*u with s in {0, +-1, +-3, +-6}: the mean is c, and so is every robust rule's answer
    # (Krum at f = 1 scores the centre 1+1+9+9 = 20, below s=1's 1+4+4+16 = 25; Multi-Krum at f = 2 drops the two
    # points at +-6, whose scores 9+25+36 are the worst, and averages the symmetric rest)
    gen = torch.Generator().manual_seed(5)
    centre, direction = (
        torch.randn(6, generator=gen, dtype=torch.float64),
        torch.randn(6, generator=gen, dtype=torch.float64),
    )
    offsets = [0.0, 1.0, -1.0, 3.0, -3.0, 6.0, -6.0]
    parts = {cid: {"w": centre + s * direction} for cid, s in zip([4, 0, 6, 2, 5, 1, 3], offsets, strict=True)}
    expected = {"w": centre}
    assert_close(build_rule("mean")(parts), expected, tol=1e-12)
    for rule in (coordinate_median, TrimmedMean(0.2), TrimmedMean(0.0), Krum(f=1), MultiKrum(f=2)):
        assert_close(rule(parts), expected, tol=1e-12)


def test_no_byzantine_clients_limits() -> None:
    parts, weights, reference = random_parts(6, 8)
    mean = build_rule("mean")
    # Multi-Krum with f = 0 keeps all n clients: the weighted mean itself, bit for bit
    assert_identical(MultiKrum(f=0)(parts, weights), mean(parts, weights))
    # Bulyan with f = 0 keeps all n and averages all n per coordinate: the unweighted mean
    assert_close(Bulyan(f=0)(parts, weights, reference), mean(parts, None), tol=1e-6)
    # a trim of floor(0.1 * 8) = 0 per side is the unweighted mean; a bound no delta reaches is the weighted mean
    assert_close(TrimmedMean(0.1)(parts, weights, reference), mean(parts, None), tol=1e-6)
    assert_close(NormBound(C=1e9)(parts, weights, reference), mean(parts, weights), tol=1e-6)


def test_coordinate_rules_on_deltas_equal_the_rules_on_values() -> None:
    parts, _, reference = random_parts(7, 9)
    for rule in (coordinate_median, TrimmedMean(0.2), Bulyan(f=1), MultiKrum(f=2)):
        assert_close(rule(parts, None, reference), rule(parts, None, None), tol=1e-6)


# ---- determinism


@pytest.mark.parametrize("name", RULE_NAMES)
def test_rules_do_not_depend_on_client_order(name: str) -> None:
    rule = build_rule(name, **SETTINGS[name])
    shuffler = random.Random(0)
    for seed in range(20):
        parts, weights, reference = random_parts(seed, 9, ids=shuffler.sample(range(100), 9))
        expected = rule(parts, weights, reference)
        order = list(parts)
        shuffler.shuffle(order)
        assert_identical(
            rule({c: parts[c] for c in order}, {c: weights[c] for c in reversed(order)}, reference), expected
        )
        # a different client holding each reply (no ties in these data): identical for the rules that never sum
        # in id order, equal up to rounding for those that do
        relabel = dict(zip(parts, shuffler.sample(range(100, 200), 9), strict=True))
        moved = rule({relabel[c]: p for c, p in parts.items()}, {relabel[c]: w for c, w in weights.items()}, reference)
        if name in ("median", "trimmed_mean", "krum", "bulyan"):
            assert_identical(moved, expected)
        else:
            assert_close(moved, expected, tol=1e-6)


# ---- outliers


def test_robust_rules_stay_in_the_benign_range_with_outliers_at_1e6() -> None:
    n, f = 11, 2  # Bulyan's 4f+3 = 11; the trimmed mean's floor(0.2 * 11) = 2 = f per side
    rules = {
        "median": coordinate_median,
        "trimmed_mean": TrimmedMean(0.2),
        "krum": Krum(f),
        "multikrum": MultiKrum(f),
        "bulyan": Bulyan(f),
    }
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        ids = random.Random(seed).sample(range(1000), n)
        bad = set(ids[:f])
        parts, weights, reference = random_parts(seed, n, ids=ids)
        for cid in bad:  # every coordinate near 1e6, with a weight that would dominate a mean
            parts[cid] = {k: 1e6 + torch.randn(v.shape, generator=gen) for k, v in parts[cid].items()}
            weights[cid] = 1e4
        benign = [parts[c] for c in ids if c not in bad]
        low = {k: torch.stack([p[k] for p in benign]).amin(0) for k in reference}
        high = {k: torch.stack([p[k] for p in benign]).amax(0) for k in reference}
        for name, rule in rules.items():
            out = rule(parts, weights, reference)
            for k in reference:
                assert bool(((out[k] >= low[k] - 1e-5) & (out[k] <= high[k] + 1e-5)).all()), (seed, name, k)
        chosen = Krum(f).select(parts, reference)
        assert chosen not in bad
        assert_identical(Krum(f)(parts, weights, reference), parts[chosen])
        assert not bad & set(MultiKrum(f).select(parts, reference))
        assert not bad & set(Bulyan(f).select(parts, reference))
        # the control: the plain mean is dragged out of the benign range
        assert float(build_rule("mean")(parts, weights)["b"].abs().max()) > 1e4


# ---- refusals


def test_bulyan_and_krum_refuse_too_few_clients_in_one_line() -> None:
    seven = scalars([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    six = {c: seven[c] for c in range(6)}
    Bulyan(f=1)(seven)  # n = 4f+3 is enough
    with pytest.raises(UserError, match=r"4f\+3 = 7 clients per round, got 6") as bulyan_error:
        Bulyan(f=1)(six)
    five, four = {c: seven[c] for c in range(5)}, {c: seven[c] for c in range(4)}
    Krum(f=1)(five)  # n = 5 > 2f+2 = 4
    MultiKrum(f=1)(five)
    with pytest.raises(UserError, match=r"more than 2f\+2 = 4 clients per round, got 4") as krum_error:
        Krum(f=1)(four)
    with pytest.raises(UserError):
        MultiKrum(f=1)(four)
    with pytest.raises(UserError, match="m=6"):
        MultiKrum(f=1, m=6)(five)
    assert "\n" not in str(bulyan_error.value) and "\n" not in str(krum_error.value)


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("trimmed_mean", {"beta": 0.5}),
        ("trimmed_mean", {"beta": -0.1}),
        ("krum", {"f": -1}),
        ("krum", {"f": 1.5}),
        ("multikrum", {"m": 0}),
        ("bulyan", {"f": True}),
        ("norm_bound", {"C": 0.0}),
        ("norm_bound", {"C": float("nan")}),
        ("norm_bound", {}),  # C has no default
        ("krum", {"byzantine": 1}),  # a misspelt setting
        ("median", {"beta": 0.2}),
        ("geometric_median", {}),
    ],
)
def test_bad_settings_are_value_errors(name: str, settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        build_rule(name, **settings)


def test_mismatched_parts_and_weights_are_refused() -> None:
    parts = scalars([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="weights"):
        coordinate_median(parts, {0: 1.0, 1: 1.0})
    with pytest.raises(ValueError, match="same tensors"):
        coordinate_median({**parts, 3: {"w": torch.zeros(2, dtype=torch.float64)}})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_results_come_back_in_each_tensors_dtype_and_device(dtype: torch.dtype) -> None:
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    for device in devices:
        parts, weights, reference = random_parts(8, 7)
        parts = {c: {"a": p["a"].to(device, dtype), "b": p["b"].to(device, torch.float32)} for c, p in parts.items()}
        reference = {k: v.to(device) for k, v in reference.items()}
        for name in RULE_NAMES:
            out = build_rule(name, **SETTINGS[name])(parts, weights, reference)
            assert (out["a"].dtype, out["b"].dtype) == (dtype, torch.float32), name
            assert out["a"].device.type == device and out["b"].device.type == device, name


# ---- prototypes, class by class


def prototypes() -> tuple[dict[int, dict[int, torch.Tensor]], dict[int, dict[int, float]]]:
    """Class 0 by four clients, class 1 by two, class 2 by three, class 3 by nobody."""
    t = torch.tensor
    parts = {
        0: {0: t([1.0, 0.0]), 2: t([0.0, 1.0])},
        1: {0: t([3.0, 4.0]), 1: t([2.0, 2.0]), 2: t([0.0, 5.0])},
        2: {0: t([100.0, -100.0]), 2: t([1.0, 2.0])},
        3: {0: t([2.0, 1.0]), 1: t([6.0, -2.0])},
    }
    counts = {0: {0: 5, 2: 1}, 1: {0: 1, 1: 1, 2: 2}, 2: {0: 1, 2: 3}, 3: {0: 2, 1: 3}}
    return parts, counts


def test_class_wise_median_per_class_with_fallback_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    parts, counts = prototypes()
    with caplog.at_level(logging.WARNING, logger="fedpal"):
        out = class_wise("median", parts, counts)
    assert sorted(out) == [0, 1, 2]  # class 3: nobody reported it
    # class 0, four reporters: column 0 {1, 3, 100, 2} -> 2.5, column 1 {0, 4, -100, 1} -> 0.5
    assert out[0].tolist() == [2.5, 0.5]
    # class 1, two reporters: the count-weighted mean (1*(2, 2) + 3*(6, -2)) / 4 = (5, -1)
    assert out[1].tolist() == [5.0, -1.0]
    # class 2, three reporters: column medians {0, 0, 1} -> 0, {1, 5, 2} -> 2
    assert out[2].tolist() == [0.0, 2.0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "classes [1]" in warnings[0].getMessage() and "fewer than 3" in warnings[0].getMessage()
    assert "mean" in warnings[0].getMessage()


def test_class_wise_warns_once_for_several_thin_classes(caplog: pytest.LogCaptureFixture) -> None:
    t = torch.tensor
    parts = {0: {0: t([1.0]), 1: t([2.0])}, 1: {0: t([3.0]), 1: t([4.0])}}
    with caplog.at_level(logging.WARNING, logger="fedpal"):
        out = class_wise("trimmed_mean", parts)
    assert out[0].item() == 2.0 and out[1].item() == 3.0  # uniform mean without counts
    assert len(caplog.records) == 1 and "classes [0, 1]" in caplog.records[0].getMessage()


def test_class_wise_mean_and_trimmed_mean(caplog: pytest.LogCaptureFixture) -> None:
    parts, counts = prototypes()
    with caplog.at_level(logging.WARNING, logger="fedpal"):
        out = class_wise("mean", parts, counts)
    assert not caplog.records  # the mean is never "too few"
    # class 0: (5*(1, 0) + 1*(3, 4) + 1*(100, -100) + 2*(2, 1)) / 9 = (112, -94) / 9
    assert torch.allclose(out[0], torch.tensor([112 / 9, -94 / 9]))
    # trimmed mean, five reporters at beta 0.2: floor(1.0) = 1 value off each side of {-50, 1, 2, 3, 50} -> 2
    five = {cid: {7: torch.tensor([v])} for cid, v in enumerate([50.0, 1.0, 3.0, -50.0, 2.0])}
    assert class_wise("trimmed_mean", five, beta=0.2)[7].item() == pytest.approx(2.0, abs=1e-7)


def test_class_wise_renormalized_prototypes_have_unit_norm() -> None:
    parts, counts = prototypes()
    plain = class_wise("median", parts, counts)
    unit = class_wise("median", parts, counts, renormalize=True)
    for k, v in unit.items():
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(v, plain[k] / plain[k].norm())


def test_class_wise_does_not_depend_on_client_order_and_checks_counts() -> None:
    parts, counts = prototypes()
    expected = class_wise("median", parts, counts)
    reordered = class_wise("median", {c: parts[c] for c in [3, 1, 0, 2]}, counts)
    assert all(torch.equal(reordered[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="sample count"):
        class_wise("mean", parts, {**counts, 3: {0: 2}})
    with pytest.raises(ValueError):
        class_wise("krum", parts, counts)  # type: ignore[arg-type]
