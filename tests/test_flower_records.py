"""Exact conversion of messages and client states to Flower records (fedpal.flower.records): every kind of value a
method may hold, every registered method's real payloads, replies and states, all through Flower's own wire
serialization; unsupported values named by path; bytes as fedpal counts them."""

from __future__ import annotations

import math
import struct
from typing import Any, Literal

import pytest

pytest.importorskip("flwr")

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from tests.test_conformance import CASES, RecordingExecutor, case

from fedpal.engine.messages import message_bytes
from fedpal.engine.simulator import Simulator
from fedpal.flower.records import from_records, record_bytes, to_records

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,  # numpy lacks it too: travels as its bits
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that NaN payloads and -0.0 compare too (torch.equal says NaN != NaN)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_identical(got: Any, want: Any, path: str = "value") -> None:
    """Same types all the way down (int stays int, tuple stays tuple), dict keys in the same order and of the same
    types, tensors with the same dtype, shape, requires_grad and bytes, floats with the same bits."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} vs {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape, got.requires_grad) == (want.dtype, want.shape, want.requires_grad), path
        assert got.device.type == "cpu", path
        assert torch.equal(bits(got), bits(want).cpu()), path
    elif isinstance(want, dict):
        assert [(type(k), k) for k in got] == [(type(k), k) for k in want], f"{path}: keys"
        for key in want:
            assert_identical(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{path}: length"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_identical(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want), f"{path}: {got!r} vs {want!r}"
    else:
        assert got == want, path


def over_the_wire(records: dict[str, Any]) -> RecordDict:
    """The records as a ClientApp receives them: in a Message, cut into Flower's objects (``get_all_nested_objects``),
    each deflated to bytes as the Grid pushes them, then inflated from those bytes as the receiver pulls them."""
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=1,
        dst_node_id=2,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    # metadata given directly, as Flower's serde rebuilds a message (the public constructor needs a running app)
    message = Message(content=RecordDict(records), metadata=metadata)  # type: ignore[call-overload]
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    received = inflate_object_from_contents(message.object_id, contents)
    assert isinstance(received, Message)
    return received.content


def through_node_state(records: dict[str, Any]) -> RecordDict:
    """The records as client state kept in ``context.state``: Flower moves a Context as its protobuf's bytes."""
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(records), run_config={})
    proto = ProtoContext.FromString(context_to_proto(context).SerializeToString())
    return context_from_proto(proto).state


def every_kind() -> dict[Any, Any]:
    """One value of every supported kind, with the edge cases the conversion must keep."""
    grad = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    wide = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "tensors": {str(dtype).removeprefix("torch."): torch.arange(6).reshape(2, 3).to(dtype) for dtype in DTYPES},
        "edge_tensors": {
            "scalar": torch.tensor(-0.0),  # 0-d
            "empty": torch.zeros(0, 3, dtype=torch.float64),
            "empty_bf16": torch.zeros(0, dtype=torch.bfloat16),
            "transposed": wide.t(),  # non-contiguous
            "strided": wide[::2, 1::3],
            "special": torch.tensor([math.nan, math.inf, -math.inf, -0.0, 5e-324], dtype=torch.float64),
            "bf16_special": torch.tensor([math.nan, -math.inf, -0.0, 1e-40], dtype=torch.bfloat16),
            "requires_grad": grad,
            "from_graph": grad * 2,  # has a grad_fn: converts detached, requires_grad kept
            "bool_0d": torch.tensor(True),
        },
        # dict keys: int and str side by side (1 and "1" may not collide), in an order that is not sorted
        "optimizer": {"state": {3: {"step": torch.tensor(2.0)}, 0: {"step": torch.tensor(1.0)}}, 1: "one", "1": 1},
        "ints": [0, -1, 7, 2**63 - 1, -(2**63)],
        "floats": [1.0, 0.0, -0.0, math.nan, math.inf, -math.inf, 5e-324, 1e308, 0.1],
        "bools": (True, False),
        "strings": ["", "adam", "ünïcode ✓", '{"kind": "dict"}', "a/b"],
        "none": None,
        "empties": {"dict": {}, "list": [], "tuple": ()},
        "nested": [(1, [2.5, None]), {"x": (torch.ones(1),)}],
        "a/b": 1,  # a key that looks like a path: its record name must not take another leaf's entry
        "a": {"b": 2},
    }


