"""MAE pre-training of the HART(+ALP) encoder: label-free, deterministic, banks tied, checkpoints that load into
both HART variants, `model.pretrained` for every method, and the `fedpal pretrain` / `fedpal run` stages."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch

from fedpal import api, runner
from fedpal.cli import main
from fedpal.common.seeding import derive_seed
from fedpal.config import ExperimentConfig, ModelConfig, PretrainConfig, all_keys, from_dict, read_toml
from fedpal.data.client_data import ClientData, FederatedData
from fedpal.engine.assembly import build_algorithm
from fedpal.errors import ConfigError, UserError
from fedpal.models.alp import alp_layers
from fedpal.models.registry import build_model
from fedpal.pretraining import (
    PRETRAINED_FILE,
    load_pretrained,
    pretrain_mae,
    read_pretrained,
    run_pretraining,
    save_pretrained,
)
from fedpal.pretraining.mae import masked_count, model_options, window_frames

MODEL = ModelConfig(name="hart_alp", width=16, blocks=2, bank_sizes=[8, 4], feature_dim=8, hidden_dim=16)
FAST = {"method": "mae", "epochs": 2, "batch_size": 32, "lr": 3e-3}


def ramps(n: int, seed: int = 0) -> torch.Tensor:
    """Learnable windows [n, 6, 128]: per channel a level plus a slope, so hidden frames follow from visible ones."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(128).float() / 128 - 0.5
    return torch.randn(n, 6, 1, generator=g) + torch.randn(n, 6, 1, generator=g) * t


