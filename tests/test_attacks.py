"""Simulated attacks and unreliable clients (ROBUSTNESS §3, §4, §8): each reply attack against its equation
computed by hand, the fixed malicious set, label flipping and the backdoor on training splits only, the attack
success rate, and the virtual clock's seeded availability, dropouts, latencies and deadline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fedpal.attacks.data_poisoning import (
    Trigger,
    apply_trigger,
    attack_success_rate,
    poison_training_data,
    trigger_for,
    triggered_test_set,
)
from fedpal.attacks.malicious import malicious_clients
from fedpal.attacks.reply_attacks import (
    PrototypeAttack,
    ReplyAttack,
    alie_z,
    attack_update,
    poison_prototypes,
)
from fedpal.attacks.unreliable import Unreliability, available_clients, client_outcome, round_fate
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.errors import ConfigError, UserError

TOL = 1e-7


def close(a: torch.Tensor, b: list[float] | torch.Tensor) -> bool:
    return torch.allclose(a.double(), torch.as_tensor(b, dtype=torch.float64), rtol=0.0, atol=TOL)


# ---- reply attacks: a reference, an honest reply (delta w = [0.5, -1, 0], b = [-0.5]) and two benign replies

REFERENCE = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), "b": torch.tensor([0.5], dtype=torch.float64)}


def shifted(w: list[float], b: list[float], steps: int = 7) -> dict[str, torch.Tensor]:
    """The reference plus a delta, with an integer counter that no attack may touch."""
    return {
        "w": REFERENCE["w"] + torch.tensor(w, dtype=torch.float64),
        "b": REFERENCE["b"] + torch.tensor(b, dtype=torch.float64),
        "steps": torch.tensor(steps),
    }


HONEST = shifted([0.5, -1.0, 0.0], [-0.5])
BENIGN = [shifted([1.0, 0.0, -2.0], [1.0]), shifted([3.0, 2.0, 0.0], [-1.0])]
REF = {**REFERENCE, "steps": torch.tensor(0)}


def attacked(attack: ReplyAttack, params=HONEST, benign=BENIGN, n: int = 5, m: int = 1, seed=0, round=1, client=3):
    return attack_update(
        attack, params, REF, benign=benign, num_clients=n, num_malicious=m, seed=seed, round=round, client=client
    )


def test_sign_flip_sends_minus_the_update() -> None:
    out = attacked(ReplyAttack("sign_flip"))
    assert close(out["w"], [1 - 0.5, 2 + 1, 3 - 0]) and close(out["b"], [0.5 + 0.5])
    assert torch.equal(out["steps"], torch.tensor(7))  # integer tensors pass through
    twice = attacked(ReplyAttack("sign_flip", flip_scale=2.0))
    assert close(twice["w"], [1 - 1.0, 2 + 2, 3]) and close(twice["b"], [0.5 + 1.0])


def test_scaling_multiplies_the_update_by_the_clients_of_the_round() -> None:
    out = attacked(ReplyAttack("scale"), n=5)  # gamma defaults to n = 5
    assert close(out["w"], [1 + 2.5, 2 - 5, 3]) and close(out["b"], [0.5 - 2.5])
    fixed = attacked(ReplyAttack("scale", gamma=0.5), n=5)
    assert close(fixed["w"], [1.25, 1.5, 3]) and close(fixed["b"], [0.25])


def test_ipm_sends_minus_epsilon_times_the_benign_mean() -> None:
    # benign deltas: w [1, 0, -2], [3, 2, 0] -> mean [2, 1, -1]; b [1], [-1] -> mean [0]
    out = attacked(ReplyAttack("ipm"))
    assert close(out["w"], [1 - 0.2, 2 - 0.1, 3 + 0.1]) and close(out["b"], [0.5])
    strong = attacked(ReplyAttack("ipm", epsilon=2.0))
    assert close(strong["w"], [1 - 4, 2 - 2, 3 + 2])


def test_alie_z_from_the_number_of_clients_and_attackers() -> None:
    # n = 20, m = 4: s = floor(20/2 + 1) - 4 = 7, (n - m - s)/(n - m) = 9/16
    assert alie_z(20, 4) == pytest.approx(norm.ppf(9 / 16), abs=1e-12)
    assert alie_z(20, 4) == pytest.approx(0.15731068461017067, abs=1e-12)
    # n = 10, m = 2: s = 4, the ratio is 1/2, z = 0: the crafted update is the benign mean
    assert alie_z(10, 2) == pytest.approx(0.0, abs=1e-12)
    # n = 50, m = 10: s = 16, ratio 24/40
    assert alie_z(50, 10) == pytest.approx(norm.ppf(24 / 40), abs=1e-12)
    with pytest.raises(UserError):  # m = 6 of 10: s = 0, the ratio is 1 and z is infinite
        alie_z(10, 6)


def test_alie_is_the_benign_mean_minus_z_standard_deviations() -> None:
    # three benign deltas of w: [1, 0, 0], [2, 0, 5], [6, 0, 5]: mean [3, 0, 10/3], unbiased std [sqrt 7, 0, sqrt(25/3)]
    benign = [shifted([1.0, 0.0, 0.0], [1.0]), shifted([2.0, 0.0, 5.0], [1.0]), shifted([6.0, 0.0, 5.0], [1.0])]
    z = norm.ppf(9 / 16)
    out = attacked(ReplyAttack("alie"), benign=benign, n=20, m=4)
    expected = [1 + 3 - z * math.sqrt(7), 2 + 0, 3 + 10 / 3 - z * math.sqrt(25 / 3)]
    assert close(out["w"], expected)
    assert close(out["b"], [0.5 + 1.0])  # identical benign deltas: std 0, the crafted delta is their value
    given = attacked(ReplyAttack("alie", z=1.5), benign=benign, n=20, m=4)
    assert close(given["w"], [1 + 3 - 1.5 * math.sqrt(7), 2, 3 + 10 / 3 - 1.5 * math.sqrt(25 / 3)])
    with pytest.raises(UserError):  # one benign update has no spread
        attacked(ReplyAttack("alie"), benign=benign[:1], n=20, m=4)


def test_gaussian_replaces_the_update_with_noise_of_the_given_scale() -> None:
    big_ref = {"w": torch.zeros(20_000, dtype=torch.float64)}
    params = {"w": torch.full((20_000,), 3.0, dtype=torch.float64)}
    out = attack_update(
        ReplyAttack("gaussian"), params, big_ref, benign=[], num_clients=5, num_malicious=1, seed=0, round=2, client=1
    )
    noise = out["w"]
    assert abs(float(noise.mean())) < 4 * 200 / math.sqrt(noise.numel())  # the honest update (3.0) is gone
    assert float(noise.std()) == pytest.approx(200.0, rel=0.03)
    # "add" keeps the honest update under the same noise
    added = attack_update(
        ReplyAttack("gaussian", noise="add"),
        params,
        big_ref,
        benign=[],
        num_clients=5,
        num_malicious=1,
        seed=0,
        round=2,
        client=1,
    )
    assert close(added["w"] - 3.0, noise)


def test_random_attacks_are_seeded_by_seed_round_and_client() -> None:
    gauss = ReplyAttack("gaussian", sigma=1.0)
    first = attacked(gauss, seed=5, round=3, client=2)
    again = attacked(gauss, seed=5, round=3, client=2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    for other in (dict(seed=6, round=3, client=2), dict(seed=5, round=4, client=2), dict(seed=5, round=3, client=4)):
        assert not torch.equal(attacked(gauss, **other)["w"], first["w"])
    protos = {"0": torch.tensor([3.0, 4.0]), "1": torch.tensor([0.0, 2.0])}
    rand = PrototypeAttack("random")
    a = poison_prototypes(rand, protos, [], seed=5, round=3, client=2)
    b = poison_prototypes(rand, protos, [], seed=5, round=3, client=2)
    c = poison_prototypes(rand, protos, [], seed=5, round=3, client=7)
    assert torch.equal(a["0"], b["0"]) and not torch.equal(a["0"], c["0"])


def test_attacked_tensors_keep_dtype() -> None:
    ref = {"w": torch.zeros(3)}
    out = attack_update(
        ReplyAttack("sign_flip"),
        {"w": torch.ones(3)},
        ref,
        benign=[],
        num_clients=2,
        num_malicious=1,
        seed=0,
        round=0,
        client=0,
    )
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], -torch.ones(3))


def test_prototype_negation_of_the_benign_class_mean() -> None:
    own = {"0": torch.tensor([1.0, 1.0]), "2": torch.tensor([0.5, -2.0])}
    benign = [{"0": torch.tensor([2.0, 0.0]), "1": torch.tensor([9.0, 9.0])}, {"0": torch.tensor([0.0, 4.0])}]
    out = poison_prototypes(PrototypeAttack(), own, benign, seed=0, round=0, client=0)
    assert set(out) == {"0", "2"}  # only the classes the attacker holds
    assert close(out["0"], [-1.0, -2.0])  # -(mean of [2, 0] and [0, 4])
    assert close(out["2"], [-0.5, 2.0])  # nobody benign reported class 2: its own vector negated
    scaled = poison_prototypes(PrototypeAttack(scale=3.0), own, benign, seed=0, round=0, client=0)
    assert close(scaled["0"], [-3.0, -6.0])


def test_random_prototypes_keep_the_norm_and_point_anywhere() -> None:
    own = {"4": torch.tensor([3.0, 4.0, 0.0]), "7": torch.tensor([0.0, 0.0, 0.5])}
    out = poison_prototypes(PrototypeAttack("random"), own, [], seed=1, round=0, client=0)
    assert float(out["4"].norm()) == pytest.approx(5.0, abs=1e-6)
    assert float(out["7"].norm()) == pytest.approx(0.5, abs=1e-6)
    doubled = poison_prototypes(PrototypeAttack("random", scale=2.0), own, [], seed=1, round=0, client=0)
    assert close(doubled["4"], 2 * out["4"].double())
    # isotropic: over many rounds the unit directions average out
    directions = torch.stack(
        [poison_prototypes(PrototypeAttack("random"), own, [], seed=1, round=r, client=0)["4"] / 5 for r in range(400)]
    )
    assert float(directions.mean(0).norm()) < 4 / math.sqrt(400)


# ---- the malicious set


@pytest.mark.parametrize(
    ("n", "fraction", "size"), [(20, 0.2, 4), (20, 0.3, 6), (10, 0.1, 1), (10, 0.25, 3), (7, 0, 0)]
)
def test_malicious_set_size_and_range(n: int, fraction: float, size: int) -> None:
    chosen = malicious_clients(n, fraction, seed=3)
    assert len(chosen) == size and chosen <= set(range(n))
    assert malicious_clients(n, fraction, seed=3) == chosen


def test_malicious_set_depends_on_the_seed() -> None:
    sets = {malicious_clients(20, 0.2, seed=s) for s in range(10)}
    assert len(sets) > 5
    assert malicious_clients(20, 1.0, seed=0) == frozenset(range(20))
    with pytest.raises(ConfigError):
        malicious_clients(20, 1.5, seed=0)


# ---- data poisoning on a hand-made federation whose splits are views of one storage, as the real ones


def federation(input_shape: tuple[int, ...] = (1, 8, 8), sizes: tuple[int, int, int] = (15, 4, 6)) -> FederatedData:
    g = torch.Generator().manual_seed(0)
    n_clients, per_client = 3, sum(sizes)
    x_all = torch.rand(n_clients * per_client, *input_shape, generator=g) * 1.8 - 0.9  # inside (-0.9, 0.9)
    y_all = torch.arange(n_clients * per_client) % 10
    clients = []
    for c in range(n_clients):
        s = c * per_client
        a, b, e = s + sizes[0], s + sizes[0] + sizes[1], s + per_client
        clients.append(ClientData(x_all[s:a], y_all[s:a], x_all[a:b], y_all[a:b], x_all[b:e], y_all[b:e]))
    return FederatedData("toy", 10, tuple(str(i) for i in range(10)), input_shape, clients)


def snapshot(data: FederatedData) -> list[list[torch.Tensor]]:
    splits = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    return [[getattr(c, s).clone() for s in splits] for c in data.clients]


def unchanged(before: list[list[torch.Tensor]], data: FederatedData) -> bool:
    """Every split of every client still holds the values of ``before``."""
    now = snapshot(data)
    return all(torch.equal(a, b) for old, new in zip(before, now, strict=True) for a, b in zip(old, new, strict=True))


def test_label_flip_changes_only_the_malicious_training_labels() -> None:
    data = federation()
    before = snapshot(data)
    poisoned = poison_training_data(data, {1}, "label_flip", seed=0)
    assert torch.equal(poisoned.clients[1].train_y, 9 - before[1][1])
    assert torch.equal(poisoned.clients[1].train_x, before[1][0])
    for split in ("val_x", "val_y", "test_x", "test_y"):  # the very same tensors: untouched
        assert getattr(poisoned.clients[1], split) is getattr(data.clients[1], split)
    assert poisoned.clients[0] is data.clients[0] and poisoned.clients[2] is data.clients[2]
    assert unchanged(before, data)


def carries_patch(x: torch.Tensor, value: float) -> torch.Tensor:
    """Per sample: is its bottom-right 4x4 corner, on every channel, exactly ``value``?"""
    return (x[..., -4:, -4:] == value).flatten(1).all(1)


def test_backdoor_poisons_exactly_the_fraction_with_patch_and_target() -> None:
    data = federation()
    before = snapshot(data)
    trigger = trigger_for(data)
    assert trigger.kind == "image" and trigger.size == 4
    assert trigger.value == max(float(c.train_x.max()) for c in data.clients)
    poisoned = poison_training_data(data, [0, 2], "backdoor", seed=4)
    for cid in (0, 2):
        x, y = poisoned.clients[cid].train_x, poisoned.clients[cid].train_y
        marked = carries_patch(x, trigger.value)
        assert int(marked.sum()) == 8  # round(0.5 * 15), halves up
        assert bool((y[marked] == 9).all())
        old_x, old_y = before[cid][0], before[cid][1]
        assert torch.equal(x[~marked], old_x[~marked]) and torch.equal(y[~marked], old_y[~marked])
        outside = torch.ones(8, 8, dtype=torch.bool)
        outside[-4:, -4:] = False
        assert torch.equal(x[marked][..., outside], old_x[marked][..., outside])  # only the corner changed
        for split in ("val_x", "val_y", "test_x", "test_y"):
            assert getattr(poisoned.clients[cid], split) is getattr(data.clients[cid], split)
    assert poisoned.clients[1] is data.clients[1]
    assert unchanged(before, data)
    # the poisoned samples are seeded: the same for the same seed, others for another
    again = poison_training_data(data, [0, 2], "backdoor", seed=4)
    other = poison_training_data(data, [0, 2], "backdoor", seed=5)
    assert torch.equal(again.clients[0].train_x, poisoned.clients[0].train_x)
    assert not torch.equal(other.clients[0].train_y, poisoned.clients[0].train_y)
    custom = poison_training_data(data, [0], "backdoor", seed=4, fraction=0.2, target=3)
    marked = carries_patch(custom.clients[0].train_x, trigger.value)
    assert int(marked.sum()) == 3 and bool((custom.clients[0].train_y[marked] == 3).all())  # round(0.2 * 15)


def test_series_trigger_sets_the_last_steps_of_every_channel() -> None:
    data = federation(input_shape=(6, 32))
    trigger = trigger_for(data)
    assert trigger.kind == "series"
    x = data.clients[0].train_x
    stamped = apply_trigger(x, trigger)
    assert bool((stamped[..., -4:] == trigger.value).all())
    assert torch.equal(stamped[..., :-4], x[..., :-4])
    assert not bool((x[..., -4:] == trigger.value).all())  # the input itself is untouched
    text = FederatedData(
        "text", 10, tuple("0123456789"), (20,), [ClientData(*(torch.zeros(2, 20, dtype=torch.long),) * 6)]
    )
    with pytest.raises(UserError):
        trigger_for(text)


def test_triggered_test_set_and_attack_success_rate() -> None:
    data = federation()
    trigger = Trigger("image", value=1.0)
    test = triggered_test_set(data, {1}, trigger, target=9)
    benign_labels = torch.cat([data.clients[0].test_y, data.clients[2].test_y])
    assert test.y.shape[0] == int((benign_labels != 9).sum()) and bool((test.y != 9).all())
    assert bool(carries_patch(test.x, 1.0).all())
    assert set(test.owner.tolist()) == {0, 2}
    assert test.of_client(0).shape[0] == int((data.clients[0].test_y != 9).sum())
    # hand case: 3 of 5 triggered samples land on the target
    assert attack_success_rate(torch.tensor([9, 1, 9, 9, 0]), 9) == pytest.approx(0.6)
    assert attack_success_rate(torch.tensor([0, 1]), 9) == 0.0
    assert math.isnan(attack_success_rate(torch.tensor([], dtype=torch.long), 9))


# ---- unreliable clients on the virtual clock


def outcomes(settings: Unreliability, rounds: int = 200, clients: int = 50, seed: int = 0):
    return [client_outcome(settings, seed, r, c) for r in range(rounds) for c in range(clients)]


def test_availability_and_dropout_frequencies_match_their_probabilities() -> None:
    settings = Unreliability(p_available=0.7, p_drop=0.2)
    drawn = outcomes(settings)
    n = len(drawn)
    available = sum(o.available for o in drawn)
    assert abs(available / n - 0.7) <= 3 * math.sqrt(0.7 * 0.3 / n)
    dropped = sum(o.dropped for o in drawn)
    assert abs(dropped / available - 0.2) <= 3 * math.sqrt(0.2 * 0.8 / available)
    assert not any(o.dropped and not o.available for o in drawn)


def test_log_latency_has_the_set_mean_and_deviation() -> None:
    settings = Unreliability(latency_mu=0.5, latency_sigma=0.8)
    logs = np.log([o.latency for o in outcomes(settings)])
    assert abs(logs.mean() - 0.5) <= 4 * 0.8 / math.sqrt(logs.size)
    assert logs.std(ddof=1) == pytest.approx(0.8, rel=0.03)
    # sigma = 0: every latency is exp(mu)
    fixed = outcomes(Unreliability(latency_mu=0.5), rounds=3, clients=3)
    assert all(o.latency == pytest.approx(math.exp(0.5), rel=1e-15) for o in fixed)


def test_late_replies_are_exactly_those_past_the_deadline() -> None:
    settings = Unreliability(p_drop=0.1, latency_mu=0.0, latency_sigma=1.0, deadline=2.0)
    saw_late = saw_all_in_time = False
    for r in range(100):
        fate = round_fate(settings, 0, r, range(10))
        trained = [c for c in range(10) if not fate.outcomes[c].dropped]
        assert fate.late == [c for c in trained if fate.outcomes[c].latency > 2.0]
        assert fate.accepted == [c for c in trained if fate.outcomes[c].latency <= 2.0]
        assert sorted(fate.late + fate.accepted + fate.dropped) == list(range(10))
        # the server waits until the deadline when a reply is missing, else until the last accepted one
        if fate.late or fate.dropped:
            assert fate.virtual_time == 2.0
            saw_late = saw_late or bool(fate.late)
        else:
            assert fate.virtual_time == max(fate.outcomes[c].latency for c in fate.accepted) <= 2.0
            saw_all_in_time = True
    assert saw_late and saw_all_in_time


def test_without_a_deadline_a_lost_reply_does_not_hold_the_round() -> None:
    settings = Unreliability(p_drop=0.5, latency_sigma=1.0)
    fate = next(f for f in (round_fate(settings, 0, r, range(6)) for r in range(50)) if f.dropped and f.accepted)
    assert fate.late == []
    assert fate.virtual_time == max(fate.outcomes[c].latency for c in fate.accepted)


def test_outcomes_are_deterministic_and_coupled_across_probabilities() -> None:
    low = Unreliability(p_available=0.3, latency_sigma=1.0)
    high = Unreliability(p_available=0.6, latency_sigma=1.0)
    assert outcomes(low, rounds=20) == outcomes(low, rounds=20)
    assert outcomes(low, rounds=20, seed=1) != outcomes(low, rounds=20)
    for a, b in zip(outcomes(low, rounds=20), outcomes(high, rounds=20), strict=True):
        assert b.available or not a.available  # more availability only adds clients
        assert a.latency == b.latency
    assert available_clients(low, 0, 4, [5, 1, 3, 0, 2, 4]) == available_clients(low, 0, 4, range(6))


def test_a_dead_client_is_never_available_and_never_waited_for() -> None:
    settings = Unreliability(latency_sigma=0.5, p_available_by_client={3: 0.0})
    for r in range(300):
        assert available_clients(settings, 0, r, range(6)) == [0, 1, 2, 4, 5]
    fate = round_fate(settings, 0, 7, range(6))  # an engine that sampled it anyway
    assert fate.unavailable == [3] and 3 not in fate.trained
    assert fate.virtual_time == max(fate.outcomes[c].latency for c in fate.accepted)  # finite, no deadline set
    with pytest.raises(ConfigError):
        Unreliability(p_available_by_client={0: 1.5})
