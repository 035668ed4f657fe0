"""Byte accounting and reply checks on Payloads/Replies (plain dicts of tensors and numbers)."""

from __future__ import annotations

import pytest
import torch

from fedpal.engine.messages import NUMBER_BYTES, message_bytes, reply_problem, value_bytes


def test_message_bytes_by_key_on_known_tensors() -> None:
    message = {
        "w": torch.zeros(3, 4),  # float32: 12 * 4
        "idx": torch.arange(5),  # int64: 5 * 8
        "half": torch.zeros(2, dtype=torch.float16),  # 2 * 2
        "n": 7,  # a number travels as 8 bytes
        "lr": 0.5,
        "flag": True,
        "params": {"a": torch.zeros(10), "b": torch.zeros(2, 2, dtype=torch.float64)},  # 40 + 32
        "scalar": torch.tensor(1.0),  # 0-d float32: 4
    }
    assert message_bytes(message) == {
        "w": 48,
        "idx": 40,
        "half": 4,
        "n": 8,
        "lr": 8,
        "flag": 8,
        "params": 72,
        "scalar": 4,
    }
    assert NUMBER_BYTES == 8
    assert message_bytes({}) == {}


def test_value_bytes_rejects_non_message_values() -> None:
    for bad in ("text", [1.0, 2.0], None, {"a": "text"}):
        with pytest.raises(TypeError):
            value_bytes(bad)


def test_reply_problem_accepts_a_good_reply() -> None:
    expected = {"params": {"a": torch.Size([2, 3]), "b": torch.Size([3])}}
    reply = {"params": {"a": torch.ones(2, 3), "b": torch.ones(3)}, "num_samples": 12}
    assert reply_problem(reply, expected) is None
    # integer tensors are not checked for finiteness (and cannot hold NaN)
    assert reply_problem({"counts": torch.tensor([1, 2, 3])}, {}) is None


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        ({"params": {"a": torch.full((2, 3), float("nan")), "b": torch.ones(3)}}, "NaN or Inf"),
        ({"params": {"a": torch.ones(2, 3), "b": torch.tensor([1.0, float("inf"), 0.0])}}, "NaN or Inf"),
        ({"params": {"a": torch.ones(3, 2), "b": torch.ones(3)}}, "shape (3, 2), expected (2, 3)"),
        ({"params": {"a": torch.ones(2, 3)}}, "missing"),
        ({"params": {"a": torch.ones(2, 3), "b": torch.ones(3), "c": torch.ones(1)}}, "unexpected"),
        ({"params": {"a": torch.ones(2, 3), "b": [1.0, 2.0, 3.0]}}, "should be a tensor"),
        ({"params": torch.ones(3)}, "should be a parameter set"),
        ({"num_samples": 3}, "missing 'params'"),
    ],
)
def test_reply_problem_rejects_bad_params(reply: dict, fragment: str) -> None:
    expected = {"params": {"a": torch.Size([2, 3]), "b": torch.Size([3])}}
    problem = reply_problem(reply, expected)
    assert problem is not None
    assert fragment in problem


def test_reply_problem_checks_keys_without_expected_shapes() -> None:
    assert "NaN or Inf" in reply_problem({"loss": float("nan")}, {})
    assert "NaN or Inf" in reply_problem({"proto": {"c0": torch.tensor([float("-inf")])}}, {})
    assert "must be tensors" in reply_problem({"note": "hello"}, {})


def test_reply_without_declared_number_is_rejected():
    import torch

    from fedpal.engine.messages import reply_problem

    expected = {"params": {"w": torch.Size([2])}, "num_samples": int}
    assert reply_problem({"params": {"w": torch.zeros(2)}}, expected) == "missing 'num_samples'"
    assert "number" in reply_problem({"params": {"w": torch.zeros(2)}, "num_samples": torch.ones(1)}, expected)
    assert reply_problem({"params": {"w": torch.zeros(2)}, "num_samples": 5}, expected) is None


def test_finiteness_check_is_exact_for_huge_but_finite_values():
    import torch

    from fedpal.engine.messages import reply_problem

    huge = torch.full((1000,), 3.0e38)  # a float32 sum would overflow to inf; the check must not reject it
    assert reply_problem({"w": huge}, {}) is None
    assert reply_problem({"w": torch.tensor([float("inf"), float("-inf")])}, {}) is not None
    assert reply_problem({"p": {"a": torch.ones(3), "b": torch.tensor([0.0, float("nan")])}}, {}) is not None
    assert reply_problem({"w": torch.tensor([1e308, 1e308], dtype=torch.float64)}, {}) is None
