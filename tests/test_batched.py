"""Training clients together (``fit_together``) against training them one by one with ``LocalTrainer.fit``."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_config, without_wall
from torch import nn

from fedpal.algorithms.core.batched_training import FitRequest, fit_together, module_is_batchable, term_signature
from fedpal.algorithms.core.training import FunctionalTerm, LocalTrainer, TrainSettings


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
    assert not module_is_batchable(nn.Sequential(nn.Embedding(4, 2), nn.LSTM(2, 2)))  # no vmap rule for LSTM


def test_passes_with_a_plain_extra_loss_run_on_their_own_inside_the_batched_executor(monkeypatch) -> None:
    """A closure ``extra_loss`` (not a ``FunctionalTerm``) cannot go through vmap: each such pass runs alone, and the
    run equals the sequential one exactly."""
    from fedpal.algorithms.core.training import squared_distance
    from fedpal.algorithms.weight_sharing.fedprox import FedProx

    def train_locally(self, client, payload, state=None):  # FedProx's term as the closure it used to be
        reference = payload["params"]
        return client.fit(reference, extra_loss=lambda b: 0.5 * self.hp.mu * squared_distance(b.module, reference))

    monkeypatch.setattr(FedProx, "train_locally", train_locally)
    calls = count_batched_passes(monkeypatch)
    sequential, batched = run_both("fedprox", algorithm={"mu": 0.5})
    assert not calls  # evaluation passes only are batched: no fit_together at all
    assert without_wall(batched.history) == without_wall(sequential.history)
    assert all(torch.equal(batched.server["params"][k], v) for k, v in sequential.server["params"].items())


# ---- functional terms: one definition, run on the live module sequentially and inside vmap together


def pull_term(params, batch):
    """A proximal pull to the client's anchor plus a row-weighted feature pull (a rows tensor), with per-row stats."""
    distance = torch.stack([(p - batch.context[n]).pow(2).sum() for n, p in params.items()]).sum()
    pull = batch.real_mean(((batch.features - batch.rows["goal"]).pow(2).mean(1) * batch.mask).mean())
    stats = {"features": batch.features.detach() * batch.mask.unsqueeze(1), "y": batch.y, "rows": batch.mask}
    return 0.3 * distance + pull, stats


def mlp_trainer(settings: TrainSettings) -> LocalTrainer:
    from fedpal.models.registry import build_model

    torch.manual_seed(0)
    return LocalTrainer(build_model("mlp", (1, 8, 8), 3, 5, 7, "linear", None), settings)  # backbone -> 5 -> head


