"""The benchmarks' one scheduler (benchmarks/sweep.py `run_jobs`) and tuning choice (benchmarks/protocol.py
`best_candidate`), and each benchmark script driven through them with a stand-in for `fedpal run`: it must start every
run its plan counts, once, every seeded run after all the tuning runs it depends on and with the chosen point."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

from fedpal.report.run_reader import RunRecord

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def helpers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield importlib.import_module("sweep"), importlib.import_module("protocol")
    for name in ("sweep", "protocol", "run"):
        sys.modules.pop(name, None)


# ---------------------------------------------------------------------------------------------- run_jobs


def test_a_stage_unlocks_its_followers_only_after_all_its_jobs_ended(helpers) -> None:
    sweep, _ = helpers
    ended: list[str] = []

    def job(name: str, stage: str | None = None, seconds: float = 0.0):
        def start() -> float:
            time.sleep(seconds)
            ended.append(name)
            return seconds

        return sweep.Job(name, start, stage)

    def then(stage):
        return [job(f"after {stage}")]

    first = [job("a1", "A", 0.05), job("a2", "A", 0.2), job("b1", "B", 0.0)]
    assert sweep.run_jobs(first, 2, then) == []
    assert ended.index("after A") > max(ended.index("a1"), ended.index("a2"))
    assert ended.index("after B") > ended.index("b1")
    assert sorted(ended) == ["a1", "a2", "after A", "after B", "b1"]


def test_unlocked_work_runs_before_the_jobs_queued_earlier(helpers) -> None:
    """One worker: A's followers start before the B and C tuning jobs that were queued first, in their own order."""
    sweep, _ = helpers
    started: list[str] = []

    def job(name: str, stage: str | None = None):
        return sweep.Job(name, lambda: started.append(name) or 0.0, stage)

    def then(stage):
        return [job(f"{stage} seed0"), job(f"{stage} seed1")] if stage == "A" else []

    first = [job("a1", "A"), job("a2", "A"), job("b1", "B"), job("c1", "C")]
    assert sweep.run_jobs(first, 1, then) == []
    assert started == ["a1", "a2", "A seed0", "A seed1", "b1", "c1"]


def test_a_failed_job_is_returned_and_its_stage_unlocks_nothing(helpers, capsys) -> None:
    sweep, _ = helpers

    def fail() -> float:
        raise RuntimeError("exit 1")

    unlocked: list[object] = []

    def then(stage):
        unlocked.append(stage)
        return []

    first = [sweep.Job("bad", fail, "A"), sweep.Job("good", lambda: 1.0, "A"), sweep.Job("other", lambda: 1.0, "B")]
    assert sweep.run_jobs(first, 2, then) == ["bad"]
    assert unlocked == ["B"]
    assert "bad: FAILED exit 1" in capsys.readouterr().out


def test_at_most_jobs_run_at_once(helpers) -> None:
    sweep, _ = helpers
    lock, running, peak = threading.Lock(), [0], [0]

    def start() -> float:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return 0.0

    assert sweep.run_jobs([sweep.Job(str(i), start) for i in range(8)], 3) == []
    assert peak[0] == 3


# ---------------------------------------------------------------------------------------------- best_candidate


def tuning_run(path: Path, accuracy: float) -> Path:
    path.mkdir(parents=True)
    summary = {"validation": {"accuracy": accuracy, "loss": 0.5}}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text("")
    return path


def test_best_candidate_waits_for_every_run_and_breaks_ties_towards_the_earlier_point(helpers, tmp_path) -> None:
    _, protocol = helpers
    a, b, c = protocol.grid([("train.lr", (0.01, 0.1, 1.0))])
    first, second = tuning_run(tmp_path / "a", 0.7), tuning_run(tmp_path / "b", 0.9)
    assert protocol.best_candidate([(a, first), (b, second), (c, tmp_path / "c")]) is None  # c not finished
    tuning_run(tmp_path / "c", 0.9)
    assert protocol.best_candidate([(a, first), (b, second), (c, tmp_path / "c")]) == b
    diverged = tuning_run(tmp_path / "d", float("nan"))
    assert protocol.best_candidate([(c, diverged), (a, first)]) == a


# ---------------------------------------------------------------------------------------------- the scripts


def load(script: str, monkeypatch) -> ModuleType:
    name = f"bench_{script.replace('/', '_')[:-3]}"
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


