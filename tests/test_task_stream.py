"""FedMosaic's task stream (fedpal.data.task_stream): the data contract a continual, multi-task federation promises.

Every check reads the built federation (or the plan of source rows behind it) against a rule stated in the module
docstring or the spec: disjoint rows, the union label space, the scenario's relatedness, what a client holds in each
round of either regime, and that the engine trains on exactly that. The stream needs MNIST, Fashion-MNIST,
Animal-MNIST and HAPT; the tests skip when one is absent. Tiny quotas keep every build well under a second after the
first load.
"""

from __future__ import annotations

import functools
import itertools
import math
import pickle

import numpy as np
import pytest
import torch

from fedpal.config import DataConfig, from_dict
from fedpal.data import task_stream as ts
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.data.federated import build_federated_data
from fedpal.data.sources.base import Dataset
from fedpal.data.sources.registry import get_dataset_spec, load_dataset
from fedpal.data.tagged_inputs import HEADER, MODALITY_CODES
from fedpal.errors import ConfigError

SOURCES = ("mnist", "fashion_mnist", "animal_mnist", "hapt")
missing = [name for name in SOURCES if not get_dataset_spec(name).is_installed()]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"task stream sources not installed: {missing}")

# The relabelled tasks' classes, by the source's class names (a name left out: that class is not used).
RELABELLED = {
    "digit_parity": {str(d): ("even", "odd")[d % 2] for d in range(10)},
    "clothing_kind": {
        "T-shirt/top": "top",
        "Trouser": "trouser_dress",
        "Pullover": "top",
        "Dress": "trouser_dress",
        "Coat": "top",
        "Sandal": "footwear",
        "Shirt": "top",
        "Sneaker": "footwear",
        "Bag": "bag",
        "Ankle boot": "footwear",
    },
    "animal_kind": {
        **dict.fromkeys(("bear", "elephant", "giraffe", "zebra"), "wild"),
        **dict.fromkeys(("cow", "horse", "sheep"), "farm"),
        **dict.fromkeys(("bird", "cat", "dog"), "pet"),
    },
    "moving_or_static": {
        **dict.fromkeys(("walking", "walking_upstairs", "walking_downstairs"), "moving"),
        **dict.fromkeys(("sitting", "standing", "laying"), "static"),
    },
    "locomotion": {"walking": "walking", "walking_upstairs": "upstairs", "walking_downstairs": "downstairs"},
}
SAMPLES, VAL, TEST = 10, 2, 4  # samples_per_task 10 with the default ratios 0.2 / 0.4
R = 2


def stream_config(**keys: object) -> DataConfig:
    values = {"dataset": "task_stream", "num_clients": 10, "samples_per_task": SAMPLES, "rounds_per_task": R}
    return DataConfig(**{**values, **keys})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dynamic() -> FederatedData:
    return build_federated_data(stream_config(), seed=0)


@pytest.fixture(scope="module")
def static() -> FederatedData:
    return build_federated_data(stream_config(task_regime="static"), seed=0)


@pytest.fixture(scope="module")
def plan() -> ts.StreamPlan:
    return ts.plan_task_stream(stream_config(), seed=0)


@functools.cache
def loaded(name: str) -> Dataset:
    return load_dataset(name)


def row_tasks(x: torch.Tensor) -> list[int]:
    return sorted(set(x[:, 0].long().tolist()))


# --- rows


def test_no_row_is_held_twice_or_taken_from_the_public_block(plan: ts.StreamPlan) -> None:
    held: dict[str, list[np.ndarray]] = {name: [] for name in SOURCES}
    for tasks in plan.tasks:
        for t in tasks:
            held[ts.TASKS[t.task].source] += [t.train, t.val, t.test]
            assert (len(t.train), len(t.val), len(t.test)) == (SAMPLES, VAL, TEST)
    for name, parts in held.items():
        rows = np.concatenate(parts)
        assert np.unique(rows).size == rows.size, f"{name}: a row is held twice"
        assert not np.isin(rows, plan.public[name]).any(), f"{name}: a client holds a public row"
        assert plan.public[name].size >= 2000  # the default block (grouped sources: whole users reaching it)


