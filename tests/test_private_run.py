"""Client-level DP in a run (``[privacy]``): each reply's update clipped to C before the reduction, the uniform mean
plus Gaussian noise of std z·C on the sum, ε from the accountant, its state in the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import interrupted_at, simulator, tiny_config, without_wall

import fedpal
from fedpal.errors import ConfigError, UserError

pytest.importorskip("dp_accounting")


def private(z: float, clip: float = 0.05, **sections: Any) -> dict[str, Any]:
    raw = tiny_config("fedavg", data={"num_clients": 6}, **sections)
    raw["privacy"] = {"clip": clip, "noise_multiplier": z}
    return raw


def round_one(sim: Any) -> tuple[dict, dict, dict]:
    """Round 1 through the driver: the global model before, the replies aggregate received, the global after."""
    before = {k: v.clone() for k, v in sim.server["params"].items()}
    received: dict[int, Any] = {}
    aggregate = sim.algorithm.aggregate
    sim.algorithm.aggregate = lambda s, r, replies, reduce: received.update(replies) or aggregate(s, r, replies, reduce)
    sim.run_round(1)
    return before, received, sim.server["params"]


def norm(update: dict[str, torch.Tensor]) -> float:
    return float(sum(v.double().pow(2).sum() for v in update.values()) ** 0.5)


def test_clipped_updates_reach_the_reduction_and_the_mean_is_uniform() -> None:
    sim = simulator(private(z=0.0))
    before, received, after = round_one(sim)
    deltas = {c: {k: received[c]["params"][k].double() - before[k].double() for k in before} for c in received}
    assert all(norm(d) <= 0.05 * (1 + 1e-6) for d in deltas.values())
    assert max(norm(d) for d in deltas.values()) > 0.049  # they were clipped, not small already
    for k in before:  # uniform, although the clients hold different numbers of samples
        mean = sum(d[k] for d in deltas.values()) / len(deltas)
        assert torch.allclose(after[k].double(), before[k].double() + mean, atol=1e-6)


def test_the_noise_on_the_mean_has_std_z_c_over_m() -> None:
    z, clip = 2.0, 0.05
    sim = simulator(private(z=z, clip=clip, model={"name": "mlp", "hidden_dim": 256}))
    before, received, after = round_one(sim)
    m = len(received)
    deltas = [{k: received[c]["params"][k].double() - before[k].double() for k in before} for c in received]
    noise = torch.cat(
        [(after[k].double() - before[k].double() - sum(d[k] for d in deltas) / m).flatten() for k in before]
    )
    assert noise.numel() > 10_000
    assert abs(float(noise.std()) / (z * clip / m) - 1) < 0.03
    assert abs(float(noise.mean())) < 4 * z * clip / m / noise.numel() ** 0.5


def test_adaptive_clipping_pays_for_its_noised_count_with_more_noise_on_the_updates() -> None:
    """Andrew et al.: with the count's noise σ_b (m/20 = 0.3 for 6 clients), the updates take z_Δ with
    z_Δ⁻² + (2σ_b)⁻² = z⁻², so that both releases are one mechanism of multiplier z: the one the accountant composes."""
    from fedpal.privacy.accountant import PrivacyAccountant

    z, clip = 0.5, 0.05
    raw = private(z=z, clip=clip, model={"name": "mlp", "hidden_dim": 256})
    raw["privacy"]["adaptive_clip"] = True
    sim = simulator(raw)
    before, received, after = round_one(sim)
    m = len(received)
    deltas = [{k: received[c]["params"][k].double() - before[k].double() for k in before} for c in received]
    noise = torch.cat(
        [(after[k].double() - before[k].double() - sum(d[k] for d in deltas) / m).flatten() for k in before]
    )
    z_updates = (z**-2 - (2 * 6 / 20) ** -2) ** -0.5  # 0.905
    assert abs(float(noise.std()) / (z_updates * clip / m) - 1) < 0.03
    result = fedpal.run({**raw, "train": {**raw["train"], "rounds": 2}})
    accountant = PrivacyAccountant(6, delta=1e-5, sampling="without_replacement")
    accountant.compose(z, 6, rounds=2)
    assert result.summary["privacy"]["epsilon"] == accountant.final_epsilon()
    assert result.summary["privacy"]["update_noise_multiplier"] == pytest.approx(z_updates)


def test_adaptive_clipping_whose_count_would_spend_the_whole_budget_is_one_line() -> None:
    raw = private(z=1.0)  # 2σ_b = 0.6 for 6 clients: the count alone would need more than z allows
    raw["privacy"]["adaptive_clip"] = True
    with pytest.raises(UserError, match="adaptive clipping needs noise_multiplier < 2·sigma_b"):
        fedpal.run(raw)


def test_epsilon_is_the_accountants_and_survives_a_resume(tmp_path: Path) -> None:
    from fedpal.privacy.accountant import PrivacyAccountant

    raw = private(z=1.0, train={"rounds": 4, "clients_per_round": 3})
    whole = fedpal.run(raw)
    accountant = PrivacyAccountant(6, delta=1e-5, sampling="without_replacement")
    accountant.compose(1.0, 3, rounds=4)
    assert whole.summary["privacy"]["epsilon"] == accountant.final_epsilon()
    assert whole.summary["privacy"]["rounds"] == 4
    with interrupted_at(3):
        fedpal.run(raw, out=tmp_path)
    resumed = fedpal.resume(tmp_path)
    assert without_wall(resumed.summary) == without_wall(whole.summary)


def test_a_round_is_accounted_with_the_clients_it_sampled_when_replies_are_lost() -> None:
    """A reply lost after training adds nothing to the sum (within the bound C), so the round's mechanism is still the
    sampled cohort's: fewer replies must not change ε (under replace-one, 5 of 6 would account *more* than 6 of 6)."""
    from fedpal.privacy.accountant import PrivacyAccountant

    raw = private(z=1.0, train={"rounds": 3}, availability={"p_drop": 0.4})
    result = fedpal.run(raw)
    assert result.summary["availability"]["lost_replies"] > 0  # some rounds reduced fewer than 6 replies
    accountant = PrivacyAccountant(6, delta=1e-5, sampling="without_replacement")
    accountant.compose(1.0, 6, rounds=3)
    assert result.summary["privacy"]["epsilon"] == accountant.final_epsilon()


