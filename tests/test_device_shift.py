"""FedAli's device and placement shift (``data.device_shift``): one rotation of the 3-axis sensors, a gain and a bias
per channel for each client, drawn from their own seed, applied before the normalisation statistics are taken."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpal.cli import main
from fedpal.config import DataConfig, from_dict
from fedpal.data.client_data import FederatedData
from fedpal.data.device_shift import DeviceShift, check_imu_windows, device_shift_of, shift_windows
from fedpal.data.federated import build_federated_data
from fedpal.data.sources.base import Dataset
from fedpal.errors import ConfigError, UserError

USERS, CLASSES, PER_CLASS, STEPS = 4, 3, 10, 16


def imu_dataset(channels: int = 6, groups: tuple[tuple[int, ...], ...] = ((0, 1, 2), (3, 4, 5))) -> Dataset:
    """Four users' windows [channels, 16], each user's windows in time order, a class signal plus noise."""
    rng = np.random.default_rng(0)
    y = np.tile(np.repeat(np.arange(CLASSES), PER_CLASS), USERS).astype(np.int64)
    x = (rng.normal(size=(y.size, channels, STEPS)) + y[:, None, None]).astype(np.float32)
    x[:, 0] += 1.0  # gravity on one axis
    users = np.repeat(np.arange(USERS), CLASSES * PER_CLASS).astype(np.int64)
    order = np.tile(np.arange(CLASSES * PER_CLASS), USERS).astype(np.int64)
    names = tuple(f"c{i}" for i in range(CLASSES))
    return Dataset("imu", x, y, CLASSES, names, groups=users, order=order, channel_groups=groups)


@pytest.fixture
def imu(monkeypatch: pytest.MonkeyPatch) -> Dataset:
    dataset = imu_dataset()
    monkeypatch.setattr("fedpal.data.federated.load_dataset", lambda name, options: dataset)
    return dataset


def natural(**keys: object) -> DataConfig:
    base: dict[str, object] = {"dataset": "imu", "partition": "natural", "num_clients": 0, "split": "chronological"}
    return DataConfig(**{**base, **keys})  # type: ignore[arg-type]


def every_split(data: FederatedData) -> list[torch.Tensor]:
    return [getattr(c, s) for c in data.clients + data.unseen for s in ("train_x", "val_x", "test_x")]


def same_federation(a: FederatedData, b: FederatedData) -> bool:
    splits = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    clients = zip(a.clients + a.unseen, b.clients + b.unseen, strict=True)
    same_ids = (a.client_ids, a.unseen_ids) == (b.client_ids, b.unseen_ids)
    return same_ids and all(torch.equal(getattr(p, s), getattr(q, s)) for p, q in clients for s in splits)


# ---- the draws
def test_rotations_are_proper_orthonormal_fixed_per_client_and_uniform():
    rotations = [device_shift_of(k, 3, 6, 0.1, 0.05).rotation for k in range(2000)]
    for r in rotations[:50]:
        assert np.allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-12)
    assert np.array_equal(device_shift_of(7, 3, 6, 0.1, 0.05).rotation, rotations[7])  # the same user, again
    assert not np.allclose(rotations[7], rotations[8])
    # uniform over SO(3): every entry has mean 0 (a draw biased toward the identity would not)
    assert np.abs(np.mean(rotations, axis=0)).max() < 0.05


def test_gain_and_bias_are_per_client_per_channel_with_the_configured_spreads():
    shifts = [device_shift_of(k, 0, 6, 0.2, 0.05) for k in range(500)]
    log_gains = np.stack([np.log(s.gain) for s in shifts])
    biases = np.stack([s.bias for s in shifts])
    assert log_gains.std() == pytest.approx(0.2, rel=0.05) and abs(log_gains.mean()) < 0.01
    assert biases.std() == pytest.approx(0.05, rel=0.05) and abs(biases.mean()) < 0.002
    assert not np.allclose(shifts[0].gain, shifts[1].gain) and not np.allclose(shifts[0].bias, shifts[1].bias)
    none = device_shift_of(4, 0, 6, 0.0, 0.0)
    assert np.array_equal(none.gain, np.ones(6)) and np.array_equal(none.bias, np.zeros(6))
    # a spread only scales its own draws: the rotation and the direction of the errors stay the same
    assert np.array_equal(none.rotation, shifts[4].rotation)
    assert np.allclose(np.log(device_shift_of(4, 0, 6, 0.4, 0.1).gain), 2 * log_gains[4])
    assert not np.allclose(device_shift_of(4, 1, 6, 0.2, 0.05).rotation, shifts[4].rotation)  # another device seed


def test_a_window_becomes_R_x_times_g_plus_b():
    quarter_turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 90 degrees about z
    shift = DeviceShift(quarter_turn, np.array([1.0, 2.0, 0.5, 1.0, 1.0, 3.0]), np.array([0.0, 0.1, 0.0, -1.0, 0, 0]))
    # one window, two time steps: acc (1, 2, 3) then (0, 0, 1); gyro (4, 5, 6) then (1, 0, 0)
    x = np.array([[[1, 0], [2, 0], [3, 1], [4, 1], [5, 0], [6, 0]]], dtype=np.float32)
    # R (1, 2, 3) = (-2, 1, 3); R (0, 0, 1) = (0, 0, 1); R (4, 5, 6) = (-5, 4, 6); R (1, 0, 0) = (0, 1, 0)
    expected = np.array([[[-2, 0], [2.1, 0.1], [1.5, 0.5], [-6, -1], [4, 1], [18, 0]]], dtype=np.float32)
    assert np.allclose(shift_windows(x, shift), expected, atol=1e-6)


# ---- in the federation
def test_the_federation_equals_one_built_from_windows_each_user_shifted_by_hand(imu, monkeypatch):
    config = natural(unseen_clients=1, device_shift=True, device_shift_seed=5, device_shift_gain=0.3)
    shifted = build_federated_data(config, seed=2)
    assert len(shifted.unseen) == 1
    by_hand = imu.x.astype(np.float64).copy()
    for user in range(USERS):  # natural partition: client k is user k, held out or not
        device = device_shift_of(user, 5, 6, 0.3, config.device_shift_bias)
        for row in np.flatnonzero(imu.groups == user):
            window = imu.x[row].astype(np.float64)
            sensors = [device.rotation @ window[3 * s : 3 * s + 3] for s in range(2)]
            by_hand[row] = np.concatenate(sensors) * device.gain[:, None] + device.bias[:, None]
    recorded = dataclasses.replace(imu, x=by_hand.astype(np.float32))
    monkeypatch.setattr("fedpal.data.federated.load_dataset", lambda name, options: recorded)
    expected = build_federated_data(dataclasses.replace(config, device_shift=False), seed=2)
    # so the normalisation statistics come from the shifted training windows, and the held-out user is shifted too
    for got, want in zip(every_split(shifted), every_split(expected), strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    assert (shifted.client_ids, shifted.unseen_ids) == (expected.client_ids, expected.unseen_ids)


def test_a_user_keeps_its_device_under_every_run_seed_and_only_the_device_seed_changes_it(imu):
    # natural partition, time-ordered split and nobody held out: nothing else in the federation depends on the seed
    first = build_federated_data(natural(device_shift=True), seed=0)
    assert same_federation(first, build_federated_data(natural(device_shift=True), seed=11))
    assert not same_federation(first, build_federated_data(natural(device_shift=True, device_shift_seed=1), seed=0))
    assert not same_federation(first, build_federated_data(natural(), seed=0))


def test_off_is_bit_identical_and_on_changes_no_other_draw_under_label_skew(imu):
    skewed = {"partition": "dirichlet", "alpha": 0.3, "num_clients": 3, "min_samples": 5, "split": "stratified"}
    plain = build_federated_data(natural(unseen_clients=1, **skewed), seed=4)
    # the device keys do nothing while the shift is off
    idle = natural(unseen_clients=1, device_shift_seed=9, device_shift_gain=1.0, device_shift_bias=2.0, **skewed)
    assert same_federation(plain, build_federated_data(idle, seed=4))
    shifted = build_federated_data(natural(unseen_clients=1, device_shift=True, **skewed), seed=4)
    # the same label-skewed partition, splits and held-out client: only the inputs change
    assert (shifted.client_ids, shifted.unseen_ids) == (plain.client_ids, plain.unseen_ids)
    for p, q in zip(plain.clients + plain.unseen, shifted.clients + shifted.unseen, strict=True):
        assert all(torch.equal(getattr(p, s), getattr(q, s)) for s in ("train_y", "val_y", "test_y"))
        assert not torch.allclose(p.train_x, q.train_x)


# ---- refusals
@pytest.mark.parametrize(
    "shape, groups, fragment",
    [
        ((4, 16), ((0, 1), (2, 3)), "channel count 4 is not a multiple of 3"),
        ((1, 8, 8), None, "not sensor windows"),
        ((6, 16), None, "not sensor windows"),  # no sensor channel groups: not IMU data
        ((6, 16), ((0, 1), (2, 3, 4, 5)), "channels 0-2 are not one sensor's axes"),
    ],
)
def test_data_that_are_not_3_axis_sensor_windows_are_refused_in_one_line(shape, groups, fragment):
    with pytest.raises(UserError, match=fragment) as refused:
        check_imu_windows("some", shape, groups)
    assert "\n" not in str(refused.value)


def test_a_non_multiple_of_3_channel_count_is_refused_before_building(monkeypatch):
    four = imu_dataset(channels=4, groups=((0, 1), (2, 3)))
    monkeypatch.setattr("fedpal.data.federated.load_dataset", lambda name, options: four)
    with pytest.raises(UserError, match="not a multiple of 3"):
        build_federated_data(natural(device_shift=True), seed=0)
    assert build_federated_data(natural(), seed=0).num_clients == USERS  # off: the same data are fine


def test_the_cli_refuses_images_in_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "digits.toml"
    config.write_text('[data]\ndataset = "digits"\nnum_clients = 3\ndevice_shift = true\n[train]\nrounds = 1\n')
    code = main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fedpal: error:") and "data.device_shift" in err


def test_negative_spreads_are_config_errors():
    with pytest.raises(ConfigError, match="device_shift_gain"):
        from_dict({"data": {"device_shift_gain": -0.1}})
    with pytest.raises(ConfigError, match="device_shift_bias"):
        from_dict({"data": {"device_shift_bias": -1}})
