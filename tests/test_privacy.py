"""Client-level DP and simulated secure aggregation (ROBUSTNESS.md §1, §5, §8) against their equations: joint L2
clipping and its limits, adaptive clipping's geometric step by hand and its convergence to the target quantile,
the noise's calibrated std, ε equal to dp-accounting's own and to the measured table, the accountant's checkpoint
round trip and calibration, and SecAgg's masks, dropout recovery, quantization bound and byte model."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from fedpal.common.seeding import generator_for
from fedpal.errors import ConfigError, UserError
from fedpal.privacy import accountant as accountant_module
from fedpal.privacy.clipping import (
    AdaptiveClipping,
    clip_prototype_replies,
    clip_prototypes,
    clip_replies,
    clip_reply,
    clip_update,
    effective_noise_multiplier,
    prototype_sensitivity,
)
from fedpal.privacy.gaussian_noise import (
    add_gaussian_noise,
    noise_counts,
    noise_stddev,
    noised_mean,
    withhold_counts,
)
from fedpal.privacy.secure_aggregation import (
    SecAggConfig,
    TooManyDropouts,
    pair_mask,
    pairwise_masks,
    require_sum_reducer,
    secure_sum,
)

F64 = torch.float64

# --------------------------------------------------------------------------------------------- helpers


def flat_norm(tensors: dict[str, torch.Tensor]) -> float:
    """‖concat of every floating tensor‖, computed independently of the module (one concatenated vector)."""
    return float(torch.cat([v.reshape(-1).to(F64) for v in tensors.values() if v.is_floating_point()]).norm())


def random_update(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(3, 4, generator=gen) * scale,
        "layer.bias": torch.randn(3, generator=gen, dtype=F64) * scale,
        "head.weight": torch.randn(2, 3, generator=gen) * scale,
    }


def lognormal_cdf(x: float, mu: float, sigma: float) -> float:
    return 0.5 * (1 + math.erf((math.log(x) - mu) / (sigma * math.sqrt(2))))


# --------------------------------------------------------------------------------------------- clipping


def test_joint_clipping_scales_the_whole_update_to_the_bound() -> None:
    """Each tensor alone lies inside C but the update jointly does not: the whole update is scaled by C/‖Δ‖."""
    update = random_update(0)
    norm = flat_norm(update)
    clip = 1.05 * max(float(v.norm()) for v in update.values())  # per-tensor clipping would do nothing
    assert clip < norm
    update["counter"] = torch.tensor(7, dtype=torch.int64)
    clipped, measured = clip_update(update, clip)
    assert measured == pytest.approx(norm, rel=1e-12)
    assert flat_norm(clipped) <= clip * (1 + 1e-6)
    assert flat_norm(clipped) == pytest.approx(clip, rel=1e-6)
    for key in ("layer.weight", "layer.bias", "head.weight"):
        expected = update[key].to(F64) * (clip / norm)
        torch.testing.assert_close(clipped[key].to(F64), expected, rtol=1e-6, atol=1e-9)
        assert clipped[key].dtype == update[key].dtype
    assert torch.equal(clipped["counter"], update["counter"])  # integers are not part of the norm


def test_update_inside_the_bound_is_untouched_bit_for_bit() -> None:
    update = random_update(1)
    clip = flat_norm(update) * 1.01
    clipped, _ = clip_update(update, clip)
    reference = random_update(2, scale=3.0)
    params = {k: reference[k] + update[k] for k in update}
    replied, norm = clip_reply(params, clip, reference)
    assert norm <= clip
    for key in update:
        assert torch.equal(clipped[key], update[key])
        assert torch.equal(replied[key], params[key])
        assert replied[key].data_ptr() != params[key].data_ptr()  # a copy: the caller's tensors stay its own


def test_clip_reply_bounds_the_delta_the_server_receives_in_float32() -> None:
    """Parameters near 3 in float32 and C = 1e-3: ref + Δ·s rounds to float32, and the delta the server measures
    (received − reference, in float64) must still lie within C."""
    gen = torch.Generator().manual_seed(3)
    reference = {"w": (3 + torch.rand(10_000, generator=gen)).float(), "b": torch.rand(50, generator=gen).float()}
    params = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in reference.items()}
    delta = {k: params[k].to(F64) - reference[k].to(F64) for k in params}
    clipped, norm = clip_reply(params, 1e-3, reference)
    assert norm == pytest.approx(flat_norm(delta), rel=1e-12)
    received = {k: clipped[k].to(F64) - reference[k].to(F64) for k in clipped}
    assert flat_norm(received) <= 1e-3 * (1 + 1e-6)
    assert flat_norm(received) > 1e-3 * 0.99  # clipped to the bound, not far below it
    cosine = sum(float((received[k] * delta[k]).sum()) for k in delta) / (flat_norm(received) * flat_norm(delta))
    assert cosine > 0.999  # the direction is kept


def test_round_report_counts_clipped_clients_and_mean_norm_before_clipping() -> None:
    parts = {
        cid: {"w": torch.tensor([n, 0.0], dtype=F64)} for cid, n in zip((4, 1, 9, 2), (0.5, 1.0, 2.0, 4.0), strict=True)
    }
    clipped, report = clip_replies(parts, 1.5)
    assert report.fraction_clipped == 0.5
    assert report.mean_norm == pytest.approx((0.5 + 1 + 2 + 4) / 4)
    assert report.count == 4
    assert list(clipped) == [1, 2, 4, 9]
    assert [float(clipped[c]["w"][0]) for c in (4, 1, 9, 2)] == [0.5, 1.0, 1.5, 1.5]


def test_prototypes_are_clipped_class_by_class_and_their_joint_sensitivity_is_c_sqrt_k() -> None:
    protos = {"0": torch.tensor([3.0, 4.0]), "2": torch.tensor([0.3, 0.4]), "7": torch.tensor([0.0, -10.0])}
    clipped, norms = clip_prototypes(protos, 1.0)
    assert norms == pytest.approx([5.0, 0.5, 10.0])
    torch.testing.assert_close(clipped["0"], torch.tensor([0.6, 0.8]))
    assert torch.equal(clipped["2"], protos["2"])  # inside the bound: untouched
    torch.testing.assert_close(clipped["7"], torch.tensor([0.0, -1.0]))
    # removing this client changes the per-class sums jointly by exactly its clipped vectors' norm: C·√k when all
    # k vectors are at the bound
    big = {str(c): torch.full((4,), 5.0) for c in range(3)}
    big_clipped, _ = clip_prototypes(big, 0.5)
    joint = float(torch.cat(list(big_clipped.values())).norm())
    assert joint == pytest.approx(prototype_sensitivity(0.5, 3), rel=1e-6)
    _, report = clip_prototype_replies({1: protos, 2: {"0": torch.tensor([0.1, 0.0])}}, 1.0)
    assert report.count == 4 and report.fraction_clipped == 0.5


def test_invalid_bound_is_refused() -> None:
    with pytest.raises(ConfigError):
        clip_update(random_update(0), 0.0)


# --------------------------------------------------------------------------------------------- adaptive clipping


def test_adaptive_clipping_one_step_by_hand() -> None:
    norms = [0.05, 0.08, 0.2, 0.3, 0.5]  # two of five at or below C = 0.1: b̄ = 0.4 < q = 0.5, C grows
    noiseless = AdaptiveClipping(5, count_stddev=0.0)
    assert noiseless.update(norms) == pytest.approx(0.1 * math.exp(-0.2 * (0.4 - 0.5)), rel=1e-15)
    # Flower's defaults: σ_b = m/20 = 0.25; the count is noised with one standard normal draw of the generator
    noised = AdaptiveClipping(5)
    assert noised.count_stddev == 0.25
    draw = float(torch.randn((), generator=torch.Generator().manual_seed(7), dtype=F64))
    expected = 0.1 * math.exp(-0.2 * ((2 + 0.25 * draw) / 5 - 0.5))
    assert noised.update(norms, torch.Generator().manual_seed(7)) == pytest.approx(expected, rel=1e-15)
    # limiting cases: every norm inside shrinks C by exp(−lr·(1 − q)), every norm outside grows it by exp(lr·q)
    assert AdaptiveClipping(3, count_stddev=0.0).update([0.01] * 3) == pytest.approx(0.1 * math.exp(-0.1))
    assert AdaptiveClipping(3, count_stddev=0.0).update([1.0] * 3) == pytest.approx(0.1 * math.exp(0.1))


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clipping_reaches_the_target_quantile_in_100_rounds(quantile: float) -> None:
    """Norms of 100 clients per round ~ lognormal(0, 0.5) (median 1, ten times the initial C); after 100 rounds
    with Flower's defaults the bound sits at the target quantile of the norm distribution ±0.05."""
    clipping = AdaptiveClipping(100, target_quantile=quantile)
    for rnd in range(100):
        gen = generator_for(11, rnd, "norms")
        norms = torch.exp(0.5 * torch.randn(100, generator=gen, dtype=F64)).tolist()
        clipping.update(norms, generator_for(11, rnd, "count-noise"))
    assert lognormal_cdf(clipping.clip_norm, 0.0, 0.5) == pytest.approx(quantile, abs=0.05)
    restored = AdaptiveClipping(100, target_quantile=quantile)
    restored.load_state_dict(json.loads(json.dumps(clipping.state_dict())))
    assert restored.clip_norm == clipping.clip_norm


