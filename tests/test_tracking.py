"""run.log_to: every evaluation's numbers reach TensorBoard, MLflow and W&B (offline) as they are in metrics.jsonl,
the config goes along as parameters, and a resumed run continues the same tracker run."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

import fedpal
from fedpal.cli import main
from fedpal.config import to_toml
from fedpal.engine.simulator import Simulator
from fedpal.engine.tracking import scalars


@pytest.fixture
def config_path(tiny, tmp_path: Path):
    def write(trackers: list[str], rounds: int = 2) -> Path:
        path = tmp_path / "tiny.toml"
        path.write_text(to_toml(tiny(train={"rounds": rounds}, run={"log_to": trackers, "progress": False})))
        return path

    return write


def interrupted_then_resumed(config: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> fedpal.Result:
    """Stop a run before round 2 (as Ctrl-C would), then resume it."""
    original = Simulator.run_round

    def run_round(self: Simulator, round: int) -> None:
        if round == 2:
            raise KeyboardInterrupt
        original(self, round)

    with monkeypatch.context() as patch:
        patch.setattr(Simulator, "run_round", run_round)
        with pytest.raises(KeyboardInterrupt):
            fedpal.run(str(config), out=out)
    return fedpal.resume(out)


def accuracy_by_round(metrics: list[dict[str, Any]]) -> dict[int, float]:
    return {m["round"]: m["personalized"]["accuracy"] for m in metrics}


def test_metrics_also_go_to_tensorboard(config_path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fedpal.run(str(config_path(["tensorboard"])), out=tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("personalized/accuracy")
    assert [e.step for e in accuracy] == [m["round"] for m in result.metrics]
    assert [e.value for e in accuracy] == pytest.approx([m["personalized"]["accuracy"] for m in result.metrics])


def test_metrics_and_config_go_to_a_local_mlflow_store(config_path, tmp_path: Path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    result = interrupted_then_resumed(config_path(["mlflow"], rounds=3), out, monkeypatch)
    client = mlflow.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("fedpal").experiment_id])
    assert len(runs) == 1  # the resume continued the run it started
    run = runs[0]
    assert run.info.run_id == (out / "mlflow_run_id").read_text().strip() and run.info.status == "FINISHED"
    assert run.data.params["algorithm.name"] == "fedavg" and run.data.params["train.rounds"] == "3"
    history = client.get_metric_history(run.info.run_id, "personalized/accuracy")
    logged = {m.step: m.value for m in history}  # round 2 may be logged twice (identical) across the resume
    assert logged == pytest.approx(accuracy_by_round(result.metrics))
    assert set(run.data.metrics) == set(scalars(result.metrics[-1]))


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a W&B offline run file (W&B's framing: a 7-byte header, then 32 KiB blocks of
    records with a 4-byte checksum, a 2-byte length and a 1-byte type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_metrics_and_config_go_to_an_offline_wandb_run(config_path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    result = fedpal.run(str(config_path(["wandb"])), out=out)
    run_id = (out / "wandb_run_id").read_text().strip()
    files = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1  # offline: nothing was sent anywhere
    logged: dict[int, float] = {}
    config: dict[str, Any] = {}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            if "personalized/accuracy" in items:
                logged[int(items["_step"])] = items["personalized/accuracy"]
        elif kind in ("run", "config"):  # the config comes with the run record (and any later update)
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
    assert logged == pytest.approx(accuracy_by_round(result.metrics))
    assert config["algorithm"]["name"] == "fedavg" and config["train"]["rounds"] == 2


def test_a_missing_tracker_library_is_one_line(capsys, config_path, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "mlflow", None)  # as if not installed
    code = main(["run", str(config_path(["mlflow"])), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'fedpal[mlflow]'" in err and "Traceback" not in err


def test_an_unknown_or_repeated_tracker_is_one_line(capsys, config_path) -> None:
    for trackers in (["mlflw"], ["wandb", "wandb"]):
        code = main(["run", str(config_path(trackers)), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and "run.log_to" in err and "tensorboard, mlflow, wandb" in err
