"""``train.grad_clip``: the total gradient norm of each optimizer's parameters clipped before every client step.

The hand cases follow from the equations: a linear model at zero weights under cross-entropy has the gradient
(softmax - onehot) x^T, whose norm is written out below, and one SGD step with clip c moves the weights by
lr * c * g / |g|.
"""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import simulator, tiny_config
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedpal.algorithms.core.batched_training import FitRequest, clip_each_client, fit_together
from fedpal.algorithms.core.registry import all_algorithms
from fedpal.algorithms.core.training import LocalTrainer, TrainSettings, train_steps
from fedpal.config import from_dict
from fedpal.errors import ConfigError

LR = 0.1
X = torch.tensor([[3.0, 4.0]])  # one sample, label 0, two classes
Y = torch.tensor([0])
# At W = 0 the softmax is (1/2, 1/2): dCE/dW = (p - e_0) x^T = [[-1.5, -2], [1.5, 2]], |g| = sqrt(12.5).
HAND_GRADIENT = torch.tensor([[-1.5, -2.0], [1.5, 2.0]])
HAND_NORM = math.sqrt(2 * (1.5**2 + 2.0**2))


def one_step(grad_clip: float) -> torch.Tensor:
    """The weights after one step of the run's SGD from W = 0 on the hand sample, through ``LocalTrainer.fit``."""
    module = nn.Linear(2, 2, bias=False)
    trainer = LocalTrainer(module, TrainSettings(epochs=1, batch_size=1, lr=LR, grad_clip=grad_clip))
    result = trainer.fit({"weight": torch.zeros(2, 2)}, X, Y, torch.Generator().manual_seed(0))
    assert result.steps == 1
    return result.params["weight"]


def test_the_hand_gradient_is_what_the_unclipped_step_follows() -> None:
    assert torch.allclose(one_step(0.0), -LR * HAND_GRADIENT, atol=1e-7)


@pytest.mark.parametrize("clip", [0.5, 1.0, 3.0])
def test_one_clipped_step_moves_by_lr_c_along_the_unit_gradient(clip: float) -> None:
    moved = one_step(clip)
    expected = -LR * clip * HAND_GRADIENT / HAND_NORM
    assert torch.allclose(moved, expected, atol=1e-6)
    assert float(moved.norm()) == pytest.approx(LR * clip, rel=1e-5)


def test_a_clip_above_the_gradient_norm_changes_nothing() -> None:
    assert torch.equal(one_step(HAND_NORM * 1.5), one_step(0.0))


def test_each_optimizer_is_clipped_to_its_own_total_norm() -> None:
    """Two optimizers (a mutual pass): loss a.w + b.v with |a| = 5 and |b| = 13, one SGD step each, clip 1."""
    w, v = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([5.0, 12.0])
    optimizers = [torch.optim.SGD([w], lr=LR), torch.optim.SGD([v], lr=LR)]
    train_steps([(0, torch.zeros(1))], lambda *_: a @ w + b @ v, optimizers, grad_clip=1.0)
    assert torch.allclose(w.detach(), -LR * a / 5, atol=1e-7)
    assert torch.allclose(v.detach(), -LR * b / 13, atol=1e-7)


def test_one_optimizer_over_two_tensors_is_clipped_by_their_joint_norm() -> None:
    """|(3, 4, 12)| = 13: the step scales both tensors by the same 1/13, not each by its own norm."""
    w, v = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([w, v], lr=LR)
    loss_of = lambda *_: torch.tensor([3.0, 4.0]) @ w + 12.0 * v.sum()  # noqa: E731
    train_steps([(0, torch.zeros(1))], loss_of, [optimizer], grad_clip=1.0)
    assert torch.allclose(w.detach(), -LR * torch.tensor([3.0, 4.0]) / 13, atol=1e-7)
    assert torch.allclose(v.detach(), -LR * torch.tensor([12.0]) / 13, atol=1e-7)


def test_a_methods_own_step_must_clip_itself() -> None:
    with pytest.raises(ValueError, match="clips its gradients itself"):
        train_steps([(0, torch.zeros(1))], lambda *_: torch.zeros(()), [], grad_clip=1.0, update=lambda _: None)


# ------------------------------------------------------------------------------------- client-batched executor


def test_stacked_clients_are_clipped_each_by_its_own_norm() -> None:
    """Row i of every tensor is client i: norms 5 (clipped to 2), 13 (clipped to 2) and 1 (kept)."""
    grads = {"a": torch.tensor([[3.0], [5.0], [0.6]]), "b": torch.tensor([[4.0, 0.0], [0.0, 12.0], [0.8, 0.0]])}
    clipped = clip_each_client(grads, 2.0)
    for i, norm in enumerate([5.0, 13.0, 1.0]):
        scale = min(1.0, 2.0 / norm)
        for name in grads:
            assert torch.allclose(clipped[name][i], grads[name][i] * scale, atol=1e-6)