def test_effective_noise_multiplier() -> None:
    assert effective_noise_multiplier(1.0, 5.0) == pytest.approx((1 - 1 / 100) ** -0.5, rel=1e-15)
    assert effective_noise_multiplier(0.0, 5.0) == 0.0
    assert effective_noise_multiplier(1.0, 1e9) == pytest.approx(1.0)  # a free count: nothing to give up
    with pytest.raises(UserError) as err:
        effective_noise_multiplier(10.0, 5.0)
    assert "\n" not in str(err.value) and "sigma_b" in str(err.value)


# --------------------------------------------------------------------------------------------- noise


def test_noise_std_matches_its_calibration_over_10k_draws() -> None:
    std = noise_stddev(1.3, 0.7)
    assert std == pytest.approx(0.91)
    draws = add_gaussian_noise({"x": torch.zeros(10_000, dtype=F64)}, std, generator_for(0, 1, "dp-noise"))["x"]
    assert float(draws.std()) == pytest.approx(std, rel=0.03)
    assert abs(float(draws.mean())) < 4 * std / 100


@pytest.mark.parametrize("noise_cohort", [None, 100])
def test_noised_mean_has_std_zc_over_m_or_over_the_noise_cohort(noise_cohort: int | None) -> None:
    """Four clipped updates of 10^4 coordinates: the noised mean minus the exact mean has std z·C/m, or z·C/M
    with a noise cohort of M = 100 (the mean of a cohort of 100)."""
    gen = torch.Generator().manual_seed(5)
    clipped = {cid: {"w": torch.randn(10_000, generator=gen, dtype=F64) * 0.01} for cid in (3, 1, 2, 8)}
    exact = sum(clipped[c]["w"] for c in clipped) / 4
    mean, report = noised_mean(
        clipped,
        noise_multiplier=1.2,
        clip_norm=0.5,
        generator=generator_for(1, 2, "dp"),
        noise_cohort_size=noise_cohort,
    )
    cohort = 4 if noise_cohort is None else noise_cohort
    assert report.std_on_mean == pytest.approx(1.2 * 0.5 / cohort)
    assert report.accounted_cohort_size == cohort
    assert float((mean["w"] - exact).std()) == pytest.approx(1.2 * 0.5 / cohort, rel=0.03)
    with pytest.raises(ConfigError):
        noise_stddev(1.0, 1.0, cohort_size=10, noise_cohort_size=5)