class StandIn:
    """`fedpal run` without training: a finished run whose validation accuracy is the same for every point (so the
    earliest grid point is chosen), remembering what was started in which order."""

    def __init__(self) -> None:
        self.started: list[tuple[Path, list[str]]] = []
        self.lock = threading.Lock()

    def run_config(self, config: Path, path: Path, overrides: list[str]) -> float:
        with self.lock:
            assert all(p != path for p, _ in self.started), f"{path} started twice"
            self.started.append((path, list(overrides)))
        tuning_run(path, 0.5)
        return 0.0

    def pretrain_config(self, config: Path, path: Path, overrides: list[str]) -> float:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("weights")
        return 0.0

    def check_order(self) -> tuple[list[tuple[Path, list[str]]], list[tuple[Path, list[str]]]]:
        """(tuning, seeded) runs; anything else started is a grid-edge probe (``probes``)."""
        tuning = [(p, o) for p, o in self.started if p.name.startswith("tune")]
        seeded = [(p, o) for p, o in self.started if p.name.startswith("seed")]
        assert len(tuning) + len(seeded) + len(self.named("probe")) + len(self.named("beyond")) == len(self.started)
        return tuning, seeded

    def named(self, prefix: str) -> list[tuple[Path, list[str]]]:
        """The runs whose directory name starts with ``prefix`` (pFLAlign's grid-edge probes and the seeds beyond)."""
        return [(p, o) for p, o in self.started if p.name.startswith(prefix)]


def stand_in(monkeypatch, module: ModuleType) -> StandIn:
    fake = StandIn()
    monkeypatch.setattr(module, "run_config", fake.run_config)
    if hasattr(module, "pretrain_config"):
        monkeypatch.setattr(module, "pretrain_config", fake.pretrain_config)
    return fake


def numbers(lines: list[str], what: str) -> int:
    return sum(int(n) for line in lines for n in re.findall(rf"(\d+) {what}", line))


def test_pflalign_runs_its_plan_and_seeds_after_tuning(helpers, monkeypatch, tmp_path) -> None:
    bench = load("pflalign/run.py", monkeypatch)
    fake = stand_in(monkeypatch, bench)
    settings, methods, seeds = list(bench.SETTINGS), list(bench.METHODS), [0, 1, 2]
    assert bench.run_all(tmp_path, settings, methods, seeds, 2, False, []) == []
    total = int(re.search(r"(\d+) runs", bench.plan(settings, methods, seeds, 2)[-1]).group(1))
    tuning, seeded = fake.check_order()
    position = {p: i for i, (p, _) in enumerate(fake.started)}
    # every point scores alike, so every choice is its grid's first point, on the edge: one probe a rung below it
    # for each tuned method, after that method's tuning, never used as the choice
    owners = {(p.parent.parent.name, p.parent.name) for p, _ in tuning}
    assert len(fake.started) == total + len(owners) == len(tuning) + len(seeded) + len(owners)
    assert not fake.named("beyond")  # a probe that only ties the choice unlocks nothing
    for path, overrides in fake.named("probe"):
        setting, method = path.parent.parent.name, path.parent.name
        first = bench.candidates(tmp_path, setting, method)[0]
        key = "algorithm.lr_scale" if method == bench.PFLALIGN or method in bench.RETUNED else "train.lr"
        edge = float(next(o.split("=")[1] for o in first.overrides if o.startswith(key)))
        assert f"{key}={bench.beyond(edge, upward=False)}" in overrides and "seed=100" in overrides
        assert all(o in overrides for o in first.overrides if not o.startswith(key))
        assert bench.chosen(tmp_path, setting, method) == first
        mine = [p for p, _ in tuning if (p.parent.parent.name, p.parent.name) == (setting, method)]
        assert max(position[p] for p in mine) < position[path]
    for path, overrides in seeded:
        setting, method = path.parent.parent.name, path.parent.name
        owner = bench.tuned_as(method)
        tuned = [p for p, _ in tuning if p.parent.name == owner and p.parent.parent.name == setting]
        assert tuned and max(position[p] for p in tuned) < position[path]
        pick = bench.chosen(tmp_path, setting, method)
        assert all(o in overrides for o in pick.overrides)