def test_hapt_users_are_kept_apart_and_no_window_overlaps_across_splits(plan: ts.StreamPlan) -> None:
    source = loaded("hapt")
    assert source.groups is not None and source.order is not None
    public_users = set(source.groups[plan.public["hapt"]].tolist())
    assert np.isin(source.groups, list(public_users)).sum() == plan.public["hapt"].size  # whole users
    hapt_slots = [t for tasks in plan.tasks for t in tasks if ts.TASKS[t.task].source == "hapt"]
    assert len(hapt_slots) == 8
    users_of_slot = [set(t.groups) for t in hapt_slots]
    for a, b in itertools.combinations(users_of_slot, 2):
        assert not a & b  # a user's windows go to one client only
    for t, users in zip(hapt_slots, users_of_slot, strict=True):
        assert not users & public_users
        for split in (t.train, t.val, t.test):
            assert set(source.groups[split].tolist()) <= users
        # windows overlap by half their length with their neighbours: in different splits of one user and class
        # (overlapping windows always share their class), two windows are never neighbours
        split_of = {int(r): s for s, rows in enumerate((t.train, t.val, t.test)) for r in rows}
        rows = np.array(sorted(split_of))
        for i, j in itertools.combinations(rows, 2):
            if (
                split_of[int(i)] != split_of[int(j)]
                and source.groups[i] == source.groups[j]
                and source.y[i] == source.y[j]
            ):
                assert abs(int(source.order[i]) - int(source.order[j])) >= 2


def test_the_public_blocks_are_the_pretraining_public_splits(plan: ts.StreamPlan) -> None:
    """The multi-task pre-training (and so the A/B alignment on its rows) never sees a client's sample."""
    from fedpal.pretraining.multitask import public_rows as pretraining_public_rows

    for name in SOURCES:
        source = loaded(name)
        rows, _ = pretraining_public_rows(name, source, stream_config(), 0, 2000)
        np.testing.assert_array_equal(rows, plan.public[name])
        np.testing.assert_array_equal(ts.public_rows(name, 2000), plan.public[name])
    with pytest.raises(ConfigError, match=r"pretrain\.public_samples"):
        from_dict(
            {
                "data": {"dataset": "task_stream", "num_clients": 10, "task_public_samples": 1000},
                "pretrain": {"method": "multitask", "model": "mosaic_small", "public_samples": 2000},
            }
        )


def test_public_inputs_are_the_public_blocks_under_every_task(dynamic: FederatedData, plan: ts.StreamPlan) -> None:
    """``public_x`` (the adapters' alignment inputs): every source's public block, tagged, covering every task and both
    modalities; its HAPT windows are z-scored with the block's own statistics (mean 0, std 1 per sensor)."""
    public_x = dynamic.public_x
    assert public_x is not None and public_x.shape == (sum(r.size for r in plan.public.values()), 786)
    assert set(public_x[:, 0].long().tolist()) == set(range(len(ts.TASKS)))
    imu = public_x[public_x[:, 1] == MODALITY_CODES["imu"], HEADER : HEADER + 768].reshape(-1, 6, 128).double()
    assert imu.shape[0] == plan.public["hapt"].size
    for sensor in (imu[:, :3], imu[:, 3:]):
        assert abs(float(sensor.mean())) < 1e-4 and abs(float(sensor.std()) - 1) < 1e-3
    # a row of a class-subset task holds a class of that task: locomotion's public windows are all moving ones
    hapt = loaded("hapt")
    windows = hapt.x[plan.public["hapt"], 0, :8].astype(np.float64)  # acc-x, first samples: a window's fingerprint
    acc = hapt.x[plan.public["hapt"], :3].astype(np.float64)
    locomotion = public_x[public_x[:, 0] == ts.TASK_IDS["locomotion"], HEADER : HEADER + 8].double().numpy()
    assert locomotion.shape[0] > 0
    raw = locomotion * acc.std() + acc.mean()
    nearest = np.abs(raw[:, None, :] - windows[None, :, :]).max(axis=2)
    assert nearest.min(axis=1).max() < 1e-4
    assert np.isin(hapt.y[plan.public["hapt"]][nearest.argmin(axis=1)], [0, 1, 2]).all()


