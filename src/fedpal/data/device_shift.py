"""Device and placement shift for IMU windows: the heterogeneity FedAli targets (phones of different make, carried
in different positions), simulated on a dataset recorded with one phone in one position (HAPT).

Each client is one device. It gets, once, for all its windows (training, validation and test alike):

* a rotation R, drawn uniformly over 3-D rotations (a random unit quaternion). A phone is a rigid body, so its
  accelerometer and gyroscope axes are turned by the same R relative to the body (a phone put in the pocket the
  other way round turns both sensors alike); every 3-axis sensor of a window gets this one R;
* a gain per channel (axis), log-normal, g = exp(s_g · z) with z ~ N(0, 1), and a bias per channel, N(0, s_b²)
  in the dataset's raw units (HAPT: g for the accelerometer, rad/s for the gyroscope): each axis of a MEMS sensor
  has its own scale-factor and offset error.

A sample x of one 3-axis sensor at one time step becomes y = g ⊙ (R x) + b: the sensor sees the body's signal in
its own rotated frame, then its axes' gains and offsets act. The draws come from a generator of their own, seeded
by (``data.device_shift_seed``, client) and never by the run seed, so a client (under the natural partition, a user)
keeps its device whatever the run's seed, and turning the shift on changes no other random draw. The rotation is
drawn first and every gain and bias is drawn whatever the spreads, so a spread only scales its own draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpal.common.seeding import derive_seed
from fedpal.errors import UserError

AXES = 3  # channels of one sensor (x, y, z)


@dataclass(frozen=True)
class DeviceShift:
    """One device: a rotation of every 3-axis sensor, then a gain and a bias per channel."""

    rotation: np.ndarray  # [3, 3], orthonormal with determinant +1
    gain: np.ndarray  # [channels]
    bias: np.ndarray  # [channels]


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly over SO(3): a normalised 4-D Gaussian is a uniform unit quaternion."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def device_shift_of(client: int, seed: int, channels: int, gain_spread: float, bias_spread: float) -> DeviceShift:
    """Client ``client``'s device, from (``seed`` = data.device_shift_seed, client) alone."""
    rng = np.random.default_rng(derive_seed(seed, "device-shift", client))
    rotation = random_rotation(rng)
    gain = np.exp(gain_spread * rng.standard_normal(channels))
    bias = bias_spread * rng.standard_normal(channels)
    return DeviceShift(rotation, gain, bias)


def check_imu_windows(dataset: str, shape: Sequence[int], channel_groups: Sequence[Sequence[int]] | None) -> None:
    """Refuse, in one line, inputs that are not windows of 3-axis sensors: [channels, time] with every run of three
    channels (0-2, 3-5, ...) one sensor, i.e. inside one of the dataset's sensor channel groups."""
    what = f"data.device_shift rotates 3-axis IMU sensors; dataset '{dataset}' has inputs of shape {list(shape)}"
    if channel_groups is None or len(shape) != 2:
        raise UserError(f"{what}, not sensor windows [channels, time]")
    channels = int(shape[0])
    if channels % AXES:
        raise UserError(f"{what}: its channel count {channels} is not a multiple of {AXES}")
    group_of = {c: i for i, group in enumerate(channel_groups) for c in group}
    for first in range(0, channels, AXES):
        sensor = range(first, first + AXES)
        if len({group_of.get(c, -1 - c) for c in sensor}) != 1:
            raise UserError(f"{what}: channels {first}-{first + AXES - 1} are not one sensor's axes")


def shift_windows(x: np.ndarray, shift: DeviceShift) -> np.ndarray:
    """Windows [n, channels, time] as the device records them: y = g ⊙ (R x) + b per 3-axis sensor and time step."""
    n, channels, steps = x.shape
    sensors = x.reshape(n, channels // AXES, AXES, steps)
    rotated = np.einsum("ij,nsjt->nsit", shift.rotation.astype(x.dtype), sensors).reshape(n, channels, steps)
    return rotated * shift.gain.astype(x.dtype)[:, None] + shift.bias.astype(x.dtype)[:, None]


def shift_clients(
    x: np.ndarray, parts: Sequence[np.ndarray], seed: int, gain_spread: float, bias_spread: float
) -> np.ndarray:
    """A copy of ``x`` with the rows of each partition (client) ``parts[p]`` recorded by device p; rows no client
    holds are left as they are."""
    out = x.copy()
    for client, rows in enumerate(parts):
        if len(rows):
            out[rows] = shift_windows(x[rows], device_shift_of(client, seed, x.shape[1], gain_spread, bias_spread))
    return out
