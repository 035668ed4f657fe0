"""Training clients together (``fit_together``) against training them one by one with ``LocalTrainer.fit``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedpal.algorithms.core.batched_training import FitRequest, fit_together, module_is_batchable
from fedpal.algorithms.core.training import LocalTrainer, TrainSettings


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def clients(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes]


@pytest.mark.parametrize(
    "settings",
    [
        TrainSettings(epochs=2, batch_size=4, lr=0.1),
        TrainSettings(epochs=2, batch_size=4, lr=0.1, momentum=0.9, weight_decay=0.01),
        TrainSettings(epochs=2, batch_size=4, lr=0.01, optimizer="adam", weight_decay=0.001),
    ],
    ids=["sgd", "sgd-momentum-decay", "adam"],
)
@pytest.mark.parametrize("drop_last", [False, True])
def test_together_equals_one_by_one(settings: TrainSettings, drop_last: bool) -> None:
    """Different sizes (so different step counts and partial last batches) and different starting points."""
    trainer = LocalTrainer(model(), settings)
    start = trainer.snapshot()
    data = clients([9, 4, 13, 1])
    starts = [{k: v + 0.01 * i for k, v in start.items()} for i in range(len(data))]
    one_by_one = [
        trainer.fit(p, x, y, torch.Generator().manual_seed(10 + i), drop_last=drop_last)
        for i, (p, (x, y)) in enumerate(zip(starts, data, strict=True))
    ]
    requests = [
        FitRequest(p, x, y, torch.Generator().manual_seed(10 + i), drop_last=drop_last)
        for i, (p, (x, y)) in enumerate(zip(starts, data, strict=True))
    ]
    together = fit_together(trainer, requests)
    for single, joint in zip(one_by_one, together, strict=True):
        assert joint.steps == single.steps
        assert joint.mean_loss == pytest.approx(single.mean_loss, rel=1e-5)
        for name, value in single.params.items():
            assert torch.allclose(joint.params[name], value, atol=1e-6), name


def test_per_request_learning_rates_and_epochs_are_kept() -> None:
    settings = TrainSettings(epochs=1, batch_size=5, lr=0.1)
    trainer = LocalTrainer(model(), settings)
    start = trainer.snapshot()
    (x, y), (x2, y2) = clients([10, 7])
    single = trainer.fit(start, x, y, torch.Generator().manual_seed(3), lr=0.3, epochs=3)
    other = trainer.fit(start, x2, y2, torch.Generator().manual_seed(4), lr=0.3, epochs=3)
    requests = [
        FitRequest(start, x, y, torch.Generator().manual_seed(3), epochs=3, lr=0.3),
        FitRequest(start, x2, y2, torch.Generator().manual_seed(4), epochs=3, lr=0.3),
    ]
    joint, joint_other = fit_together(trainer, requests)
    assert joint.steps == single.steps == 6 and joint_other.steps == other.steps == 6
    assert all(torch.allclose(joint.params[k], single.params[k], atol=1e-6) for k in start)


def test_modules_with_buffers_or_dropout_are_not_batched() -> None:
    assert module_is_batchable(model())
    assert not module_is_batchable(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    assert not module_is_batchable(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def test_passes_with_an_extra_term_run_on_their_own_inside_the_batched_executor(monkeypatch) -> None:
    """FedProx's passes carry a proximal term: declared batchable anyway, each pass runs alone, exactly as
    sequentially."""
    from tests.conftest import tiny_config, without_wall

    from fedpal.algorithms.weight_sharing.fedprox import FedProx
    from fedpal.config import from_dict
    from fedpal.data.federated import build_federated_data
    from fedpal.engine.batched import BatchedExecutor
    from fedpal.engine.simulator import Simulator

    monkeypatch.setattr(FedProx, "batched_training", True)
    cfg = from_dict(tiny_config("fedprox", algorithm={"mu": 0.5}))
    data = build_federated_data(cfg.data, cfg.seed)
    sequential = Simulator(cfg, data, progress=False)
    sequential.run()
    batched = Simulator(cfg, data, progress=False)
    batched.executor = BatchedExecutor(batched.assembly)
    batched.run()
    assert without_wall(batched.history) == without_wall(sequential.history)
    assert all(torch.equal(batched.server["params"][k], v) for k, v in sequential.server["params"].items())


@pytest.mark.parametrize("shared_input", [True, False])
def test_eval_passes_together_equal_one_by_one(shared_input: bool) -> None:
    from fedpal.algorithms.core.batched_training import PredictRequest, predict_together
    from fedpal.models.registry import build_model

    torch.manual_seed(0)
    module = build_model("mlp", (1, 8, 8), 3, 5, 7, "linear", None)  # backbone -> feature 5 -> head
    trainer = LocalTrainer(module, TrainSettings())
    trainer.eval_batch_size = 8  # 3 clients: chunks of 2 rows, so chunking is exercised
    start = trainer.snapshot()
    params = [{k: v + 0.05 * i for k, v in start.items()} for i in range(3)]
    gen = torch.Generator().manual_seed(2)
    probe = torch.randn(11, 1, 8, 8, generator=gen)
    inputs = [probe] * 3 if shared_input else [torch.randn(n, 1, 8, 8, generator=gen) for n in (11, 0, 4)]
    logits = predict_together(trainer, [PredictRequest(p, x) for p, x in zip(params, inputs, strict=True)])
    pairs = predict_together(trainer, [PredictRequest(p, x, split=True) for p, x in zip(params, inputs, strict=True)])
    for p, x, lg, (f2, lg2) in zip(params, inputs, logits, pairs, strict=True):
        assert torch.allclose(lg, trainer.predict(p, x), atol=1e-6) and lg.shape == (x.shape[0], 3)
        f, lg_ref = trainer.features_and_logits(p, x)
        assert torch.allclose(f2, f, atol=1e-6) and torch.allclose(lg2, lg_ref, atol=1e-6)
