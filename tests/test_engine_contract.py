"""The engine's side of the contract: the one reduction point, data views per (client, round), the registry and
the import rules that keep layers apart."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import one_round, simulator

from fedpal.algorithms.core.registry import all_algorithms
from fedpal.config import from_dict
from fedpal.data.client_data import ClientData
from fedpal.data.federated import build_federated_data
from fedpal.engine.reduction import MeanReducer
from fedpal.engine.simulator import Simulator
from fedpal.engine.streamed_reduction import Folded, ReplyFold

SRC = Path(__file__).resolve().parents[1] / "src" / "fedpal"
IMAGE5 = {"name": "mlp", "hidden_dim": 16, "feature_dim": 8, "family": "image5"}


class FirstClientReducer(MeanReducer):
    """Not an average at all: the lowest-id client's values, so any method that averages by itself shows."""

    streams = False  # it needs every reply's values

    def __call__(self, parts: Any, weights: Any = None, *, kind: Any = "update", reference: Any = None) -> Any:
        super().__call__(parts, weights, kind=kind, reference=reference)
        return {k: v.clone() for k, v in parts[min(parts)].items()}


@pytest.mark.parametrize(
    ("name", "key", "reply_key", "model"),
    [
        ("fedavg", "params", "params", None),
        ("fedprox", "params", "params", None),
        ("moon", "params", "params", None),
        ("fedper", "backbone", "backbone", None),
        ("lg_fedavg", "head", "head", IMAGE5),
        ("fml", "shared", "shared", IMAGE5),
    ],
)
def test_parameter_averages_go_through_the_engines_reducer(tiny, name, key, reply_key, model) -> None:
    sim = simulator(tiny(name, **({"model": model} if model else {})))
    sim.reduce = FirstClientReducer()
    _, replies = one_round(sim)
    assert sim.reduce.calls.get("update", 0) == 1
    first = replies[min(replies)][reply_key]
    assert all(torch.equal(sim.server[key][k], first[k]) for k in first)


def test_fedali_reduces_weights_as_updates_and_bank_starts_as_statistics() -> None:
    from tests.test_fedali import fedali_config, synthetic_har

    sim = Simulator(fedali_config(), synthetic_har(), progress=False)  # type: ignore[arg-type]
    sim.initialize()
    sim.reduce = FirstClientReducer()
    _, replies = one_round(sim)
    layers = sim.algorithm.layers  # type: ignore[attr-defined]
    assert sim.reduce.calls == {"update": 1, "statistic": len(layers)}
    assert all(torch.equal(sim.server["weights"][k], v) for k, v in replies[0]["weights"].items())