def test_noise_is_deterministic_under_the_seed() -> None:
    values = random_update(0)
    first = add_gaussian_noise(values, 0.3, generator_for(9, 4, "dp-noise"))
    again = add_gaussian_noise(values, 0.3, generator_for(9, 4, "dp-noise"))
    other = add_gaussian_noise(values, 0.3, generator_for(9, 5, "dp-noise"))
    for key in values:
        assert torch.equal(first[key], again[key])
        assert not torch.equal(first[key], other[key])
        assert first[key].dtype == values[key].dtype


def test_counts_withheld_or_noised() -> None:
    assert torch.equal(withhold_counts(torch.tensor([0.0, 3.0, 0.0, 12.0])), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    summed = torch.full((10_000,), 1000.0, dtype=F64)
    noised = noise_counts(summed, noise_multiplier=2.0, count_clip=5.0, generator=generator_for(0, "counts"))
    assert float((noised - summed).std()) == pytest.approx(10.0, rel=0.03)
    low = noise_counts(torch.zeros(1000, dtype=F64), noise_multiplier=2.0, count_clip=5.0, generator=generator_for(1))
    assert float(low.min()) == 0.0  # floored: usable as weights


# --------------------------------------------------------------------------------------------- accountant


def library_epsilon(q: float, z: float, rounds: int, delta: float, accounting: str) -> float:
    """dp-accounting called directly: the Poisson-sampled Gaussian composed ``rounds`` times."""
    dp = pytest.importorskip("dp_accounting")
    event = dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(z)), rounds)
    acct = dp.rdp.RdpAccountant() if accounting == "rdp" else dp.pld.PLDAccountant()
    acct.compose(event)
    return float(acct.get_epsilon(delta))