def test_every_kind_of_value_round_trips_field_by_field() -> None:
    value = every_kind()
    records = to_records(value)
    assert set(records) == {"arrays", "numbers", "layout"}
    arrays, numbers = records["arrays"], records["numbers"]
    assert isinstance(arrays, ArrayRecord) and isinstance(numbers, ConfigRecord)
    assert isinstance(records["layout"], ConfigRecord)
    # every tensor is one Flower Array in Flower's numpy format; every scalar one number entry, never an array
    assert len(arrays) == len(DTYPES) + 10 + 2 + 1
    assert all(isinstance(a, Array) and a.stype == "numpy.ndarray" for a in arrays.values())
    assert len(numbers) == 2 + 5 + 9 + 2 + 5 + 2 + 1 + 1
    assert all(type(v) in (int, float, bool, str) for v in numbers.values())
    assert_identical(from_records(records), value)


def test_values_come_back_as_writable_cpu_tensors_that_own_their_memory() -> None:
    records = over_the_wire(to_records({"w": torch.ones(3), "h": torch.ones(2, dtype=torch.bfloat16)}))
    first, second = from_records(records), from_records(records)
    for key in ("w", "h"):
        assert first[key].data_ptr() != second[key].data_ptr()
        first[key].add_(1)  # writable, and a change touches neither the records nor another decoding
        assert torch.equal(second[key], torch.ones_like(second[key]))
        assert torch.equal(from_records(records)[key], torch.ones_like(second[key]))


def test_a_parameter_comes_back_as_a_plain_tensor_that_requires_grad() -> None:
    got = from_records(to_records({"p": torch.nn.Parameter(torch.ones(2))}))["p"]
    assert type(got) is torch.Tensor and got.requires_grad and torch.equal(got, torch.ones(2))


def test_a_root_that_is_not_a_dict_round_trips() -> None:
    for value in (torch.arange(3), 5, 2.5, None, "s", [1, torch.zeros(())], ()):
        assert_identical(from_records(to_records(value)), value)


def test_several_values_side_by_side_in_one_record_dict_through_flower() -> None:
    payload = {"params": {"w": torch.randn(3, 2), "b": torch.zeros(2)}, "round": 2, "lr": 0.1}
    state = every_kind()
    reply = {"params": {"w": torch.randn(3, 2)}, "num_samples": 17, "loss": 0.25, "converged": True}
    content = {**to_records(payload, "t0."), **to_records(state, "t1."), **to_records(reply, "r0.", numbers="metric")}
    assert isinstance(content["r0.numbers"], MetricRecord)  # a reply's numbers are metrics, as Flower expects
    for received in (over_the_wire(content), through_node_state(content)):
        assert_identical(from_records(received, "t0."), payload)
        assert_identical(from_records(received, "t1."), state)
        assert_identical(from_records(received, "r0."), reply)  # True comes back a bool, 17 an int


def test_records_that_do_not_match_their_layout_are_refused() -> None:
    records = to_records({"w": torch.ones(2), "n": 1})
    extra = {**records, "numbers": ConfigRecord({"n": 1, "stray": 2})}
    with pytest.raises(ValueError, match="stray"):
        from_records(extra)
    missing = {**records, "arrays": ArrayRecord()}
    with pytest.raises(ValueError, match="'w'"):
        from_records(missing)
    retyped = {**records, "numbers": ConfigRecord({"n": 1.0})}
    with pytest.raises(ValueError, match="float"):
        from_records(retyped)


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "path", "type_name"),
    [
        ({"a": [1, {"b": Opaque()}]}, r"value\['a'\]\[1\]\['b'\]", "Opaque"),
        ({"x": {1, 2}}, r"value\['x'\]", "set"),
        ({"x": torch.zeros(2).numpy()}, r"value\['x'\]", "ndarray"),
        ({"lr": np.float64(0.5)}, r"value\['lr'\]", "float64"),  # a float subclass would come back a float
        ({"p": {2.5: torch.ones(1)}}, r"value\['p'\]", "float"),
        ({"p": {True: 1}}, r"value\['p'\]", "bool"),
        ({"s": torch.ones(2).to_sparse()}, r"value\['s'\]", "sparse"),
        ([b"raw"], r"value\[0\]", "bytes"),
    ],
)
def test_an_unsupported_value_is_a_type_error_naming_its_path(value: Any, path: str, type_name: str) -> None:
    with pytest.raises(TypeError, match=f"{path}.*{type_name}"):
        to_records(value)