@pytest.mark.parametrize(
    "settings",
    [
        TrainSettings(epochs=2, batch_size=4, lr=0.1, momentum=0.9),
        TrainSettings(epochs=2, batch_size=4, lr=0.01, optimizer="adam"),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_functional_terms_together_equal_one_by_one(settings: TrainSettings) -> None:
    """Different sizes (padding in every client's last batch, different step counts), per-client context and rows;
    the stats each client's ``after_step`` accumulates (per-class feature sums of the last epoch) agree too."""
    trainer = mlp_trainer(settings)
    start = trainer.snapshot()
    gen = torch.Generator().manual_seed(5)
    sizes = [9, 3, 14]
    data = [(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes]
    goals = [torch.randn(n, 5, generator=gen) for n in sizes]
    anchors = [{k: v + 0.1 * i for k, v in start.items()} for i in range(len(sizes))]

    def term_of(i: int, sink: dict[str, torch.Tensor]) -> FunctionalTerm:
        def after_step(stats: dict[str, torch.Tensor], epoch: int) -> None:
            if epoch == settings.epochs - 1:
                sink["sums"].index_add_(0, stats["y"], stats["features"])
                sink["counts"].index_add_(0, stats["y"], stats["rows"])
                sink["steps"] += 1

        return FunctionalTerm(pull_term, context=anchors[i], rows={"goal": goals[i]}, after_step=after_step)

    def sink() -> dict[str, torch.Tensor]:
        return {"sums": torch.zeros(3, 5), "counts": torch.zeros(3), "steps": torch.zeros(())}

    alone_sinks, joint_sinks = [sink() for _ in sizes], [sink() for _ in sizes]
    one_by_one = [
        trainer.fit(start, x, y, torch.Generator().manual_seed(i), extra_loss=term_of(i, alone_sinks[i]))
        for i, (x, y) in enumerate(data)
    ]
    requests = [
        FitRequest(start, x, y, torch.Generator().manual_seed(i), term=term_of(i, joint_sinks[i]))
        for i, (x, y) in enumerate(data)
    ]
    together = fit_together(trainer, requests)
    for single, joint, alone_sink, joint_sink in zip(one_by_one, together, alone_sinks, joint_sinks, strict=True):
        assert joint.steps == single.steps
        assert joint.mean_loss == pytest.approx(single.mean_loss, rel=1e-5)
        for name, value in single.params.items():
            assert torch.allclose(joint.params[name], value, atol=1e-5), name
        assert torch.equal(joint_sink["counts"], alone_sink["counts"]) and joint_sink["steps"] == alone_sink["steps"]
        assert torch.allclose(joint_sink["sums"], alone_sink["sums"], atol=1e-5)
    assert [float(s["counts"].sum()) for s in joint_sinks] == sizes  # padding rows never counted


def test_requests_with_different_term_functions_are_never_stacked() -> None:
    trainer = mlp_trainer(TrainSettings(batch_size=4))
    start = trainer.snapshot()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    same = FunctionalTerm(pull_term, context=start, rows={"goal": torch.zeros(6, 5)})
    other = FunctionalTerm(lambda p, b: pull_term(p, b), context=start, rows={"goal": torch.zeros(6, 5)})
    assert term_signature(same) == term_signature(
        FunctionalTerm(pull_term, context=start, rows={"goal": torch.ones(9, 5)})
    )
    assert term_signature(same) != term_signature(other) and term_signature(None) is None
    with pytest.raises(ValueError, match="same term function"):
        fit_together(trainer, [FitRequest(start, x, y, torch.Generator(), term=t) for t in (same, other)])


def count_batched_passes(monkeypatch) -> list[tuple[int, bool]]:
    """(number of requests, whether they carry a term) of every ``fit_together`` call of the batched executor."""
    import fedpal.engine.batched as batched_module

    calls: list[tuple[int, bool]] = []

    def counting(trainer: LocalTrainer, requests: list[FitRequest]) -> list:
        calls.append((len(requests), requests[0].term is not None))
        return fit_together(trainer, requests)

    monkeypatch.setattr(batched_module, "fit_together", counting)
    return calls


def run_both(name: str, **sections):
    """The same tiny run sequentially and on the batched executor."""
    from fedpal.config import from_dict
    from fedpal.data.federated import build_federated_data
    from fedpal.engine.batched import BatchedExecutor
    from fedpal.engine.simulator import Simulator

    cfg = from_dict(tiny_config(name, **sections))
    data = build_federated_data(cfg.data, cfg.seed)
    sequential = Simulator(cfg, data, progress=False)
    sequential.run()
    batched = Simulator(cfg, data, progress=False)
    batched.executor = BatchedExecutor(batched.assembly)
    batched.run()
    return sequential, batched


def largest_difference(a, b) -> float:
    """The largest absolute difference between two nested states' floating tensors (same structure)."""
    if isinstance(a, dict):
        return max((largest_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel():
        return float((a.double() - b.double()).abs().nan_to_num(0.0).max())
    return 0.0


@pytest.mark.parametrize(
    "name, options, term_rounds",
    [
        ("fedprox", {"mu": 0.5}, 3),
        ("moon", {}, 2),  # round 1 is plain cross-entropy (no previous model yet)
        # eval-pass collection: the term starts with the first global prototypes (at the default s = 80 these tiny
        # runs diverge, and rounding differences grow with them)
        ("protonorm", {"scale": 5.0}, 2),
        ("fedtgp", {"server_epochs": 20}, 2),  # ProtoNorm's client (eval-pass collection), a learned server
        ("fedproto", {}, 3),  # collection during training: a term (with stats) from round 1
        ("fedproto", {"preset": "fedali"}, 3),  # last-epoch collection, class-count weighting
    ],
    ids=["fedprox", "moon", "protonorm", "fedtgp", "fedproto", "fedproto-fedali"],
)
def test_converted_methods_train_their_clients_in_one_batched_pass(
    monkeypatch, name: str, options: dict, term_rounds: int
) -> None:
    """Every round's clients (all 4) go through one ``fit_together`` with their term: a silent fallback to
    one-by-one training fails here. Results agree with sequential training to float rounding."""
    calls = count_batched_passes(monkeypatch)
    alone: list[int] = []
    original_fit = LocalTrainer.fit

    def fit(self, *args, **kwargs):  # a pass the batched executor did not take
        alone.append(1)
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "fit", fit)
    sequential, batched = run_both(name, train={"local_epochs": 2}, algorithm=options)
    with_term = [n for n, term in calls if term]
    assert len(with_term) == term_rounds and set(with_term) == {4}, calls
    assert len(calls) == 3 and {n for n, _ in calls} == {4}
    assert len(alone) == 3 * 4  # the sequential run's passes only
    assert largest_difference(batched.clients, sequential.clients) < 1e-4
    assert largest_difference(batched.server, sequential.server) < 1e-4
    for got, want in zip(batched.history, sequential.history, strict=True):
        assert got["personalized"]["loss"] == pytest.approx(want["personalized"]["loss"], abs=1e-5)


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