def test_epsilon_is_dp_accountings_own_and_matches_the_measured_table() -> None:
    pytest.importorskip("dp_accounting")
    acct = accountant_module.PrivacyAccountant(10_000, delta=1e-5)
    for _ in range(1000):  # one round at a time, as the driver composes
        acct.compose(1.0, 100)
    assert acct.rounds == 1000
    rdp, pld = acct.epsilon(), acct.final_epsilon()
    assert rdp == library_epsilon(0.01, 1.0, 1000, 1e-5, "rdp")
    assert pld == library_epsilon(0.01, 1.0, 1000, 1e-5, "pld")
    assert round(rdp, 2) == 2.10 and round(pld, 2) == 1.83  # ROBUSTNESS.md §1, dp-accounting 0.6.0


def test_epsilon_grows_with_rounds_and_falls_with_noise() -> None:
    pytest.importorskip("dp_accounting")
    acct = accountant_module.PrivacyAccountant(1000, delta=1e-5)
    assert acct.epsilon() == 0.0
    previous = 0.0
    for rounds in (1, 9, 90, 900):
        acct.compose(1.0, 10, rounds)
        assert acct.epsilon() > previous
        previous = acct.epsilon()
    noisier = accountant_module.PrivacyAccountant(1000, delta=1e-5)
    noisier.compose(2.0, 10, 1000)
    assert noisier.epsilon() < previous


def test_state_dict_round_trip_and_resume_give_the_same_epsilon() -> None:
    pytest.importorskip("dp_accounting")
    uninterrupted = accountant_module.PrivacyAccountant(5000, delta=1e-6, max_epsilon=8.0)
    before_kill = accountant_module.PrivacyAccountant(5000, delta=1e-6, max_epsilon=8.0)
    for rnd in range(60):
        z = 1.1 if rnd < 30 else 0.9  # a change of noise mid-run (a new segment)
        uninterrupted.compose(z, 50)
        if rnd < 40:
            before_kill.compose(z, 50)
    checkpoint = json.loads(json.dumps(before_kill.state_dict()))  # plain numbers only
    resumed = accountant_module.PrivacyAccountant(10)
    resumed.load_state_dict(checkpoint)
    assert resumed.epsilon() == before_kill.epsilon()
    for _ in range(20):
        resumed.compose(0.9, 50)
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert resumed.epsilon() == uninterrupted.epsilon()
    assert resumed.final_epsilon() == uninterrupted.final_epsilon()