def splits(client: ClientData, part: str) -> list[tuple[torch.Tensor, int]]:
    return [(getattr(client, f"{s}_{part}"), n) for s, n in (("train", SAMPLES), ("val", VAL), ("test", TEST))]


def test_tensors_hold_the_planned_rows_transformed_and_relabelled(dynamic: FederatedData, plan: ts.StreamPlan) -> None:
    """Each stored row is the source sample of its planned row, under its task's transform, with its task's label;
    HAPT windows z-scored per sensor with the public block's statistics."""
    hapt = loaded("hapt")
    public = hapt.x[plan.public["hapt"]].astype(np.float64)
    acc, gyro = public[:, :3], public[:, 3:]
    for cid in range(10):
        client = dynamic.clients[cid]
        for position, t in enumerate(plan.tasks[cid]):
            task = ts.TASKS[t.task]
            source = loaded(task.source)
            # dynamic regime: every split stores its rows task by task (training rows in their planned arrival order)
            x = torch.cat([split[position * n : (position + 1) * n] for split, n in splits(client, "x")])
            y = torch.cat([split[position * n : (position + 1) * n] for split, n in splits(client, "y")])
            assert x[:, 0].eq(t.task).all() and x[:, 1].eq(MODALITY_CODES[task.modality]).all()
            for row, stored, label in zip(np.concatenate([t.train, t.val, t.test]), x, y, strict=True):
                want_class = RELABELLED.get(task.name, {}).get(source.class_names[source.y[row]], "?")
                if task.name not in RELABELLED:  # the source's own classes
                    want_class = source.class_names[source.y[row]]
                assert dynamic.class_names[int(label)] == f"{task.name}:{want_class}"
                payload = stored[HEADER:].double().numpy()
                if task.source == "hapt":
                    raw = source.x[row].astype(np.float64)
                    want = np.concatenate([(raw[:3] - acc.mean()) / acc.std(), (raw[3:] - gyro.mean()) / gyro.std()])
                    np.testing.assert_allclose(payload[:768], want.reshape(-1), atol=1e-4)
                    assert not payload[768:].any()
                    continue
                image = source.x[row, 0].astype(np.float64)
                if task.name.startswith("inverted_"):
                    image = 255 - image
                elif task.name.startswith("rotated_"):  # counter-clockwise: the top row becomes the left column
                    image = image[:, ::-1].T
                np.testing.assert_allclose(payload, ((image / 255 - 0.5) / 0.5).reshape(-1), atol=1e-6)


# --- labels and scenario


def test_union_label_space(dynamic: FederatedData) -> None:
    sizes = [len(t.classes) for t in ts.TASKS]
    assert dynamic.num_classes == sum(sizes) == len(dynamic.label_tasks) == len(dynamic.class_names)
    assert dynamic.label_tasks == sorted(dynamic.label_tasks)  # task k's classes: one range after task k-1's
    assert [dynamic.label_tasks.count(k) for k in range(len(ts.TASKS))] == sizes
    assert dynamic.class_names[3] == "digits:3" and dynamic.task_names[0] == "digits"
    for c, name in enumerate(dynamic.class_names):
        assert name.split(":")[0] == dynamic.task_names[dynamic.label_tasks[c]]
    for client in dynamic.clients:
        for x, y in ((client.train_x, client.train_y), (client.val_x, client.val_y), (client.test_x, client.test_y)):
            label_task = torch.tensor(dynamic.label_tasks)[y]
            assert torch.equal(label_task, x[:, 0].long())  # each label lies in its own row's task range


def test_scenario_tasks_modalities_and_related_pairs(dynamic: FederatedData) -> None:
    assert dynamic.num_clients == 10 and dynamic.input_shape == (786,)
    assert all(len(set(tasks)) == 4 for tasks in dynamic.client_tasks)
    assert len({k for tasks in dynamic.client_tasks for k in tasks}) >= 8
    modalities = {int(m) for c in dynamic.clients for m in c.train_x[:, 1].unique()}
    assert modalities == {MODALITY_CODES["image"], MODALITY_CODES["imu"]}
    for i, j in itertools.combinations(range(10), 2):
        shared = len(set(dynamic.client_tasks[i]) & set(dynamic.client_tasks[j]))
        if j == i + 5:  # partners: both halves of the client list, both parities (both trunk sizes either way)
            assert shared == 2 and i < 5 <= j and i % 2 != j % 2
            assert dynamic.client_groups[i] == dynamic.client_groups[j]
        else:
            assert shared <= 1 and dynamic.client_groups[i] != dynamic.client_groups[j]
    sources = {dynamic.task_sources[k] for tasks in dynamic.client_tasks for k in tasks}
    assert sources == set(SOURCES)