def test_a_run_ends_before_the_round_that_would_pass_max_epsilon() -> None:
    raw = private(z=2.0, train={"rounds": 20})
    raw["privacy"]["max_epsilon"] = 8.0
    result = fedpal.run(raw)
    assert 1 <= result.summary["rounds"] < 20
    assert result.summary["privacy"]["epsilon"] <= 8.0
    assert result.summary["privacy"]["rounds"] == result.summary["rounds"]


def test_privacy_needs_the_plain_mean() -> None:
    raw = private(z=1.0)
    raw["aggregation"] = {"rule": "median"}
    with pytest.raises(ConfigError, match=r"aggregation\.rule = 'mean'"):
        fedpal.run(raw)


def test_secure_aggregation_gives_the_plain_sum_within_its_quantization_and_counts_its_bytes() -> None:
    from fedpal.privacy.secure_aggregation import SecAggConfig

    plain = simulator(private(z=0.0))
    _, _, expected = round_one(plain)
    raw = private(z=0.0)
    raw["privacy"]["secure_aggregation"] = True
    secured = simulator(raw)
    _, received, got = round_one(secured)
    step = SecAggConfig().step
    bound = len(received) * step / len(received) + 1e-7  # each client's quantization moves the sum by < one step
    assert all(float((got[k].double() - expected[k].double()).abs().max()) <= bound for k in expected)
    assert any(not torch.equal(got[k], expected[k]) for k in expected)  # it really went through integers
    assert secured.privacy.secure_aggregation_overhead > 0


def test_secure_aggregation_refuses_a_robust_rule_in_one_line() -> None:
    raw = private(z=0.0)
    raw["privacy"]["secure_aggregation"] = True
    raw["aggregation"] = {"rule": "krum"}
    with pytest.raises(ConfigError) as error:
        fedpal.run(raw)
    assert "\n" not in str(error.value) and "aggregation.rule = 'mean'" in str(error.value)


def test_prototype_replies_are_clipped_per_class_and_their_counts_withheld() -> None:
    model = {"name": "mlp", "hidden_dim": 16, "feature_dim": 8, "family": "image5"}
    raw = tiny_config(
        "fedproto", data={"num_clients": 4, "alpha": 5.0}, model=model, algorithm={"proto_weighting": "samples"}
    )
    raw["privacy"] = {"clip": 0.1}
    sim = simulator(raw)
    _, received, _ = round_one_prototypes(sim)
    for reply in received.values():
        assert all(float(v.norm()) <= 0.1 * (1 + 1e-6) for v in reply["prototypes"].values())
        assert set(reply["class_counts"].unique().tolist()) <= {0.0, 1.0}