def test_would_exceed_looks_one_round_ahead() -> None:
    pytest.importorskip("dp_accounting")
    acct = accountant_module.PrivacyAccountant(10_000, delta=1e-5)
    acct.compose(1.0, 100, 999)
    after = library_epsilon(0.01, 1.0, 1000, 1e-5, "rdp")
    assert acct.epsilon() < after
    assert acct.would_exceed(after * 0.9999, noise_multiplier=1.0, sample_size=100)
    assert not acct.would_exceed(after * 1.0001, noise_multiplier=1.0, sample_size=100)
    assert not acct.would_exceed(acct.epsilon() * 1.0001)  # the rounds so far only
    assert not acct.would_exceed(noise_multiplier=1.0, sample_size=100)  # no limit set: never
    limited = accountant_module.PrivacyAccountant(10_000, delta=1e-5, max_epsilon=after * 0.9999)
    limited.load_state_dict({**acct.state_dict(), "max_epsilon": after * 0.9999})
    assert limited.would_exceed(noise_multiplier=1.0, sample_size=100)


def test_fixed_size_cohorts_use_sampling_without_replacement_under_replace_one() -> None:
    dp = pytest.importorskip("dp_accounting")
    acct = accountant_module.PrivacyAccountant(1000, delta=1e-5, sampling="without_replacement")
    acct.compose(2.0, 10, 500)
    # replacing one user's data moves its clipped update anywhere within radius C: the sum's sensitivity is 2C, so
    # noise of std 2.0·C is dp-accounting's Gaussian of multiplier 1.0 (std over sensitivity)
    library = dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    library.compose(dp.SelfComposedDpEvent(dp.SampledWithoutReplacementDpEvent(1000, 10, dp.GaussianDpEvent(1.0)), 500))
    assert acct.epsilon() == float(library.get_epsilon(1e-5))
    assert acct.final_epsilon() == acct.epsilon()  # dp-accounting has no PLD for it: RDP is the final value
    assert acct.epsilon() > library_epsilon(0.01, 2.0, 500, 1e-5, "rdp")  # above add-or-remove at the same z


def test_every_client_every_round_under_replace_one_is_the_plain_gaussian_at_half_the_multiplier() -> None:
    """With m = N nothing is sampled: each round is the Gaussian mechanism on a sum of sensitivity 2C, whose RDP
    α·(2C)²/(2·(zC)²) is that of a sensitivity-C sum at multiplier z/2 (q = 1 under add-or-remove)."""
    pytest.importorskip("dp_accounting")
    acct = accountant_module.PrivacyAccountant(20, delta=1e-5, sampling="without_replacement")
    acct.compose(7.0, 20, 30)
    assert acct.epsilon() == pytest.approx(library_epsilon(1.0, 3.5, 30, 1e-5, "rdp"), rel=1e-12)
    z = accountant_module.calibrate_noise_multiplier(
        4.0, delta=1e-5, rounds=30, sample_size=20, population_size=20, sampling="without_replacement"
    )
    poisson = accountant_module.calibrate_noise_multiplier(
        4.0, delta=1e-5, rounds=30, sample_size=20, population_size=20, sampling="poisson", accounting="rdp"
    )
    assert z == pytest.approx(2 * poisson, rel=2e-3)  # the same ε needs twice the noise


