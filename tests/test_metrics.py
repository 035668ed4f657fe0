"""Metric arithmetic and the evaluation protocol (DESIGN §5) on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedpal.algorithms.core.contract import Algorithm, ClientView
from fedpal.algorithms.core.training import LocalTrainer, TrainSettings
from fedpal.config import EvalConfig
from fedpal.data.client_data import FederatedData
from fedpal.evaluation.evaluator import Evaluator
from fedpal.evaluation.metrics import macro_f1, summarize_clients, worst_fraction_mean

# --------------------------------------------------------------------------------------------- macro-F1


def test_macro_f1_hand_case_with_class_only_in_predictions() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 3])
    # class 0: tp 1, support 2, predicted 1 -> F1 = 2*1/(2+1) = 2/3
    # class 1: tp 2, support 2, predicted 3 -> F1 = 4/5
    # class 2: tp 0, support 1, predicted 0 -> 0
    # class 3: only predicted (support 0, predicted 1) -> 0, and it counts as a class
    # class 4: absent from both -> not averaged
    expected = (2 / 3 + 4 / 5 + 0 + 0) / 4
    assert macro_f1(preds, labels, num_classes=5) == pytest.approx(expected, abs=1e-12)
    assert macro_f1(preds, labels, num_classes=4) == pytest.approx(expected, abs=1e-12)


def test_macro_f1_perfect_all_wrong_and_empty() -> None:
    y = np.array([0, 1, 2, 2])
    assert macro_f1(y, y, 3) == pytest.approx(1.0)
    assert macro_f1(np.array([1, 2, 0, 0]), y, 3) == pytest.approx(0.0)
    assert math.isnan(macro_f1(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 3))


def test_macro_f1_is_not_accuracy_under_imbalance() -> None:
    labels = np.array([0] * 9 + [1])
    preds = np.zeros(10, dtype=np.int64)  # accuracy 0.9
    # class 0: 2*9/(9+10) = 18/19; class 1: 0
    assert macro_f1(preds, labels, 2) == pytest.approx((18 / 19) / 2)


# --------------------------------------------------------------------------------------------- client summaries


def test_worst_fraction_mean_uses_ceil_of_ten_percent() -> None:
    assert worst_fraction_mean(np.arange(10, dtype=float)) == 0.0  # ceil(1.0) = 1 value
    assert worst_fraction_mean(np.arange(11, dtype=float)) == pytest.approx(0.5)  # ceil(1.1) = 2 values: 0, 1
    assert worst_fraction_mean(np.array([0.9, 0.3, 0.7])) == pytest.approx(0.3)  # at least one value
    assert worst_fraction_mean(np.arange(20, dtype=float)[::-1], fraction=0.25) == pytest.approx(2.0)  # 0..4
    assert math.isnan(worst_fraction_mean(np.array([])))


def test_summarize_clients_weighted_unweighted_std_worst() -> None:
    correct = np.array([1.0, 8.0, 9.0])
    total = np.array([2.0, 10.0, 10.0])
    s = summarize_clients(correct, total)
    per = [0.5, 0.8, 0.9]
    mean = sum(per) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in per) / 3)  # population std (ddof = 0)
    assert s["accuracy"] == pytest.approx(18 / 22)  # sum correct / sum samples
    assert s["accuracy_unweighted"] == pytest.approx(mean)
    assert s["accuracy_std"] == pytest.approx(std)
    assert s["accuracy_worst10"] == pytest.approx(0.5)


def test_summarize_clients_skips_empty_clients_and_worst10_of_eleven() -> None:
    per = [0.1, 0.2] + [1.0] * 9  # 11 clients -> worst 10% = lowest 2
    correct = np.array([a * 10 for a in per] + [0.0])
    total = np.array([10.0] * 11 + [0.0])  # a 12th client with no test data
    s = summarize_clients(correct, total)
    assert s["accuracy_worst10"] == pytest.approx(0.15)
    assert s["accuracy_unweighted"] == pytest.approx(sum(per) / 11)
    assert s["accuracy"] == pytest.approx(sum(per) * 10 / 110)


# --------------------------------------------------------------------------------------------- evaluator

C = 3
BIG = 10.0
LSE = math.log(math.exp(BIG) + 2)  # log-sum-exp of the logits [BIG, 0, 0]


def constant(k: int) -> dict[str, torch.Tensor]:
    """Linear-layer tensors that predict class k whatever the input."""
    return {"weight": torch.zeros(C, C), "bias": BIG * torch.eye(C)[k]}


def oracle() -> dict[str, torch.Tensor]:
    """Linear-layer tensors that predict the one-hot code of the input."""
    return {"weight": torch.eye(C), "bias": torch.zeros(C)}


class FakeAlgorithm(Algorithm):
    """Client i predicts class i; optionally a shared (global) model."""

    name = "fake"

    def __init__(self, shared: dict | None = None, is_global: bool = False, global_model: dict | None = None):
        super().__init__(None, None)  # type: ignore[arg-type]
        self.shared = shared
        self.personalized_is_global = is_global  # type: ignore[misc]
        self.global_model = global_model

    def init_server(self):
        return {}

    def configure(self, state, round, client_ids):
        return {}

    def aggregate(self, state, round, replies, reduce):
        return state

    def local_update(self, client, state, payload):
        return state, {}

    def personalized_params(self, client, state, payload):
        return self.shared if self.shared is not None else constant(client.id % C)

    def global_params(self, server):
        return self.global_model


def evaluate(data: FederatedData, algorithm: Algorithm, **eval_options) -> dict:
    trainer = LocalTrainer(nn.Linear(C, C), TrainSettings())

    def view(cid: int) -> ClientView:
        c = data.clients[cid]
        return ClientView(cid, 0, 0, c.train_x, c.train_y, c.val_x, c.val_y, trainer)

    cfg = EvalConfig(generalization_samples=1000, **eval_options)
    evaluator = Evaluator(data, cfg, seed=0)
    ids = range(data.num_clients)
    return evaluator.evaluate(algorithm, {}, {cid: {} for cid in ids}, {cid: {} for cid in ids}, view)


def test_evaluator_personalized_models_known_exactly(hand_data) -> None:
    r = evaluate(hand_data, FakeAlgorithm(global_model=oracle()))
    p = r["personalized"]
    # client 0 predicts 0 on [0,0,1,2]: 2/4; client 1 predicts 1 on [1,1,1,0]: 3/4; client 2 predicts 2 on
    # [2,2,0,1,1]: 2/5
    per = [0.5, 0.75, 0.4]
    assert p["per_client_accuracy"] == pytest.approx(per)
    assert p["per_client_samples"] == [4, 4, 5]
    assert p["accuracy"] == pytest.approx(7 / 13)
    assert p["accuracy_unweighted"] == pytest.approx(sum(per) / 3)
    assert p["accuracy_std"] == pytest.approx(float(np.std(per)))
    assert p["accuracy_worst10"] == pytest.approx(0.4)
    # per-client macro-F1, averaged: client 0 {0: 2/3, 1: 0, 2: 0}; client 1 {1: 6/7, 0: 0}; client 2 {2: 4/7, 0, 1}
    assert p["macro_f1"] == pytest.approx((2 / 9 + 3 / 7 + 4 / 21) / 3)
    # test loss: 7 hits cost LSE - BIG, 6 misses cost LSE
    assert p["loss"] == pytest.approx((7 * (LSE - BIG) + 6 * LSE) / 13, rel=1e-6)
    # validation: hits are 0@c0, 1@c1, 2@c2 twice -> 4 of 6
    assert r["validation"]["accuracy"] == pytest.approx(4 / 6)
    assert r["validation"]["loss"] == pytest.approx((4 * (LSE - BIG) + 2 * LSE) / 6, rel=1e-6)
    # the global model reads the code: right on 12 of the 13 pooled test samples
    assert r["global"]["accuracy"] == pytest.approx(12 / 13)


def test_evaluator_generalization_excluding_own_data(hand_data) -> None:
    g = evaluate(hand_data, FakeAlgorithm())["generalization"]
    # client 0 (predicts 0) on clients 1+2: [1,1,1,0,2,2,0,1,1] -> 2/9
    # client 1 (predicts 1) on clients 0+2: [0,0,1,2,2,2,0,1,1] -> 3/9
    # client 2 (predicts 2) on clients 0+1: [0,0,1,2,1,1,1,0]   -> 1/8
    accs = [2 / 9, 3 / 9, 1 / 8]
    assert g["accuracy"] == pytest.approx(sum(accs) / 3)
    assert g["accuracy_std"] == pytest.approx(float(np.std(accs)))
    assert g["include_own"] is False
    assert g["samples"] == 13
    # macro-F1 of client 0: only class 0 has a hit (tp 2, support 2, predicted 9 -> 4/11), 3 classes present
    f1_c0 = (4 / 11) / 3
    # client 1 on [0,0,1,2,2,2,0,1,1]: class 1 tp 3, support 3, predicted 9 -> 6/12
    f1_c1 = (6 / 12) / 3
    # client 2 on [0,0,1,2,1,1,1,0]: class 2 tp 1, support 1, predicted 8 -> 2/9
    f1_c2 = (2 / 9) / 3
    assert g["macro_f1"] == pytest.approx((f1_c0 + f1_c1 + f1_c2) / 3)
    assert "global" not in evaluate(hand_data, FakeAlgorithm())  # no global model, no global section


def test_evaluator_generalization_including_own_data(hand_data) -> None:
    g = evaluate(hand_data, FakeAlgorithm(), generalization_include_own=True)["generalization"]
    # pooled test labels: four 0s, six 1s, three 2s (13 samples)
    assert g["accuracy"] == pytest.approx((4 / 13 + 6 / 13 + 3 / 13) / 3)
    assert g["include_own"] is True


@pytest.mark.parametrize("is_global", [True, False])
def test_evaluator_shared_model_same_numbers_either_path(hand_data, is_global: bool) -> None:
    """A model shared by all clients is run once on pooled data; the per-client path must agree exactly."""
    r = evaluate(hand_data, FakeAlgorithm(shared=oracle(), is_global=is_global, global_model=oracle()))
    p, g = r["personalized"], r["generalization"]
    assert p["per_client_accuracy"] == pytest.approx([1.0, 1.0, 0.8])
    assert p["accuracy"] == pytest.approx(12 / 13)
    # excluding own data: clients 0 and 1 see the one wrong-coded sample among 9 others; client 2 sees none
    assert g["accuracy"] == pytest.approx((8 / 9 + 8 / 9 + 1.0) / 3)
    assert r["global"]["accuracy"] == pytest.approx(12 / 13)
    # pooled test: labels [0,0,1,2,1,1,1,0,2,2,0,1,1], preds equal except one 2 predicted as 0
    # class 0: tp 4, support 4, predicted 5 -> 8/9; class 1: 1; class 2: tp 2, support 3, predicted 2 -> 4/5
    assert r["global"]["macro_f1"] == pytest.approx((8 / 9 + 1 + 4 / 5) / 3)
    assert r["validation"]["accuracy"] == pytest.approx(1.0)


def test_generalization_sample_is_fixed_stratified_and_sized(tiny) -> None:
    from fedpal.config import from_dict
    from fedpal.data.federated import build_federated_data

    cfg = from_dict(tiny())
    data = build_federated_data(cfg.data, cfg.seed)
    a = Evaluator(data, EvalConfig(generalization_samples=100), seed=0)
    b = Evaluator(data, EvalConfig(generalization_samples=100), seed=0)
    c = Evaluator(data, EvalConfig(generalization_samples=100), seed=1)
    assert a.gen_index.numel() == 100
    assert torch.equal(a.gen_index, b.gen_index)
    assert not torch.equal(a.gen_index, c.gen_index)
    pooled = np.bincount(a.test_y.numpy(), minlength=10) / a.test_y.numel()
    sampled = np.bincount(a.gen_y, minlength=10) / 100
    assert np.abs(pooled - sampled).max() <= 0.011  # class proportions kept to within one sample


def test_task_breakdown_scores_each_task_on_its_own_samples() -> None:
    """Accuracy per (client, task) counts only the task's samples; a task absent from a split is NaN (None in the
    summary), so Self and Others can average tasks, each counting once."""
    from fedpal.evaluation.task_breakdown import TaskBreakdown

    label_tasks = [0, 0, 1, 1, 1, 2]  # classes 0-1: task 0, 2-4: task 1, 5: task 2
    sample_labels = np.array([0, 1, 2, 3, 5, 5])
    breakdown = TaskBreakdown(label_tasks, num_clients=2, sample_labels=sample_labels)
    labels = np.array([0, 1, 1, 2, 4])  # client 0's own test: task 0 x3, task 1 x2
    breakdown.record_own(0, np.array([0, 0, 1, 2, 3]), labels)
    breakdown.record_sample(1, np.array([0, 0, 2, 2, 5, 4]), sample_labels)
    summary = breakdown.summary()
    assert summary["own"][0] == [pytest.approx(2 / 3), 0.5, None]
    assert summary["own"][1] == [None, None, None]  # not scored
    assert summary["sample"][1] == [0.5, 0.5, 0.5]