def test_pflalign_runs_the_seeds_beyond_the_grid_only_where_a_probe_wins(helpers, monkeypatch, tmp_path) -> None:
    bench = load("pflalign/run.py", monkeypatch)
    fake = stand_in(monkeypatch, bench)
    plain = fake.run_config

    def probes_win(config: Path, path: Path, overrides: list[str]) -> float:
        plain(config, path, overrides)
        if path.name.startswith("probe") and path.parent.name == "fedavg":  # only FedAvg's probe beats its choice
            (path / "summary.json").write_text(json.dumps({"validation": {"accuracy": 0.9, "loss": 0.5}}))
        return 0.0

    monkeypatch.setattr(bench, "run_config", probes_win)
    assert bench.run_all(tmp_path, ["mnist"], ["fedavg", "ditto"], [0, 1], 1, False, []) == []
    position = {p: i for i, (p, _) in enumerate(fake.started)}
    beyond = fake.named("beyond")
    assert sorted(p.name for p, _ in beyond) == ["beyond_seed0", "beyond_seed1"]
    ((probe, probe_overrides),) = [(p, o) for p, o in fake.named("probe") if p.parent.name == "fedavg"]
    for path, overrides in beyond:
        assert path.parent.name == "fedavg" and position[probe] < position[path]
        assert [o for o in overrides if o.startswith("train.lr=")] == ["train.lr=0.01"]
        assert [o for o in probe_overrides if o.startswith("train.lr=")] == ["train.lr=0.01"]
    assert bench.chosen(tmp_path, "mnist", "fedavg").label == "lr=0.03"  # the probe never becomes the choice


def test_fedmosaic_runs_its_plan(helpers, monkeypatch, tmp_path) -> None:
    bench = load("fedmosaic/run.py", monkeypatch)
    fake = stand_in(monkeypatch, bench)
    tune_jobs = [(m, c) for m in bench.METHODS for c in bench.candidates()]
    jobs = [(s, m, seed) for s in bench.SETTINGS for m in bench.methods_of(s) for seed in (0, 1, 2)]
    assert bench.run_all(tmp_path, tune_jobs, jobs, 2, []) == []
    tuning, seeded = fake.check_order()
    assert (len(tuning), len(seeded)) == (len(tune_jobs), len(jobs))
    for path, overrides in seeded:
        assert all(o in overrides for o in bench.chosen(tmp_path, path.parent.name).overrides)


@pytest.mark.parametrize("script", ["fedali/run.py", "htfl/claims.py"])
def test_fedali_and_protonorm_claims_run_their_plan(helpers, monkeypatch, tmp_path, script: str) -> None:
    bench = load(script, monkeypatch)
    fake = stand_in(monkeypatch, bench)
    settings = list(bench.SETTINGS if script.startswith("fedali") else bench.DEFAULT_SETTINGS)
    names = list(bench.VARIANTS if script.startswith("fedali") else bench.METHODS)
    seeds = [0, 1, 2, 3, 4]
    lines = bench.plan(settings, names, seeds, 2)
    if script.startswith("fedali"):
        assert bench.run_all(tmp_path, settings, names, seeds, 2, []) == []
    else:
        for setting in settings:
            assert bench.run_setting(tmp_path, setting, names, seeds, 2, [], 5) == []
    tuning, seeded = fake.check_order()
    assert (len(tuning), len(seeded)) == (numbers(lines, "tuning runs"), numbers(lines, "seeded runs"))
    if not script.startswith("fedali"):  # the unseen-clients setting reuses its base setting's tuning
        assert any(bench.TUNED_IN.get(p.parent.parent.name) for p, _ in seeded)
        for path, overrides in seeded:
            setting, method = path.parent.parent.name, path.parent.name
            pick = bench.chosen(tmp_path, bench.TUNED_IN.get(setting, setting), method)
            assert all(o in overrides for o in pick.overrides)
            assert ("data.unseen_clients=4" in overrides) == (setting in bench.TUNED_IN)


def test_a_resumed_fedali_sweep_pretrains_only_the_encoders_its_unfinished_runs_read(monkeypatch, tmp_path) -> None:
    """Encoders are not archived: on a fresh machine with every run restored, nothing is pre-trained again; with one
    seeded run missing, exactly the encoder that run starts from is made, then the run."""
    bench = load("fedali/run.py", monkeypatch)
    stand_in(monkeypatch, bench)
    settings, names, seeds = list(bench.SETTINGS), list(bench.VARIANTS), [0, 1]
    assert bench.run_all(tmp_path, settings, names, seeds, 2, []) == []
    for encoder in (tmp_path / "pretrained").iterdir():
        encoder.unlink()
    missing = bench.run_path(tmp_path, "shift", "fedprox", "seed1")
    shutil.rmtree(missing)

    made: list[str] = []
    redone: list[Path] = []

    def run_config(config: Path, path: Path, overrides: list[str]) -> float:  # sweep.run_config keeps finished runs
        if not (path / "summary.json").exists():
            redone.append(path)
            tuning_run(path, 0.5)
        return 0.0

    monkeypatch.setattr(bench, "run_config", run_config)
    monkeypatch.setattr(bench, "pretrain_config", lambda config, path, overrides: made.append(path.name) or 0.0)
    assert bench.run_all(tmp_path, settings, names, seeds, 2, []) == []
    assert made == ["shift-plain-seed1.pt"]
    assert redone == [missing]