def test_a_schedule_changes_what_clients_see_by_round(tiny) -> None:
    """Tasks over time: the engine asks for client data per (client, round); the method never knows."""
    cfg = from_dict(tiny("local", train={"rounds": 3}))
    data = build_federated_data(cfg.data, cfg.seed)
    seen: dict[tuple[int, int], int] = {}

    def schedule(cid: int, round: int, c: ClientData) -> ClientData:
        keep = max(4, c.train_y.numel() * round // 3)  # a client's training data grow over the rounds
        return ClientData(c.train_x[:keep], c.train_y[:keep], c.val_x, c.val_y, c.test_x, c.test_y)

    data.schedule = schedule
    sim = Simulator(cfg, data, progress=False)
    original = sim.algorithm.local_update

    def spy(client: Any, state: Any, payload: Any) -> Any:
        seen[(client.id, client.round)] = client.num_train
        return original(client, state, payload)

    sim.algorithm.local_update = spy  # type: ignore[method-assign]
    scheduled = sim.run()
    for cid, c in enumerate(data.clients):
        n = c.train_y.numel()
        assert [seen[(cid, r)] for r in (1, 2, 3)] == [max(4, n * r // 3) for r in (1, 2, 3)]
    static = Simulator(cfg, build_federated_data(cfg.data, cfg.seed), progress=False).run()
    assert scheduled["local_steps"] < static["local_steps"]  # less data in early rounds: fewer steps


def test_registered_methods_live_in_modules_named_after_them() -> None:
    """The registry finds a method by importing only the module of that name."""
    for name, cls in all_algorithms().items():
        assert cls.__module__.rsplit(".", 1)[1] == name
        assert cls.__module__.split(".")[2] in {"reference", "weight_sharing", "prototype", "distillation"}


def test_a_config_imports_only_the_method_it_names() -> None:
    code = (
        "import sys; from fedpal.config import from_dict; from_dict({'algorithm': {'name': 'fedprox'}}); "
        "loaded = sorted(m for m in sys.modules if m.startswith('fedpal.algorithms.') and m.count('.') == 3 "
        "and not m.startswith('fedpal.algorithms.core')); print(','.join(loaded))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    methods = {m.rsplit(".", 1)[1] for m in out.split(",")} & set(all_algorithms())
    assert methods == {"fedprox", "fedavg"}  # FedProx is FedAvg with a proximal term: its base comes along


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_layers_keep_their_direction() -> None:
    """The engine and evaluation never import a method (only the contract); nothing but algorithms imports the
    method families; the neutral utilities import nothing of fedpal."""
    families = ("reference", "weight_sharing", "prototype", "distillation")
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC).as_posix()
        imported = imports_of(path)
        if relative.startswith("common/"):
            assert not {m for m in imported if m.startswith("fedpal")}, relative
        if relative.startswith("algorithms/"):
            continue
        named = {m for m in imported for f in families if m.startswith(f"fedpal.algorithms.{f}")}
        assert not named, f"{relative} imports methods {sorted(named)}"


def test_a_method_can_bring_its_own_step_and_keep_its_state_between_rounds(tiny) -> None:
    """``optimizer_factory`` replaces the run's optimizer; carrying its state over two one-epoch passes equals one
    two-epoch pass (what pFLAlign-style methods keep in the client state)."""
    sim = simulator(tiny("local"))
    view = sim.view(0, 1)
    start = view.own_initial_params()
    plain = view.fit(start, lr=0.05)
    via_factory = view.fit(start, optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.05))
    assert all(torch.equal(plain.params[k], via_factory.params[k]) for k in start)

    def adam(state: dict | None) -> Any:
        def make(parameters: list) -> torch.optim.Optimizer:
            optimizer = torch.optim.Adam(parameters, lr=0.01)
            if state is not None:
                optimizer.load_state_dict(state)
            return optimizer

        return make

    once = view.fit(start, epochs=2, shuffle=False, optimizer_factory=adam(None))
    first = view.fit(start, epochs=1, shuffle=False, optimizer_factory=adam(None))
    assert first.optimizer is not None
    kept = first.optimizer.state_dict()
    second = view.fit(first.params, epochs=1, shuffle=False, optimizer_factory=adam(kept))
    assert all(torch.allclose(once.params[k], second.params[k], atol=1e-6) for k in start)
    restarted = view.fit(first.params, epochs=1, shuffle=False, optimizer_factory=adam(None))  # state dropped
    assert not all(torch.allclose(once.params[k], restarted.params[k], atol=1e-6) for k in start)


# ---- replies folded as they arrive


STREAMED = sorted(name for name, cls in all_algorithms().items() if cls.streamed_reply is not None)


def test_every_plain_average_method_declares_its_streamed_reply() -> None:
    assert STREAMED == [
        "apfl",
        "ditto",
        "fedala",
        "fedali",
        "fedavg",
        "fedavg_ft",
        "fedavgm",
        "fedbabu",
        "fedper",
        "fedprox",
        "fedrep",
        "fml",
        "lg_fedavg",
        "moon",
        "perfedavg",
        "pfedme",
        "pflalign",
    ]


@pytest.mark.parametrize("name", [n for n in STREAMED if n != "fedali"])
def test_folding_replies_as_they_arrive_changes_no_number(tiny, name) -> None:
    """The driver folds the declared field into a running float64 sum in id order; holding every reply and
    averaging them at once does the same arithmetic, so the server states are equal bit for bit."""
    model = {"model": {"name": "mlp", "hidden_dim": 16, "feature_dim": 8, "family": "image5"}}
    raw = tiny(name, train={"rounds": 2, "client_fraction": 0.75}, **(model if name in ("fml", "lg_fedavg") else {}))
    runs = []
    for streams in (True, False):
        sim = simulator(raw)
        sim.reduce.streams = streams
        folded: list[bool] = []
        original = sim.algorithm.aggregate

        def aggregate(state, round, replies, reduce, original=original, folded=folded):
            folded.extend(isinstance(r[STREAMED_KEYS[name]], Folded) for r in replies.values())
            return original(state, round, replies, reduce)

        sim.algorithm.aggregate = aggregate  # type: ignore[method-assign]
        for r in (1, 2):
            sim.run_round(r)
        assert folded and all(f == streams for f in folded)
        runs.append(sim.server)
    key = STREAMED_KEYS[name]
    assert all(torch.equal(runs[0][key][k], runs[1][key][k]) for k in runs[1][key])


STREAMED_KEYS = {"fedavg": "params", "fedavg_ft": "params", "fedprox": "params", "moon": "params"}
STREAMED_KEYS |= {"fedper": "backbone", "lg_fedavg": "head", "fml": "shared"}
STREAMED_KEYS |= {"apfl": "params", "fedavgm": "params", "perfedavg": "params", "pfedme": "params"}
STREAMED_KEYS |= {"pflalign": "params"}
STREAMED_KEYS |= {"ditto": "params", "fedala": "params", "fedrep": "backbone", "fedbabu": "backbone"}


def test_a_fold_is_the_weighted_mean_and_refuses_other_requests() -> None:
    values = {0: torch.tensor([1.0, 2.0]), 2: torch.tensor([3.0, 6.0]), 5: torch.tensor([9.0, 9.0])}
    sizes = {0: 1, 2: 3, 5: 0}
    fold = ReplyFold("params", "num_samples")
    held = {cid: fold.take(cid, {"params": {"w": v}, "num_samples": sizes[cid]})["params"] for cid, v in values.items()}
    reducer = MeanReducer()
    mean = reducer({0: held[0], 2: held[2]}, {0: 1.0, 2: 3.0})  # a client folded with weight 0 may be left out
    assert torch.equal(mean["w"], torch.tensor([2.5, 5.0]))  # (1 + 9) / 4, (2 + 18) / 4
    with pytest.raises(ValueError, match="other clients"):
        reducer({0: held[0]}, {0: 1.0})
    with pytest.raises(ValueError, match="other weights"):
        reducer({0: held[0], 2: held[2]}, {0: 1.0, 2: 1.0})
    with pytest.raises(ValueError, match="uniform"):
        reducer({0: held[0], 2: held[2]})
    with pytest.raises(ValueError, match="mix"):
        reducer({0: held[0], 2: {"w": values[2]}}, {0: 1.0, 2: 3.0})
    with pytest.raises(ValueError, match="ascending"):
        fold.take(1, {"params": {"w": values[0]}, "num_samples": 1})
