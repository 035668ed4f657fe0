"""``run.device``: where a run's data, modules and states live.

Without a GPU this proves what it can: the one-line refusals, the executor choice, the data's move as views of one
copy (to the ``meta`` device, which needs no hardware), checkpoints mapped to the run's device, and a static audit
that every tensor factory in the library names its device. The tests marked ``cuda`` run real rounds on a GPU and
skip elsewhere.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import interrupted_at, tiny_config

import fedpal
import fedpal.runner
from fedpal.algorithms.core.training import batch_indices
from fedpal.cli import main
from fedpal.config import RunConfig, from_dict, to_toml
from fedpal.data.client_data import SPLITS
from fedpal.data.federated import build_federated_data
from fedpal.engine import executor_choice
from fedpal.engine.assembly import assemble
from fedpal.engine.batched import BatchedExecutor
from fedpal.engine.device import run_device
from fedpal.engine.processes import ProcessExecutor
from fedpal.engine.run_directory import RunDirectory
from fedpal.engine.simulator import Simulator
from fedpal.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src" / "fedpal"
AUDITED = ("algorithms", "engine", "evaluation", "models", "pretraining")
FACTORIES = {
    "zeros", "ones", "tensor", "arange", "eye", "full", "empty", "randperm", "randn", "rand", "randint",
    "linspace", "triu_indices", "tril_indices", "as_tensor", "scalar_tensor",
}  # fmt: skip

# (file under src/fedpal, enclosing function, factory): tensors that provably stay on the CPU, and why.
CPU_ALLOWED = {
    # Batch order is drawn on the CPU generator (same numbers on every device), then moved once per epoch.
    ("algorithms/core/training.py", "batch_indices", "randperm"),
    # Step numbers of the batched loop, read back with int() on the host.
    ("algorithms/core/batched_training.py", "fit_together", "tensor"),
    # Module construction: modules are built and seeded on the CPU, then moved by the assembly with their tensors.
    ("models/alp.py", "ALPLayer.__init__", "randn"),
    ("models/hart.py", "LiteConv.__init__", "empty"),
    ("models/hart.py", "HartBackbone.__init__", "linspace"),  # drop-path rates, read back as floats
    # Shape probes: a dummy forward through a freshly built (CPU) trunk to measure its output width.
    ("models/cnn.py", "build_cnn", "zeros"),
    ("models/projection.py", "flat_dim", "zeros"),
    # MAE pre-training runs on the CPU, before the run is assembled (fedpal.pretraining's docstring).
    ("pretraining/mae.py", "random_masks", "rand"),
    ("pretraining/mae.py", "MaskedAutoencoder.__init__", "randn"),
}
# Modules an algorithm builds stay on the CPU only here (nn.X(...) not followed by .to(...)).
MODULES_ALLOWED = {
    # A seeded nn.Linear drawn for its initial weight, which is then moved to the client's device.
    ("algorithms/distillation/fedkd.py", "FedKD.init_client", "Linear"),
}


def _calls(path: Path) -> Iterator[tuple[str, ast.Call, ast.AST | None]]:
    """(enclosing qualified function name, call, parent node) of every call in a file."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def qualname(node: ast.AST) -> str:
        names = []
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.append(node.name)
        return ".".join(reversed(names))

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield qualname(node), node, parents.get(node)


def _audited_files() -> Iterator[tuple[str, Path]]:
    for part in AUDITED:
        for path in sorted((SRC / part).rglob("*.py")):
            yield path.relative_to(SRC).as_posix(), path


def test_every_tensor_factory_names_its_device() -> None:
    """``torch.zeros(...)`` and friends default to the CPU: in a run on a GPU, a factory without ``device=`` makes
    a tensor that meets device tensors on the wrong side (an error, or a copy every step)."""
    found: set[tuple[str, str, str]] = set()
    missing = []
    for rel, path in _audited_files():
        for where, call, _ in _calls(path):
            func = call.func
            if not (isinstance(func, ast.Attribute) and func.attr in FACTORIES):
                continue
            if not (isinstance(func.value, ast.Name) and func.value.id == "torch"):
                continue
            if any(keyword.arg == "device" for keyword in call.keywords):
                continue
            entry = (rel, where, func.attr)
            found.add(entry)
            if entry not in CPU_ALLOWED:
                missing.append(f"{rel}:{call.lineno} in {where}: torch.{func.attr}(...) without device=")
    assert not missing, "tensor factories without a device (pass device= or add a commented CPU_ALLOWED entry):\n" + (
        "\n".join(missing)
    )
    assert found >= CPU_ALLOWED, f"CPU_ALLOWED entries that match nothing any more: {sorted(CPU_ALLOWED - found)}"