def round_one_prototypes(sim: Any) -> tuple[None, dict, None]:
    received: dict[int, Any] = {}
    aggregate = sim.algorithm.aggregate
    sim.algorithm.aggregate = lambda s, r, replies, reduce: received.update(replies) or aggregate(s, r, replies, reduce)
    sim.run_round(1)
    return None, received, None


def test_a_budget_below_one_round_is_one_line() -> None:
    from fedpal.errors import UserError

    raw = private(z=0.5)
    raw["privacy"]["max_epsilon"] = 0.01
    with pytest.raises(UserError, match="below the epsilon of a single round"):
        fedpal.run(raw)


def prototype_run(name: str, z: float, clip: float = 0.1, **train: Any) -> dict[str, Any]:
    model = {"name": "mlp", "hidden_dim": 16, "feature_dim": 8, "family": "image5"}
    raw = tiny_config(name, data={"num_clients": 4, "alpha": 5.0}, model=model, train={"rounds": 2, **train})
    raw["privacy"] = {"clip": clip, "noise_multiplier": z}
    return raw


def test_noised_prototype_means_carry_noise_of_std_z_c_sqrt_2k_on_sums_and_z_sqrt_2k_on_counts() -> None:
    from fedpal.privacy.gaussian_noise import noised_prototype_mean

    z, clip, classes, dim, clients = 1.5, 0.2, 8, 16, 3
    held = torch.ones(clients, classes, dtype=torch.bool)
    held[:, 1] = False  # nobody holds class 1
    generator = torch.Generator().manual_seed(0)
    sums_std, count_std = z * clip * (2 * classes) ** 0.5, z * (2 * classes) ** 0.5
    # without noise: the exact per-class mean over the holders, and presence where somebody holds the class
    values = torch.randn(clients, classes, dim, generator=torch.Generator().manual_seed(1))
    mean, present = noised_prototype_mean(values, held, noise_multiplier=0.0, clip_norm=clip, generator=generator)
    assert torch.allclose(mean[held[0]], values[:, held[0]].mean(0), atol=1e-6)
    assert present.tolist() == held.any(0).tolist()
    # with noise: the formula, its std calibrated to the sensitivity C·sqrt(2K), its draws from the same generator
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    mean, _ = noised_prototype_mean(values, held, noise_multiplier=z, clip_norm=clip, generator=g1)
    sum_noise = torch.randn((classes, dim), generator=g2, dtype=torch.float64) * sums_std
    count_noise = torch.randn((classes,), generator=g2, dtype=torch.float64) * count_std
    counts_now = held.double().sum(0) + count_noise
    expected = ((values.double() * held.double().unsqueeze(2)).sum(0) + sum_noise) / counts_now.clamp_min(1).unsqueeze(
        1
    )
    assert torch.allclose(mean.double(), expected, atol=1e-5)


def test_a_prototype_method_under_noise_is_accounted_once_per_round_and_fully_covered() -> None:
    from fedpal.privacy.accountant import PrivacyAccountant

    result = fedpal.run(prototype_run("fedproto", z=1.0))
    privacy = result.summary["privacy"]
    accountant = PrivacyAccountant(4, delta=1e-5, sampling="without_replacement")
    accountant.compose(1.0, 4, rounds=2)
    assert privacy["epsilon"] == accountant.final_epsilon()
    assert "unprotected_keys" not in privacy
    # the global prototypes are the noised mean, not the plain one
    plain = fedpal.run(prototype_run("fedproto", z=0.0))
    assert result.summary["personalized"] != plain.summary["personalized"]


def test_a_server_that_reads_replies_beyond_the_reducer_is_named_as_not_covered() -> None:
    tgp = fedpal.run(prototype_run("fedtgp", z=1.0, rounds=1))
    assert tgp.summary["privacy"]["unprotected_keys"] == ["prototypes"]
    fedavg = fedpal.run(private(z=1.0, train={"rounds": 1}))
    assert "unprotected_keys" not in fedavg.summary["privacy"]


def test_prototypes_have_their_own_bound() -> None:
    raw = prototype_run("fedproto", z=0.0, clip=0.01)
    raw["privacy"]["prototype_clip"] = 0.3
    _, received, _ = round_one_prototypes(simulator(raw))
    norms = [float(v.norm()) for reply in received.values() for v in reply["prototypes"].values()]
    assert max(norms) <= 0.3 * (1 + 1e-6) and max(norms) > 0.29  # clipped to C_p, not to C = 0.01