def test_batched_training_with_a_clip_equals_one_by_one() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    trainer = LocalTrainer(module, TrainSettings(epochs=2, batch_size=4, lr=0.5, momentum=0.9, grad_clip=0.3))
    start = trainer.snapshot()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 6, generator=gen) * 3, torch.randint(0, 3, (n,), generator=gen)) for n in (9, 4, 13)]
    starts = [{k: t + 0.01 * i for k, t in start.items()} for i in range(len(data))]
    cases = list(enumerate(zip(starts, data, strict=True)))
    single = [trainer.fit(p, x, y, torch.Generator().manual_seed(10 + i)) for i, (p, (x, y)) in cases]
    requests = [FitRequest(p, x, y, torch.Generator().manual_seed(10 + i)) for i, (p, (x, y)) in cases]
    together = fit_together(trainer, requests)
    unclipped = LocalTrainer(module, TrainSettings(epochs=2, batch_size=4, lr=0.5, momentum=0.9))
    free = unclipped.fit(starts[0], *data[0], torch.Generator().manual_seed(10))
    assert any(not torch.allclose(free.params[k], single[0].params[k], atol=1e-3) for k in free.params)  # it binds
    for one, joint in zip(single, together, strict=True):
        for name, value in one.params.items():
            assert torch.allclose(joint.params[name], value, atol=1e-5), name


# ------------------------------------------------------------------------------------- every method's client steps


def step_norms(raw: dict, rounds: int = 2) -> list[float]:
    """The total gradient norm of each optimizer's parameters at every optimizer step a client takes (local
    updates and the personalized model for evaluation) over ``rounds`` rounds; the servers' steps are left out."""
    sim = simulator(raw)
    norms: list[float] = []
    recording = [False]

    def spy(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if recording[0]:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(spy)
    try:
        ids = list(range(sim.data.num_clients))
        for r in range(1, rounds + 1):
            payloads = sim.algorithm.configure(sim.server, r, ids)
            replies = {}
            recording[0] = True
            for cid in ids:
                sim.clients[cid], replies[cid] = sim.algorithm.local_update(
                    sim.view(cid, r), sim.clients[cid], payloads[cid]
                )
            recording[0] = False
            sim.server = sim.algorithm.aggregate(sim.server, r, replies, sim.reduce)
        evaluation = sim.algorithm.configure_evaluation(sim.server, rounds, ids)
        recording[0] = True
        for cid in ids:
            sim.algorithm.personalized_params(sim.view(cid, rounds), sim.clients[cid], evaluation[cid])
        recording[0] = False
    finally:
        handle.remove()
    return norms


# methods whose step is not a plain optimizer step refuse the clip, each with its own line
REFUSING = {
    "perfedavg": r"train\.grad_clip is not supported",
    "pfedme": r"train\.grad_clip is not supported",
    "pflalign": r"grad_clip = 0 \(its preconditioner reads the raw gradient",
}
CLIP = 0.05


def clip_cases() -> list[str]:
    """Every method a tiny digits run can host: not the adapter methods (mosaic trunks), not FedAli (HART on HAPT)."""
    return [
        name
        for name, cls in sorted(all_algorithms().items())
        if name not in REFUSING and not cls.requires_adapters and name != "fedali"
    ]


@pytest.mark.parametrize("name", clip_cases())
def test_every_client_optimizer_step_sees_clipped_gradients(name: str) -> None:
    free = step_norms(tiny_config(name, train={"rounds": 2}))
    if not free:
        pytest.skip(f"{name}: its clients take no optimizer step")
    assert max(free) > CLIP  # without the clip the bound does not hold, so the check below can fail
    clipped = step_norms(tiny_config(name, train={"rounds": 2, "grad_clip": CLIP}))
    assert len(clipped) == len(free)
    assert max(clipped) <= CLIP * (1 + 1e-4)


@pytest.mark.parametrize("name", sorted(REFUSING))
def test_methods_whose_step_combines_gradients_refuse_the_clip(name: str) -> None:
    with pytest.raises(ConfigError, match=REFUSING[name]):
        simulator(tiny_config(name, train={"grad_clip": 1.0}))


def test_a_negative_clip_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train\.grad_clip' must be >= 0"):
        from_dict(tiny_config("fedavg", train={"grad_clip": -1.0}))