@pytest.mark.parametrize(
    ("accounting", "rounds", "sample", "population", "rtol"),
    [("rdp", 1000, 100, 10_000, 1e-3), ("pld", 100, 100, 1000, 5e-3)],
)
def test_calibration_finds_z_whose_epsilon_is_within_1_percent_of_the_target(
    accounting: str, rounds: int, sample: int, population: int, rtol: float
) -> None:
    pytest.importorskip("dp_accounting")
    z = accountant_module.calibrate_noise_multiplier(
        2.0,
        delta=1e-5,
        rounds=rounds,
        sample_size=sample,
        population_size=population,
        accounting=accounting,  # type: ignore[arg-type]
        rtol=rtol,
    )
    epsilon = library_epsilon(sample / population, z, rounds, 1e-5, accounting)
    assert 2.0 * 0.99 <= epsilon <= 2.0
    assert library_epsilon(sample / population, z * 0.98, rounds, 1e-5, accounting) > 2.0  # and z is not wasteful


def test_without_the_dp_extra_the_accountant_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "dp_accounting" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError) as err:
        accountant_module.PrivacyAccountant(100)
    assert 'pip install -e ".[dp]"' in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"\.\[dp\]"):
        accountant_module.calibrate_noise_multiplier(1.0, delta=1e-5, rounds=10, sample_size=1, population_size=10)


# --------------------------------------------------------------------------------------------- secure aggregation

M = 2**32


def client_updates(ids: list[int], seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        c: {"w": torch.rand(3, 4, generator=gen, dtype=F64) * 2 - 1, "b": torch.rand(5, generator=gen, dtype=F64) - 0.5}
        for c in ids
    }


def plain_sum(updates: dict[int, dict[str, torch.Tensor]], ids: list[int]) -> dict[str, torch.Tensor]:
    return {k: sum(updates[c][k] for c in ids) for k in ("w", "b")}  # type: ignore[misc]


def max_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_pair_masks_are_opposite_and_all_masks_sum_to_zero_mod_2_32() -> None:
    assert torch.equal(
        (pair_mask(3, 8, 64, seed=1, round=2) + pair_mask(8, 3, 64, seed=1, round=2)) % M,
        torch.zeros(64, dtype=torch.int64),
    )
    for config in (SecAggConfig(), SecAggConfig(num_shares=3)):
        masks = pairwise_masks([42, 3, 7, 11, 20, 5, 9], 200, seed=4, round=1, config=config)
        total = sum(masks.values()) % M  # type: ignore[operator]
        assert torch.equal(total, torch.zeros(200, dtype=torch.int64))
        assert all(bool((m != 0).any()) for m in masks.values())  # each client's own mask is not zero


@pytest.mark.parametrize(("rounding", "bound"), [("stochastic", 16 / 2**22), ("nearest", 8 / 2**22)])
def test_unmasked_sum_equals_the_plain_sum_within_the_quantization_bound(rounding: str, bound: float) -> None:
    ids = [2, 5, 9, 14, 30, 31]
    updates = client_updates(ids)
    result = secure_sum(updates, seed=0, round=3, config=SecAggConfig(rounding=rounding))  # type: ignore[arg-type]
    assert result.survivors == tuple(ids) and result.dropped == () and result.range_clipped == 0
    error = max_error(result.total, plain_sum(updates, ids))
    assert error < len(ids) * bound
    assert error > 0  # it really went through integers
    again = secure_sum(dict(reversed(list(updates.items()))), seed=0, round=3, config=SecAggConfig(rounding=rounding))  # type: ignore[arg-type]
    assert all(torch.equal(result.total[k], again.total[k]) for k in result.total)  # order-free, seeded


def test_values_outside_the_range_are_clipped_to_it_and_counted() -> None:
    updates = {1: {"w": torch.tensor([9.0, -20.0, 1.0], dtype=F64)}, 2: {"w": torch.tensor([0.0, 0.0, 1.0], dtype=F64)}}
    result = secure_sum(updates, seed=0, round=0)
    assert result.range_clipped == 2
    torch.testing.assert_close(
        result.total["w"], torch.tensor([8.0, -8.0, 2.0], dtype=F64), atol=2 * 16 / 2**22, rtol=0
    )