class Poison:
    """Stands in for labels and non-training data: any use of it fails the test."""

    def _fail(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError("pre-training touched labels or non-training data")

    __getattr__ = __getitem__ = __len__ = __iter__ = __array__ = _fail

    @classmethod
    def __torch_function__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError("pre-training touched labels or non-training data")


def poisoned_federation() -> FederatedData:
    """Three training clients whose only readable field is train_x; one held-out client that is all poison."""
    clients = [
        ClientData(ramps(40, seed=i), Poison(), Poison(), Poison(), Poison(), Poison())  # type: ignore[arg-type]
        for i in range(3)
    ]
    unseen = [ClientData(*[Poison()] * 6)]  # type: ignore[arg-type]
    return FederatedData("synthetic", 3, ("a", "b", "c"), (6, 128), clients, unseen=unseen)


def federation(clients: int = 3) -> FederatedData:
    """A small labelled [6, 128] federation for whole runs."""
    g = torch.Generator().manual_seed(1)
    made = []
    for i in range(clients):
        split = {
            name: (ramps(k, seed=10 * i + j), torch.randint(0, 3, (k,), generator=g))
            for j, (name, k) in enumerate((("train", 40), ("val", 8), ("test", 12)))
        }
        made.append(ClientData(*split["train"], *split["val"], *split["test"]))
    return FederatedData("synthetic", 3, ("a", "b", "c"), (6, 128), made)


def config(tiny: Callable[..., dict[str, Any]], name: str = "fedavg", **sections: Any) -> ExperimentConfig:
    raw = tiny(name, model={"name": "hart_alp", "width": 16, "blocks": 2, "bank_sizes": [8, 4], "feature_dim": 8})
    raw["pretrain"] = dict(FAST)
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return from_dict(raw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = pretrain_mae(ramps(96), MODEL, PretrainConfig(**FAST), seed=0)  # type: ignore[arg-type]
    return save_pretrained(tmp_path_factory.mktemp("ckpt") / "pre.pt", result.tensors, {"losses": result.losses})


def test_pretrain_config_section_is_validated_and_listed() -> None:
    assert {"pretrain.method", "pretrain.bank_beta", "pretrain.warmup_epochs"} <= set(all_keys())
    with pytest.raises(ConfigError, match=r"pretrain\.mask_ratio"):
        from_dict({"pretrain": {"mask_ratio": 1.0}})
    with pytest.raises(ConfigError, match=r"pretrain\.method"):
        from_dict({"pretrain": {"method": "simclr"}})
    with pytest.raises(UserError, match="hides 0 of the 8"):
        masked_count(0.1, 8)
    assert masked_count(0.5, 8) == 4  # the spec's 4 of 8 frames


def test_frames_are_channel_major_sixteen_samples() -> None:
    x = torch.arange(2 * 6 * 128).float().reshape(2, 6, 128)
    frames = window_frames(x)
    assert frames.shape == (2, 8, 96)
    assert torch.equal(frames[1, 3, 16:32], x[1, 1, 48:64])  # frame 3, channel 1


def test_labels_and_held_out_clients_are_never_read(tiny: Callable[..., dict[str, Any]]) -> None:
    result = run_pretraining(config(tiny, pretrain={"epochs": 1}), poisoned_federation())
    assert result.windows == 120 and len(result.losses) == 1


def test_masked_frame_loss_decreases() -> None:
    p = PretrainConfig(**{**FAST, "epochs": 6})  # type: ignore[arg-type]
    losses = pretrain_mae(ramps(256), MODEL, p, seed=0).losses
    assert losses[-1] < 0.8 * losses[0], losses


def test_same_seed_same_checkpoint_and_global_rng_untouched() -> None:
    p = PretrainConfig(**FAST)  # type: ignore[arg-type]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = pretrain_mae(ramps(64), MODEL, p, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = pretrain_mae(ramps(64), MODEL, p, seed=0)
    c = pretrain_mae(ramps(64), MODEL, p, seed=1)
    assert a.losses == b.losses
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not all(torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


def test_banks_end_tied_and_moved() -> None:
    result = pretrain_mae(ramps(64), MODEL, PretrainConfig(**FAST), seed=0)  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(0, "pretrain", "init"))
        fresh = build_model("hart_alp", (6, 128), 2, 8, 16, "linear", model_options(MODEL))
    banks = [n for n in result.tensors if n.endswith("local_bank")]
    assert len(banks) == 2 and list(alp_layers(fresh))
    state = fresh.state_dict()
    for name in banks:
        assert torch.equal(result.tensors[name], result.tensors[name.replace("local_bank", "global_bank")])
        assert not torch.allclose(result.tensors[name], state[name])
    assert not any(n.startswith(("head.", "backbone.dense.")) for n in result.tensors)


def test_load_into_hart_skips_banks_and_glus(checkpoint: Path) -> None:
    tensors, _ = read_pretrained(checkpoint)
    model = build_model("hart", (6, 128), 3, 8, 16, "linear", model_options(MODEL))
    report = load_pretrained(model, checkpoint)
    assert set(report.unused) == {n for n in tensors if ".alp." in n}
    assert any(n.endswith("glu.linear.weight") for n in report.unused)
    assert set(report.loaded) == {n for n in tensors if ".alp." not in n}
    assert set(report.kept) == {"head.weight", "head.bias", "backbone.dense.weight", "backbone.dense.bias"}
    state = model.state_dict()
    assert all(torch.equal(state[n], tensors[n]) for n in report.loaded)


def test_load_into_hart_alp_loads_the_whole_encoder(checkpoint: Path) -> None:
    tensors, _ = read_pretrained(checkpoint)
    model = build_model("hart_alp", (6, 128), 3, 8, 16, "linear", model_options(MODEL))
    report = load_pretrained(model, checkpoint)
    assert report.unused == [] and set(report.loaded) == set(tensors)
    assert set(report.kept) == {"head.weight", "head.bias", "backbone.dense.weight", "backbone.dense.bias"}
    state = model.state_dict()
    assert all(torch.equal(state[n], tensors[n]) for n in tensors)


def test_bad_checkpoints_are_one_line_user_errors(checkpoint: Path, tmp_path: Path) -> None:
    wider = build_model("hart", (6, 128), 3, 8, 16, "linear", {**model_options(MODEL), "width": 32})
    with pytest.raises(UserError, match="does not fit the model"):
        load_pretrained(wider, checkpoint)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for path in (garbage, tmp_path / "missing.pt"):
        with pytest.raises(UserError) as info:
            load_pretrained(wider, path)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="matches no tensor"):
        load_pretrained(build_model("mlp", (6, 128), 3, 8, 16, "linear"), checkpoint)


def test_every_method_starts_from_the_checkpoint(tiny: Callable[..., dict[str, Any]], checkpoint: Path) -> None:
    data = federation()
    tensors, _ = read_pretrained(checkpoint)
    initial = {}
    for name in ("fedavg", "fedprox"):
        algorithm, _ = build_algorithm(config(tiny, name, model={"pretrained": str(checkpoint)}), data)
        initial[name] = algorithm.setup.initial_params
        assert all(torch.equal(algorithm.setup.initial_params[k], tensors[k]) for k in tensors)
    assert initial["fedavg"].keys() == initial["fedprox"].keys()
    assert all(torch.equal(initial["fedavg"][k], initial["fedprox"][k]) for k in initial["fedavg"])
    scratch, _ = build_algorithm(config(tiny), data)
    assert not torch.equal(
        scratch.setup.initial_params["backbone.position.weight"], tensors["backbone.position.weight"]
    )


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return int(code), out, err


def test_cli_pretrain_needs_method_mae(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny: Callable[..., dict[str, Any]]
) -> None:
    from fedpal.config import to_toml

    path = tmp_path / "c.toml"
    path.write_text(to_toml(tiny()))
    for extra in (["--set", "pretrain.method=none"], ["--set", "pretrain.method=mae", "--set", "pretrain.lr=0"]):
        code, out, err = cli(capsys, "pretrain", path, *extra, "--out", tmp_path / "p.pt")
        assert code == 2 and out == "" and "Traceback" not in err
        assert len(err.splitlines()) == 1 and err.startswith("fedpal: error:"), err
    assert not (tmp_path / "p.pt").exists()


def test_cli_pretrain_writes_a_checkpoint(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny: Callable[..., dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedpal.config import to_toml

    monkeypatch.setattr("fedpal.data.federated.build_federated_data", lambda *a: federation())
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config(tiny).to_dict()))
    code, out, err = cli(capsys, "pretrain", path, "--quiet", "--out", tmp_path / "sub" / "p.pt")
    assert code == 0, err
    assert len(out.splitlines()) == 1 and "120 training windows" in out and "2 epochs" in out
    tensors, meta = read_pretrained(tmp_path / "sub" / "p.pt")
    assert meta["windows"] == 120 and len(meta["losses"]) == 2 and "backbone.position.weight" in tensors


def test_run_pretrains_once_and_resume_reuses_the_file(
    tmp_path: Path, tiny: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "build_federated_data", lambda *a: federation())
    cfg = config(tiny, model={"name": "hart"}, train={"rounds": 2, "batch_size": 16})
    result = api.run(cfg, out=tmp_path / "run")
    pretrained = tmp_path / "run" / PRETRAINED_FILE
    assert pretrained.is_file()
    saved = read_toml(tmp_path / "run" / "config.toml")
    assert saved["pretrain"]["method"] == "mae" and saved["model"]["pretrained"] == ""

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError("a resumed run pre-trained again")

    monkeypatch.setattr("fedpal.pretraining.stage.pretrain_to_file", refuse)
    resumed = api.resume(tmp_path / "run")
    assert json.dumps(resumed.summary["personalized"]) == json.dumps(result.summary["personalized"])


def test_run_without_a_directory_pretrains_in_a_scratch_folder(
    tiny: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "build_federated_data", lambda *a: federation())
    result = api.run(config(tiny, pretrain={"epochs": 1}, train={"rounds": 1, "batch_size": 16}))
    assert result.run_dir is None and result.config.model.pretrained == ""
    assert result.summary["rounds"] == 1


def test_a_resumed_run_keeps_its_pretrained_file_across_keys_added_later() -> None:
    from fedpal.config import ExperimentConfig
    from fedpal.pretraining.stage import fingerprint, same_settings

    default = fingerprint(ExperimentConfig())
    current = fingerprint(ExperimentConfig())
    assert same_settings(current, current, default)
    older = {**current, "pretrain": {k: v for k, v in current["pretrain"].items() if k != "public_samples"}}
    assert same_settings(older, current, default)  # a key added since, at its default: same result
    changed = {**current, "pretrain": {**current["pretrain"], "public_samples": 7}}
    assert not same_settings(older, changed, default)  # ... not at its default: made again
    assert not same_settings({**current, "gone": 1}, current, default)  # a key the current config lacks
    assert not same_settings({**current, "seed": 5}, current, default)