def test_values_records_cannot_carry_exactly_are_refused() -> None:
    with pytest.raises(TypeError, match=r"value\['name'\].*MetricRecord"):
        to_records({"name": "adam"}, numbers="metric")
    with pytest.raises(ValueError, match=r"value\['n'\].*64 bits"):
        to_records({"n": 2**63})
    loop: list[Any] = [1]
    loop.append({"again": loop})
    with pytest.raises(ValueError, match=r"value\[1\]\['again'\].*contains itself"):
        to_records(loop)


def test_record_bytes_counts_tensor_data_and_eight_bytes_per_number() -> None:
    value = {
        "w": torch.zeros(2, 3),  # 24 bytes
        "h": torch.zeros(4, dtype=torch.bfloat16),  # 8
        "mask": torch.zeros(5, dtype=torch.bool),  # 5
        "z": torch.zeros(0, 7),  # 0
        "n": 5,
        "flag": True,
        "loss": 0.5,  # 3 numbers: 24
    }
    assert record_bytes(to_records(value)) == 24 + 8 + 5 + 0 + 24
    assert record_bytes(to_records(value, "r.", numbers="metric"), "r.") == 24 + 8 + 5 + 0 + 24


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_tensor_converts_from_its_cpu_copy() -> None:
    value = {
        "w": torch.randn(3, 2, device="cuda").to(torch.bfloat16),
        "g": torch.ones(2, device="cuda").requires_grad_(),
    }
    got = from_records(over_the_wire(to_records(value)))
    assert_identical(got, {k: v.cpu() for k, v in value.items()})


def messages_of_a_tiny_run(name: str) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Round 1 and 2 of the conformance suite's tiny run of ``name``: initial client states, payloads, replies,
    client states after a local update, and the evaluation payloads after round 2."""
    cfg, data = case(name)
    sim = Simulator(cfg, data, progress=False)
    recorder = RecordingExecutor(sim.assembly)
    sim.executor = recorder
    sim.initialize()
    for round in (1, 2):
        sim.run_round(round)
    ids = list(range(data.num_clients))
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {"payload": [], "reply": [], "state": []}
    for task, result in recorder.log:
        where = f"{task.op} round {task.round} client {task.client}"
        found["state"].append((f"{where}: state after", result.state))
        if task.op == "fit":
            assert task.payload is not None and result.reply is not None
            found["payload"].append((f"{where}: payload", task.payload))
            found["reply"].append((f"{where}: reply", result.reply))
    evaluation = sim.algorithm.configure_evaluation(sim.server, 2, ids)
    found["payload"] += [(f"evaluation client {cid}: payload", evaluation[cid]) for cid in ids]
    assert {t.op for t, _ in recorder.log} == {"init", "fit"}
    assert {t.round for t, _ in recorder.log if t.op == "fit"} == {1, 2}
    return found


@pytest.mark.parametrize("name", CASES)
def test_every_method_s_messages_and_states_round_trip_through_flower(name: str) -> None:
    found = messages_of_a_tiny_run(name)
    kinds: dict[str, Literal["config", "metric"]] = {"payload": "config", "reply": "metric", "state": "config"}
    for kind, values in found.items():
        numbers = kinds[kind]
        for i, (label, value) in enumerate(values):
            prefix = f"v{i}."
            received = over_the_wire(to_records(value, prefix, numbers=numbers))
            try:
                assert_identical(from_records(received, prefix), value)
            except AssertionError as exc:
                raise AssertionError(f"{name}, {label}: {exc}") from exc
            if kind != "state":  # what the engine counts travels, byte for byte
                assert record_bytes(received, prefix) == sum(message_bytes(value).values()), f"{name}, {label}"