def test_dropouts_up_to_n_minus_t_are_recovered_and_more_fail() -> None:
    ids = list(range(7))  # complete graph, default threshold t = 7 // 2 + 1 = 4: up to 3 dropouts
    updates = client_updates(ids, seed=1)
    dropped = [1, 4, 6]
    result = secure_sum(updates, seed=2, round=5, dropped=dropped)
    survivors = [c for c in ids if c not in dropped]
    assert result.survivors == tuple(survivors)
    assert max_error(result.total, plain_sum(updates, survivors)) < len(survivors) * 16 / 2**22
    assert result.cost.masks_rebuilt == 3 * 4 and result.cost.shares_for_dropped == 4 * 3
    with pytest.raises(TooManyDropouts) as err:
        secure_sum(updates, seed=2, round=5, dropped=[0, 1, 4, 6])
    assert "\n" not in str(err.value) and "threshold 4" in str(err.value)
    strict = SecAggConfig(reconstruction_threshold=5)
    secure_sum(updates, seed=2, round=5, dropped=[0, 3], config=strict)
    with pytest.raises(TooManyDropouts):
        secure_sum(updates, seed=2, round=5, dropped=[0, 3, 5], config=strict)


def test_secagg_plus_ring_tolerates_spread_dropouts_but_not_a_whole_share_group() -> None:
    """num_shares = 3, t = 2: each secret is held by its owner and the two ring neighbours."""
    ids = [10, 20, 30, 40, 50, 60, 70]
    updates = client_updates(ids, seed=3)
    config = SecAggConfig(num_shares=3, reconstruction_threshold=2)
    result = secure_sum(updates, seed=0, round=1, dropped=[10, 40], config=config)
    survivors = [c for c in ids if c not in (10, 40)]
    assert max_error(result.total, plain_sum(updates, survivors)) < len(survivors) * 16 / 2**22
    assert result.cost.masks_rebuilt == 4  # each dropped client had two surviving neighbours
    with pytest.raises(TooManyDropouts):  # 30's share holders are 20, 30, 40: only 30 survives
        secure_sum(updates, seed=0, round=1, dropped=[20, 40], config=config)


def test_byte_overhead_matches_the_documented_model() -> None:
    """n = 5 clients, d = 12 + 5 = 17 coordinates, client 3 dropped, complete graph (g = 5)."""
    result = secure_sum(client_updates([1, 2, 3, 4, 5]), seed=0, round=0, dropped=[3])
    d, n, u, g = 17, 5, 4, 5
    share_message = 2 * 4 + 2 * 36 + 28  # two ids, two Shamir shares, AES-GCM nonce + tag = 108
    uplink = n * 2 * 32 + n * (g - 1) * share_message + u * 4 * d + u * g * (4 + 36)
    downlink = n * (g - 1) * (4 + 2 * 32) + n * (g - 1) * share_message + u * (g - 1) * 4
    assert (uplink, downlink) == (320 + 2160 + 272 + 800, 1360 + 2160 + 64)
    cost = result.cost
    assert cost.uplink_bytes == uplink and cost.downlink_bytes == downlink
    assert cost.masked_input_bytes == cost.plain_bytes == u * 4 * d  # masked ints cost what float32 would
    assert cost.overhead_bytes == uplink + downlink - u * 4 * d
    assert cost.messages == 2 * n + 2 * n + u + 2 * u
    assert cost.shares_for_dropped == 4 and cost.masks_rebuilt == 4


def test_secure_sum_refuses_reducers_that_are_not_sums() -> None:
    require_sum_reducer("mean")
    for reducer in ("median", "krum", "trimmed_mean", "bulyan"):
        with pytest.raises(UserError) as err:
            secure_sum(client_updates([1, 2]), seed=0, round=0, reducer=reducer)
        assert reducer in str(err.value) and "\n" not in str(err.value)


def test_a_cohort_whose_sum_would_wrap_the_modulus_is_refused() -> None:
    updates = {c: {"w": torch.zeros(1, dtype=F64)} for c in range(1024)}  # 1024 · 2^22 = 2^32
    with pytest.raises(UserError, match="at most 1023 clients"):
        secure_sum(updates, seed=0, round=0)