def test_modules_an_algorithm_builds_are_moved_to_the_run_device() -> None:
    """``nn.Linear(...)`` and the like inside a method (a server head, a generator) are born on the CPU; outside
    a module's own definition they must be moved (``.to(device)``) where they are built."""
    found: set[tuple[str, str, str]] = set()
    stray = []
    for rel, path in _audited_files():
        if not rel.startswith("algorithms/"):
            continue
        for where, call, parent in _calls(path):
            func = call.func
            if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "nn"):
                continue
            if not func.attr[:1].isupper():
                continue
            moved = isinstance(parent, ast.Attribute) and parent.attr == "to"
            if moved or _inside_module_class(path, where):
                continue
            entry = (rel, where, func.attr)
            found.add(entry)
            if entry not in MODULES_ALLOWED:
                stray.append(f"{rel}:{call.lineno} in {where}: nn.{func.attr}(...) not moved with .to(...)")
    assert not stray, "\n".join(stray)
    assert found >= MODULES_ALLOWED, f"stale MODULES_ALLOWED entries: {sorted(MODULES_ALLOWED - found)}"


def _inside_module_class(path: Path, where: str) -> bool:
    """Whether ``where`` is a method of a class deriving from ``nn.Module`` (its parts move with it)."""
    owner = where.split(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == owner and "." in where:
            return any(ast.unparse(base) in ("nn.Module", "torch.nn.Module") for base in node.bases)
    return False


# --------------------------------------------------------------------------------------------- refusals


def test_cuda_without_a_gpu_is_one_line_before_anything_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"run\.device = 'cuda' but torch finds no usable CUDA device") as caught:
        run_device(RunConfig(device="cuda"))
    assert "\n" not in str(caught.value)
    assert run_device(RunConfig()) == torch.device("cpu")

    def no_data(*_: Any) -> None:
        raise AssertionError("the data were built before the device was checked")

    monkeypatch.setattr(fedpal.runner, "build_federated_data", no_data)
    with pytest.raises(UserError, match=r"run\.device = 'cuda'"):
        fedpal.run(tiny_config(run={"device": "cuda"}))


def test_cuda_without_a_gpu_leaves_the_data_where_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = from_dict(tiny_config(run={"device": "cuda"}))
    data = build_federated_data(cfg.data, cfg.seed)
    with pytest.raises(UserError, match=r"run\.device = 'cuda'"):
        Simulator(cfg, data, progress=False)
    assert all(getattr(c, split).device.type == "cpu" for c in data.clients for split in SPLITS)


def test_the_cli_says_it_in_one_line_with_exit_code_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "tiny.toml"
    config.write_text(to_toml(tiny_config()))
    out = tmp_path / "out"
    code = main(["run", str(config), "--set", "run.device=cuda", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [err.strip()] and err.startswith("fedpal: error: run.device = 'cuda'")
    assert not out.exists()


def test_worker_processes_refuse_cuda_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even where a GPU is present: the workers' transport carries CPU tensors."""
    with pytest.raises(UserError, match=r"run\.executor = 'processes' .* cannot use run\.device = 'cuda'") as caught:
        run_device(RunConfig(device="cuda", executor="processes"), cuda_available=lambda: True)
    assert "\n" not in str(caught.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_data(*_: Any) -> None:
        raise AssertionError("the data were built before the executor was checked")

    monkeypatch.setattr(fedpal.runner, "build_federated_data", no_data)
    with pytest.raises(UserError, match=r"run\.executor = 'processes'"):
        fedpal.run(tiny_config(run={"device": "cuda", "executor": "processes"}))


def test_a_process_executor_refuses_an_assembly_on_another_device() -> None:
    cfg = from_dict(tiny_config())
    assembly = assemble(cfg, build_federated_data(cfg.data, cfg.seed))
    assembly.config = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device="cuda"))
    with pytest.raises(UserError, match=r"run\.executor = 'processes'"):
        ProcessExecutor(assembly, 1)  # refused before any worker starts


def test_auto_takes_the_batched_executor_on_a_gpu_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    cfg = from_dict(tiny_config(run={"executor": "auto"}))
    assembly = assemble(cfg, build_federated_data(cfg.data, cfg.seed))  # on the CPU; only the choice is asked
    assembly.config = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device="cuda"))
    with caplog.at_level(logging.INFO, logger="fedpal"):
        chosen = executor_choice.choose_executor(assembly)
    assert type(chosen) is BatchedExecutor
    assert "run.executor = auto: batched (run.device = cuda" in caplog.text


# --------------------------------------------------------------------------------------------- moving things


def test_the_federation_moves_as_views_of_one_copy() -> None:
    """Every split is cut from one moved copy of the storage the splits share (``meta`` stands in for a GPU)."""
    cfg = from_dict(tiny_config(data={"unseen_clients": 1}))
    data = build_federated_data(cfg.data, cfg.seed)
    assert data.to("cpu") is data and data.clients[0].to("cpu") is data.clients[0]
    moved = data.to("meta")
    assert moved.schedule is data.schedule and moved.client_ids == data.client_ids
    assert moved.unseen_ids == data.unseen_ids
    before = [*data.clients, *data.unseen]
    after = [*moved.clients, *moved.unseen]
    for old, new in zip(before, after, strict=True):
        for split in SPLITS:
            a, b = getattr(old, split), getattr(new, split)
            assert b.device.type == "meta" and a.device.type == "cpu"
            assert (b.shape, b.stride(), b.storage_offset(), b.dtype) == (
                a.shape,
                a.stride(),
                a.storage_offset(),
                a.dtype,
            )
            assert b.untyped_storage().nbytes() == a.untyped_storage().nbytes()  # the whole x_all / y_all, once
    one = data.clients[1].to("meta")  # a lone client copies only its own splits
    assert one.train_x.untyped_storage().nbytes() == data.clients[1].train_x.nbytes


