"""The benchmark scripts' run archive (benchmarks/sweep.py): a finished run's summary, metrics and config survive the
loss of its run directory, so a sweep resumes on a fresh clone and its report reads the same runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def sweep(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("sweep")
    monkeypatch.setattr(module, "_kept", None)
    yield module
    sys.modules.pop("sweep", None)


def finished_run(path: Path) -> dict[str, str]:
    files = {
        "summary.json": '{"seed": 3, "rounds": 2}',
        "metrics.jsonl": '{"round": 1}\n{"round": 2}\n',
        "config.toml": "seed = 3\n",
        "partition.md": "not kept\n",
    }
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return files


def options(tmp_path: Path, archive: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(runs=str(tmp_path / "runs"), out=str(tmp_path / "out"), archive=archive)


def test_a_finished_run_is_restored_on_a_fresh_clone(sweep, tmp_path: Path) -> None:
    args = options(tmp_path)
    assert sweep.keep_finished(args) == 0
    run = tmp_path / "runs" / "mnist" / "fedavg" / "tune_lr0.1"  # a dot in the name, as tuning labels have
    files = finished_run(run)
    sweep._archive(run)
    assert (tmp_path / "out" / "finished" / "mnist" / "fedavg" / "tune_lr0.1.json.gz").is_file()

    for path in sorted((tmp_path / "runs").rglob("*"), reverse=True):  # the clone has no run directories
        path.unlink() if path.is_file() else path.rmdir()
    assert sweep.keep_finished(args) == 1
    for name in sweep.KEPT_FILES:
        assert (run / name).read_text() == files[name]
    assert not (run / "partition.md").exists()  # only what the reports read is kept
    assert sweep.keep_finished(args) == 0  # a run already there is left alone


def test_archive_none_keeps_nothing(sweep, tmp_path: Path) -> None:
    assert sweep.keep_finished(options(tmp_path, archive="none")) == 0
    run = tmp_path / "runs" / "r"
    finished_run(run)
    sweep._archive(run)
    assert not (tmp_path / "out").exists()