def test_fedfomo_and_robustness_run_their_plan(helpers, monkeypatch, tmp_path) -> None:
    fomo = load("fedfomo/run.py", monkeypatch)
    fake = stand_in(monkeypatch, fomo)
    settings, methods = list(fomo.SETTINGS), list(fomo.METHODS)
    assert fomo.run_all(tmp_path / "fomo", settings, methods, [0, 1, 2], 2, []) == []
    tuning, seeded = fake.check_order()
    expected = sum(len(fomo.RUNS[s]) * (3 if s != "latent_100" else 1) for s in settings)
    assert len(seeded) == expected and tuning

    robust = load("robustness/run.py", monkeypatch)
    fake = stand_in(monkeypatch, robust)
    root = tmp_path / "robust"
    robust.execute(robust.FULL, root, [0, 1, 2], 2, [], False)
    lines = robust.plan_lines(robust.FULL, tmp_path / "nothing", [0, 1, 2], 2, False)
    total = int(re.search(r"Total: (\d+) runs", "\n".join(lines)).group(1))
    assert len(fake.started) == total


# ---------------------------------------------------------------------------------------------- one run


TINY_TOML = """seed = 3
[data]
dataset = "digits"
num_clients = 4
max_samples = 400
[model]
name = "mlp"
hidden_dim = 16
feature_dim = 8
[train]
rounds = 2
threads = 1
lr = 0.1
[run]
progress = false
[algorithm]
name = "fedavg"
"""


def test_a_sweep_run_forked_from_the_preloaded_server_equals_a_fresh_interpreter(helpers, strip_wall, tmp_path) -> None:
    """sweep runs each fedpal command in a child of a fork server that imported torch and fedpal once: the run must be
    the one `python -m fedpal run` gives, and bad input must come back as its exit code and its one line."""
    import subprocess

    sweep, _ = helpers
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    sweep.run_config(config, tmp_path / "forked", ["algorithm.name=fedprox"])
    fresh = tmp_path / "fresh"
    command = [sys.executable, "-m", "fedpal", "run", str(config), "--out", str(fresh), "--quiet"]
    subprocess.run([*command, "--set", "algorithm.name=fedprox"], check=True, capture_output=True)

    def read(folder: Path) -> tuple[object, ...]:
        summary = json.loads((folder / "summary.json").read_text())
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return strip_wall(summary), strip_wall(metrics)

    assert read(tmp_path / "forked") == read(fresh)
    with pytest.raises(RuntimeError, match=r"exit 2: fedpal: error: .*train\.lr"):
        sweep.run_config(config, tmp_path / "bad", ["train.lr=-1"])


def test_fedali_compares_with_the_strongest_baseline_of_each_metric_also_at_the_selected_round(monkeypatch) -> None:
    """The issue's reporting: FedAli against the best-mean baseline of each metric, at the last round and at the
    round validation selected, paired by seed. Here FedAvg wins the last round and FedPer the selected one, so each
    row must pair FedAli with a different baseline; a diverged seed is left out of the means and the pairs (counted,
    FedAvg's would lose the last round to FedPer)."""
    bench = load("fedali/run.py", monkeypatch)

    def record(seed: int, last: float, selected: float, rejected: int = 0) -> RunRecord:
        summary = {
            "seed": seed,
            "rejected_replies": rejected,
            "validation": {"loss": 0.1},
            "last_round": {"personalized": {"macro_f1": last}},
            "selected_round": {"personalized": {"macro_f1": selected}},
        }
        return RunRecord(Path(f"seed{seed}"), summary)

    found = {
        "fedali": [record(0, 0.80, 0.70), record(1, 0.82, 0.72), record(2, 0.90, 0.72)],
        "fedavg": [record(0, 0.85, 0.60), record(1, 0.86, 0.61), record(2, 0.10, 0.10, rejected=1)],
        "fedper": [record(0, 0.70, 0.75), record(1, 0.71, 0.78), record(2, 0.70, 0.75)],
        "local": [record(0, 0.80, 0.80), record(1, 0.80, 0.80), record(2, 0.80, 0.80)],
    }
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in bench.comparison_table(found)[4:-1]}
    last, selected = rows["Pers. F1"], rows["Pers. F1 (val. round)"]
    assert last[0] == "fedavg" and last[1].startswith("-4.50 [") and last[1].endswith("(n = 2)")
    assert selected[0] == "fedper" and selected[1].startswith("-4.67 [") and selected[1].endswith("(n = 3)")
    assert selected[2].startswith("-8.67 [") and selected[2].endswith("(n = 3) |")