def test_batch_positions_are_drawn_on_the_cpu_and_moved_once_per_epoch() -> None:
    on_cpu = list(batch_indices(10, 4, torch.Generator().manual_seed(3), epochs=2))
    elsewhere = list(batch_indices(10, 4, torch.Generator().manual_seed(3), epochs=2, device="meta"))
    assert [e for e, _ in elsewhere] == [e for e, _ in on_cpu] == [0, 0, 0, 1, 1, 1]
    assert all(idx.device.type == "meta" and idx.untyped_storage().nbytes() == 10 * 8 for _, idx in elsewhere)
    assert [idx.shape for _, idx in elsewhere] == [idx.shape for _, idx in on_cpu]
    assert all(idx.untyped_storage().nbytes() == 10 * 8 for _, idx in on_cpu)  # slices of one permutation


def test_a_checkpoint_loads_onto_the_run_device(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    run_dir.save_checkpoint({"round": 1, "clients": {0: {"params": {"w": torch.ones(2)}}}})
    assert run_dir.load_checkpoint()["clients"][0]["params"]["w"].device.type == "cpu"
    assert run_dir.load_checkpoint("meta")["clients"][0]["params"]["w"].device.type == "meta"


# --------------------------------------------------------------------------------------------- on a GPU
# Each of these runs on the CPU too, so the checks themselves are exercised on machines without a GPU.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def _modules_of(algorithm: object) -> list[torch.nn.Module]:
    """Modules a method holds itself: a server head or generator, a shared model's or W_h's trainer."""
    held = [getattr(value, "module", value) for value in vars(algorithm).values()]
    return [module for module in held if isinstance(module, torch.nn.Module)]


def _assert_on(sim: Simulator, device: str) -> None:
    """The data, every module of the run and every server, client, initial and method-held tensor on ``device``."""
    data = [getattr(c, split) for c in [*sim.data.clients, *sim.data.unseen] for split in SPLITS]
    modules = [*(t.module for t in sim.trainers.values()), *_modules_of(sim.algorithm)]
    module_tensors = [t for module in modules for t in module.state_dict().values()]
    states = [*_tensors(sim.server), *_tensors(sim.clients), *_tensors(sim.initial_params)]
    held = [*_tensors(vars(sim.algorithm)), *_tensors(sim.algorithm.setup.initial_params)]
    assert states
    wrong = [t.device for t in [*data, *module_tensors, *states, *held] if t.device.type != device]
    assert not wrong, wrong[:3]


def _assert_finite(summary: dict[str, Any]) -> None:
    for section in ("personalized", "generalization"):
        assert math.isfinite(summary[section]["accuracy"]), section


def _run(raw: dict[str, Any]) -> Simulator:
    cfg = from_dict(raw)
    sim = Simulator(cfg, build_federated_data(cfg.data, cfg.seed), progress=False)
    _assert_finite(sim.run())
    return sim


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fedavg", "fedproto", "fedtgp", "fedgh", "fml", "fedkd", "feddistill"])
def test_two_rounds_keep_data_models_and_states_on_the_run_device(name: str, device: str) -> None:
    sim = _run(tiny_config(name, train={"rounds": 2}, run={"device": device}))
    _assert_on(sim, device)
    assert len(sim.history) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_fedali_on_the_run_device(device: str) -> None:
    from tests.test_fedali import fedali_config, synthetic_har

    cfg = fedali_config()
    cfg.run.device = device  # type: ignore[attr-defined]
    sim = Simulator(cfg, synthetic_har(), progress=False)  # type: ignore[arg-type]
    _assert_finite(sim.run())
    _assert_on(sim, device)


@cuda
@pytest.mark.parametrize("executor", ["batched", "auto"])
def test_the_batched_executor_on_cuda(executor: str) -> None:
    sim = _run(tiny_config("lg_fedavg", train={"rounds": 2}, run={"device": "cuda", "executor": executor}))
    assert type(sim.executor) is BatchedExecutor
    _assert_on(sim, "cuda")
    sequential = _run(tiny_config("lg_fedavg", train={"rounds": 2}, run={"device": "cuda"}))
    assert sim.history[-1]["personalized"]["accuracy"] == pytest.approx(
        sequential.history[-1]["personalized"]["accuracy"], abs=0.02
    )


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_resumes_on_its_device(tmp_path: Path, device: str) -> None:
    raw = tiny_config("fedproto", train={"rounds": 3}, run={"device": device})
    with interrupted_at(3):
        fedpal.run(raw, out=tmp_path / "run")
    checkpoint = RunDirectory(tmp_path / "run").load_checkpoint(device)
    assert all(t.device.type == device for t in _tensors(checkpoint["clients"]))
    resumed = fedpal.resume(tmp_path / "run")
    assert resumed.summary["rounds"] == 3
    _assert_finite(resumed.summary)