def test_overlap_is_symmetric_and_highest_for_partners(dynamic: FederatedData) -> None:
    overlap = ts.task_overlap(dynamic)
    np.testing.assert_array_equal(overlap, overlap.T)
    # clients 0 and 5 share digits and activities, and MNIST, Animal-MNIST and HAPT as sources
    assert overlap[0, 5] == 2 + 0.5 * 3
    for i in range(10):
        partner = (i + 5) % 10
        others = [overlap[i, j] for j in range(10) if j not in (i, partner)]
        assert overlap[i, partner] > max(others) and overlap[i, partner] > 0


# --- rounds


def test_dynamic_stream_meets_a_task_every_R_rounds(dynamic: FederatedData) -> None:
    for cid in range(10):
        tasks = dynamic.client_tasks[cid]
        full = dynamic.clients[cid]
        first = dynamic.client_at(cid, 1)
        assert torch.equal(dynamic.client_at(cid, 0).train_x, first.train_x)  # initialisation sees round 1
        assert first.train_y.numel() == math.ceil(SAMPLES / R) and row_tasks(first.train_x) == [tasks[0]]
        previous = first.train_x
        for r in range(1, 4 * R + 3):
            now = dynamic.client_at(cid, r)
            seen = tasks[: min(4, (r - 1) // R + 1)]
            assert dynamic.tasks_seen is not None and dynamic.tasks_seen(cid, r) == seen
            assert row_tasks(now.train_x) == sorted(seen) and row_tasks(now.val_x) == sorted(seen)
            assert now.val_y.numel() == VAL * len(seen)
            assert torch.equal(now.train_x[: previous.shape[0]], previous)  # the replay store keeps every row
            assert torch.equal(now.test_x, full.test_x) and torch.equal(now.test_y, full.test_y)
            previous = now.train_x
        assert torch.equal(previous, full.train_x)  # after the last slice: everything


def test_slice_training_data_is_each_rounds_new_rows_only(dynamic: FederatedData) -> None:
    """data.task_local_data = "slice": round r trains on exactly the rows the replay store gained at r (round 0 as
    round 1; past the last step, the last step's rows), so the slices tile the store; validation and test as with
    the replay store."""
    sliced = build_federated_data(stream_config(task_local_data="slice"), seed=0)
    for cid in range(10):
        pieces = []
        for r in range(0, 4 * R + 2):
            now, store = sliced.client_at(cid, r), dynamic.client_at(cid, r)
            before = dynamic.client_at(cid, r - 1).train_y.numel() if 1 < r <= 4 * R else None
            if before is not None:
                assert torch.equal(now.train_x, store.train_x[before:])
            if 1 <= r <= 4 * R:
                pieces.append(now.train_x)
            assert torch.equal(now.val_x, store.val_x) and torch.equal(now.test_x, store.test_x)
        assert torch.equal(torch.cat(pieces), dynamic.clients[cid].train_x)
        assert torch.equal(sliced.client_at(cid, 0).train_x, pieces[0])
        assert torch.equal(sliced.client_at(cid, 4 * R + 1).train_x, pieces[-1])


def test_static_stream_mixes_all_tasks_from_the_start(static: FederatedData) -> None:
    assert static.tasks_seen is not None
    for cid in range(10):
        tasks = static.client_tasks[cid]
        full = static.clients[cid]
        sizes = []
        for r in range(1, 4 * R + 1):
            now = static.client_at(cid, r)
            assert static.tasks_seen(cid, r) == tasks and static.tasks_seen(cid, 0) == tasks
            assert len(row_tasks(now.train_x)) >= 2 and torch.equal(now.val_x, full.val_x)
            sizes.append(now.train_y.numel())
        assert sizes[-1] == 4 * SAMPLES  # 4R slices of equal size (up to one row)
        assert set(np.diff([0, *sizes]).tolist()) <= {SAMPLES // R, math.ceil(SAMPLES / R)}
        assert row_tasks(full.train_x) == sorted(tasks)
        # the pooled rows are shuffled: not grouped task by task as in the dynamic regime
        order = full.train_x[:, 0].long()
        assert (order[1:] != order[:-1]).sum() > 3


def test_schedule_returns_views_of_the_stored_tensors(dynamic: FederatedData) -> None:
    for cid in range(10):
        full = dynamic.clients[cid]
        for r in (1, R + 1, 4 * R):
            now = dynamic.client_at(cid, r)
            for split in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
                view, stored = getattr(now, split), getattr(full, split)
                assert view.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()
                assert view.storage_offset() == stored.storage_offset()


def test_test_split_holds_equal_counts_per_task(dynamic: FederatedData, static: FederatedData) -> None:
    for data in (dynamic, static):
        for tasks, client in zip(data.client_tasks, data.clients, strict=True):
            counts = torch.bincount(client.test_x[:, 0].long(), minlength=len(ts.TASKS))
            assert {k: int(counts[k]) for k in tasks} == dict.fromkeys(tasks, TEST) and counts.sum() == 4 * TEST


def test_seeds_decide_the_rows_and_the_data_pickle_with_their_schedule(dynamic: FederatedData) -> None:
    again = build_federated_data(stream_config(), seed=0)
    other = build_federated_data(stream_config(), seed=1)
    for a, b, c in zip(dynamic.clients, again.clients, other.clients, strict=True):
        for split in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            assert torch.equal(getattr(a, split), getattr(b, split))
        assert not torch.equal(a.test_x, c.test_x) and not torch.equal(a.train_x, c.train_x)
    shipped = pickle.loads(pickle.dumps(dynamic))  # worker processes receive the data with their schedule
    assert shipped.tasks_seen is not None and shipped.tasks_seen(3, R + 1) == dynamic.client_tasks[3][:2]
    assert torch.equal(shipped.client_at(3, R + 1).train_x, dynamic.client_at(3, R + 1).train_x)


def test_bad_stream_configs_fail_in_one_line() -> None:
    for keys, message in (
        ({"num_clients": 20}, "data.num_clients = 10"),
        ({"unseen_clients": 1}, "data.unseen_clients = 0"),
        ({"har_keep_transitions": True}, "har_keep_transitions"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_federated_data(stream_config(**keys), seed=0)
    for key, value in (("rounds_per_task", 0), ("samples_per_task", 0), ("task_test_ratio", 0.0)):
        with pytest.raises(ConfigError, match=rf"data\.{key}"):
            from_dict({"data": {"dataset": "task_stream", "num_clients": 10, key: value}})
    with pytest.raises(ConfigError, match=r"data\.task_regime"):
        from_dict({"data": {"task_regime": "continual"}})


# --- the engine


def test_a_run_trains_each_round_on_its_replay_store() -> None:
    """Local SGD over each round's store: round 1 trains on task 0 (SAMPLES rows), round 2 on tasks 0 and 1."""
    from fedpal.api import run

    batch = 4
    config = {
        "seed": 0,
        "data": {"dataset": "task_stream", "num_clients": 10, "samples_per_task": 8, "rounds_per_task": 1},
        "model": {"name": "mlp", "hidden_dim": 16, "feature_dim": 8},
        "train": {"rounds": 2, "batch_size": batch, "lr": 0.05, "threads": 1},
        "eval": {"generalization_samples": 100},
        "run": {"progress": False},
        "algorithm": {"name": "local"},
    }
    result = run(config)
    steps_per_client = [math.ceil(8 / batch), math.ceil(16 / batch)]
    assert [m["local_steps"] for m in result.metrics] == list(itertools.accumulate(10 * s for s in steps_per_client))
    data = build_federated_data(from_dict(config).data, 0)
    assert result.metrics[-1]["tasks_seen"] == [tasks[:2] for tasks in data.client_tasks]
    assert 0 <= result.personalized_accuracy <= 1
