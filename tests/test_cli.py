"""The `fedpal` command line: one-line errors with exit code 2 for bad input, and the run directory it writes."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedpal.cli import main
from fedpal.config import to_toml
from fedpal.engine.simulator import Simulator

SUMMARY_KEYS = [
    ("algorithm",),
    ("dataset",),
    ("seed",),
    ("rounds",),
    ("personalized", "accuracy"),
    ("personalized", "accuracy_unweighted"),
    ("personalized", "accuracy_std"),
    ("personalized", "accuracy_worst10"),
    ("personalized", "macro_f1"),
    ("generalization", "accuracy"),
    ("generalization", "macro_f1"),
    ("selected_round", "round"),
    ("selected_round", "personalized", "accuracy"),
    ("selected_round", "generalization", "accuracy"),
    ("selected_round", "validation", "loss"),
    ("bytes", "up"),
    ("bytes", "down"),
    ("wall_seconds",),
]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``fedpal ARGV`` in-process; return (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return int(code), out, err


def assert_one_line_error(code: int, err: str, fragment: str = "") -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedpal: error:"), err
    assert fragment in lines[0]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default output paths (runs/...) land in the test's own directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def write_config(tiny, tmp_path: Path):
    def write(name: str = "tiny.toml", **sections) -> Path:
        path = tmp_path / name
        path.write_text(to_toml(tiny(sections.pop("algorithm_name", "fedavg"), **sections)))
        return path

    return write


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("text", "sets", "fragment"),
    [
        ("[train]\nround = 3\n", [], "did you mean 'train.rounds'?"),
        ('[train]\nrounds = "three"\n', [], "'train.rounds' must be int"),
        ("", ["train.rounds=abc"], "'train.rounds' must be int"),
        ("", ["train.lr=-1"], "'train.lr' must be > 0"),
        ("", ["algorithm.name=fedfoo"], "unknown algorithm 'fedfoo'"),
        ("", ["algorithm.name=fedprox", "algorithm.muu=1"], "did you mean 'algorithm.mu'?"),
        ("", ["data.dataset=nosuchdata"], "unknown dataset 'nosuchdata'"),
        ("", ["model.name=resnet9000"], "unknown model 'resnet9000'"),
        ("", ["model.name=har_cnn"], "needs signal inputs"),
        ("", ["data.num_clients=5000"], "more clients (5000) than samples"),
        ("", ["data.min_samples=1000"], "min_samples"),
        ("", ["data.partition=shards", "data.classes_per_client=20"], "classes_per_client"),
        ("", ["train.rounds"], "must be key=value"),
        ("[train\nrounds = 3\n", [], "not valid TOML"),
    ],
)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(
    capsys, tiny, tmp_path: Path, text: str, sets: list[str], fragment: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text or to_toml(tiny()))
    out = tmp_path / "out"
    argv = ["run", path, "--out", out, "--quiet"]
    for item in sets:
        argv += ["--set", item]
    code, _, err = cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_unusable_config_files(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = cli(capsys, "run", tmp_path / "absent.toml")
    assert_one_line_error(code, err, "config file not found")
    code, _, err = cli(capsys, "run", tmp_path)
    assert_one_line_error(code, err, "is a directory")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"seed = 1\n\xff\xfe\xfa\n")
    code, _, err = cli(capsys, "run", binary)
    assert_one_line_error(code, err, "not valid TOML")

    locked = tmp_path / "locked.toml"
    locked.write_text("seed = 1\n")
    original = Path.open

    def refuse(self: Path, *args, **kwargs):  # chmod 000 does not stop root, so refuse as the OS would
        if self.name == "locked.toml":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    code, _, err = cli(capsys, "run", locked)
    assert_one_line_error(code, err, "not readable")
    assert not (tmp_path / "runs").exists()  # no default run directory was started


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["run"],
        ["frobnicate"],
        ["run", "x.toml", "--bogus"],
        ["compare", "x.toml"],  # --algorithms is required
        ["datasets", "remove"],
        ["report"],
    ],
)
def test_argparse_errors_are_one_line_exit_2(capsys, argv: list[str]) -> None:
    code, out, err = cli(capsys, *argv)
    assert_one_line_error(code, err)
    assert out == ""


def test_other_commands_report_bad_input_in_one_line(capsys, write_config, tmp_path: Path) -> None:
    config = write_config()
    code, _, err = cli(capsys, "resume", tmp_path / "nowhere")
    assert_one_line_error(code, err, "run directory not found")
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "resume", tmp_path / "empty")
    assert_one_line_error(code, err, "config file not found")
    code, _, err = cli(capsys, "report", tmp_path / "nowhere")
    assert_one_line_error(code, err)
    code, _, err = cli(capsys, "compare", config, "--algorithms", "fedavg,fedfoo", "--out", tmp_path / "cmp")
    assert_one_line_error(code, err, "unknown algorithm 'fedfoo'")
    assert not (tmp_path / "cmp").exists()  # everything is validated before the first run
    code, _, err = cli(capsys, "compare", config, "--algorithms", "fedavg", "--seeds", "a,b")
    assert_one_line_error(code, err, "--seeds")
    code, _, err = cli(capsys, "datasets", "install")
    assert_one_line_error(code, err, "usage")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = cli(capsys, "run", config, "--out", a_file / "run", "--quiet")
    assert_one_line_error(code, err, "cannot create run directory")


def test_real_process_bad_input_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    for argv in (["run", str(bad)], ["run"]):
        proc = subprocess.run(
            [sys.executable, "-m", "fedpal.cli", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120
        )
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("fedpal: error:")


# --------------------------------------------------------------------------------------------- a run end to end


def test_run_writes_a_complete_run_directory(capsys, write_config, strip_wall, metrics_of, tmp_path: Path) -> None:
    config = write_config(train={"rounds": 4}, eval={"every": 2, "generalization_samples": 200})
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "run", config, "--out", out, "--quiet")
    assert code == 0, err
    assert f"run directory: {out}" in stdout
    for name in ("config.toml", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (out / name).is_file()
    metrics = metrics_of(out)
    assert [e["round"] for e in metrics] == [2, 4]  # one line per evaluation, eval.every respected
    summary = json.loads((out / "summary.json").read_text())
    for path in SUMMARY_KEYS:
        node = summary
        for key in path:
            assert key in node, f"summary.json lacks {'.'.join(path)}"
            node = node[key]
    assert summary["algorithm"] == "fedavg" and summary["dataset"] == "digits"
    assert summary["seed"] == 0 and summary["rounds"] == 4
    assert summary["selected_round"]["round"] in (2, 4)
    assert summary["bytes"]["down"] > 0

    # the resolved config.toml reproduces the run
    code, _, err = cli(capsys, "run", out / "config.toml", "--out", tmp_path / "again", "--quiet")
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert strip_wall(again) == strip_wall(summary)

    # an existing run directory is refused and left as it was
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    code, _, err = cli(capsys, "run", config, "--out", out, "--quiet", "--set", "seed=3")
    assert_one_line_error(code, err, "already holds a run")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


def test_interrupted_run_then_resume(capsys, write_config, strip_wall, tmp_path: Path, monkeypatch) -> None:
    config = write_config(train={"rounds": 3})
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "ref", "--quiet")
    assert code == 0, err
    original = Simulator.run_round

    def run_round(self, round):
        if round == 2:
            raise KeyboardInterrupt
        original(self, round)

    with monkeypatch.context() as patch:
        patch.setattr(Simulator, "run_round", run_round)
        code, _, err = cli(capsys, "run", config, "--out", tmp_path / "run", "--quiet")
    assert code == 130 and f"fedpal resume {tmp_path / 'run'}" in err and "Traceback" not in err
    code, _, err = cli(capsys, "resume", tmp_path / "run", "--quiet")
    assert code == 0, err
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    reference = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert strip_wall(resumed) == strip_wall(reference)


def test_compare_and_report(capsys, write_config, tmp_path: Path) -> None:
    config = write_config(train={"rounds": 2})
    out = tmp_path / "cmp"
    code, stdout, err = cli(
        capsys, "compare", config, "--algorithms", "fedavg,local", "--seeds", "0,1", "--out", out, "--quiet"
    )
    assert code == 0, err
    for name in ("compare.md", "compare.csv", "accuracy_vs_round.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "accuracy_vs_round.png").read_bytes().startswith(b"\x89PNG")
    for algorithm in ("fedavg", "local"):
        for seed in (0, 1):
            summary = json.loads((out / algorithm / f"seed{seed}" / "summary.json").read_text())
            assert (summary["algorithm"], summary["seed"]) == (algorithm, seed)
    table = (out / "compare.csv").read_text()
    rows = list(csv.reader(io.StringIO(table)))
    assert any("fedavg" in row for row in rows) and any("local" in row for row in rows)
    assert "fedavg" in (out / "compare.md").read_text() and "fedavg" in stdout
    # the terminal shows the first columns, the file every column
    assert "Pers. acc (%)" in stdout and "Pers. worst-10% (%)" not in stdout
    assert "Pers. worst-10% (%)" in (out / "compare.md").read_text()

    report = tmp_path / "report"
    code, stdout, err = cli(capsys, "report", out / "fedavg" / "seed0", out / "local" / "seed0", "--out", report)
    assert code == 0, err
    for name in ("report.md", "accuracy_vs_round.png", "client_accuracy.png"):
        assert (report / name).is_file()
    assert "fedavg" in (report / "report.md").read_text() and "local" in (report / "report.md").read_text()


def test_algorithms_lists_builtins_with_defaults(capsys) -> None:
    code, out, _ = cli(capsys, "algorithms")
    assert code == 0
    lines = out.splitlines()
    for name in ("fedavg", "fedprox", "fedavg_ft", "local"):
        assert any(line.startswith(f"{name}:") for line in lines), out
    assert "    algorithms.fedprox.mu = 0.01" in lines  # the exact key a config or --set takes
    assert "    algorithms.fedavg_ft.finetune_epochs = 1" in lines
    assert any(line.startswith("fedali:") and "needs model.name = 'hart_alp'" in line for line in lines)
    assert any(line.startswith("fedproto:") and "any architectures (model.family)" in line for line in lines)
    fedali = lines.index(next(line for line in lines if line.startswith("fedali:")))
    assert (
        lines[fedali + 1]
        == "    recommended when unset: train.optimizer = 'adam', train.lr = 0.001, train.batch_size = 64"
    )
    # every key it prints is accepted as printed
    from fedpal.config import apply_overrides, from_dict

    from_dict(apply_overrides({"algorithm": {"name": "fedavg"}}, ["algorithms.fedprox.mu=0.01"]))


def test_models_lists_architectures_and_families(capsys) -> None:
    code, out, _ = cli(capsys, "models")
    assert code == 0
    assert "    image5: img_mlp, img_cnn4, img_cnn_deep, img_resnet, img_dsconv" in out
    assert "    har3: har_cnn1d, har_resnet1d, har_gru" in out
    assert "    cnn: " in out


def test_a_weight_sharing_method_on_a_family_is_one_line_and_exit_2(capsys, tmp_path, write_config) -> None:
    config = write_config(model={"family": "image5"})
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "r", "--quiet")
    assert_one_line_error(code, err, "needs one architecture")
    assert not (tmp_path / "r").exists()


def test_report_plots_prototype_diagnostics(capsys, tmp_path, write_config) -> None:
    config = write_config(
        algorithm_name="protonorm",
        model={"family": "image5", "feature_dim": 16},
        train={"rounds": 2, "lr": 0.01},
    )
    assert cli(capsys, "run", config, "--out", tmp_path / "run", "--quiet")[0] == 0
    code, _, _ = cli(capsys, "report", tmp_path / "run", "--out", tmp_path / "rep")
    assert code == 0 and (tmp_path / "rep" / "diagnostics_vs_round.png").is_file()
    assert "Method diagnostics" in (tmp_path / "rep" / "report.md").read_text()


def test_datasets_lists_digits_as_installed(capsys) -> None:
    code, out, _ = cli(capsys, "datasets")
    assert code == 0
    digits = next(line for line in out.splitlines() if line.startswith("digits"))
    assert "installed" in digits and "not installed" not in digits


def test_commands_that_train_nothing_do_not_import_torch() -> None:
    """`fedpal --help`, `--version` and `datasets` start in a fraction of a second: torch is imported on first use."""
    import subprocess
    import sys

    code = (
        "import sys; from fedpal.cli import main\n"
        "for argv in (['--version'], ['--help'], ['datasets']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
    assert "fedpal 0.1.0" in out


def test_algorithms_lists_from_a_cache_after_the_first_call(tmp_path: Path) -> None:
    """The listing needs every method imported (and torch); it is cached under a key of the package's sources, so
    later calls answer without torch, with the same text."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from fedpal.cli import main\n"
        "main(['algorithms'])\n"
        "print('torch imported:', 'torch' in sys.modules)"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    first, second = (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
        for _ in range(2)
    )
    assert first.endswith("torch imported: True\n") and second.endswith("torch imported: False\n")
    assert first.rsplit("torch", 1)[0] == second.rsplit("torch", 1)[0] and "fedavg: " in second
    assert len(list((tmp_path / "fedpal").glob("algorithms-*.txt"))) == 1


def test_the_listing_key_follows_every_source_file(tmp_path: Path) -> None:
    from fedpal.common.listing_cache import source_key

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    before = source_key(tmp_path)
    assert source_key(tmp_path) == before
    (tmp_path / "sub" / "b.py").write_text("y = 22\n")
    assert source_key(tmp_path) != before


def test_compare_into_an_existing_folder_adds_only_what_is_missing(
    capsys, write_config, strip_wall, tmp_path: Path
) -> None:
    config = write_config(train={"rounds": 2})
    out = tmp_path / "cmp"
    code, _, err = cli(capsys, "compare", config, "--algorithms", "fedavg", "--seeds", "0", "--out", out, "--quiet")
    assert code == 0, err
    first = (out / "fedavg" / "seed0" / "summary.json").read_text()
    # the sweep grows: a new seed and a new algorithm; the finished run is kept as it is
    args = ("compare", config, "--algorithms", "fedavg,local", "--seeds", "0,1", "--out", out, "--quiet")
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    assert "kept (finished)" in stdout and (out / "fedavg" / "seed0" / "summary.json").read_text() == first
    assert all((out / a / f"seed{s}" / "summary.json").exists() for a in ("fedavg", "local") for s in (0, 1))
    assert "client_accuracy.png" in stdout  # every written file is listed
    # an interrupted run (checkpoint, no summary) is resumed to the same numbers
    finished = json.loads((out / "local" / "seed1" / "summary.json").read_text())
    (out / "local" / "seed1" / "summary.json").unlink()
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    assert "resuming" in stdout
    resumed = json.loads((out / "local" / "seed1" / "summary.json").read_text())
    assert strip_wall(resumed) == strip_wall(finished)
    # other settings into the same folder stop in one line
    code, _, err = cli(
        capsys,
        "compare",
        config,
        "--algorithms",
        "fedavg",
        "--seeds",
        "0",
        "--out",
        out,
        "--set",
        "train.lr=0.5",
        "--quiet",
    )
    assert code == 2 and "other settings" in err and "Traceback" not in err


def test_a_corrupted_checkpoint_names_the_cause_and_the_way_out(capsys, write_config, tmp_path: Path) -> None:
    config = write_config(train={"rounds": 2})
    code, _, err = cli(capsys, "run", config, "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, _, err = cli(capsys, "resume", tmp_path / "run", "--quiet")
    assert (code == 2 and "cannot be read" in err and "UnpicklingError" in err) or "Error" in err
    assert f"fedpal run {tmp_path / 'run' / 'config.toml'} --out NEW_DIR" in err and "Traceback" not in err


def test_the_run_log_says_what_was_chosen_for_the_user(write_config, tmp_path: Path) -> None:
    import fedpal

    raw = tomllib.loads(write_config(algorithm_name="fedfomo").read_text())
    del raw["train"]["lr"], raw["train"]["threads"]
    fedpal.run(raw, out=tmp_path / "run")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "note: train.threads = 0: using 1 intra-op thread(s)" in log
    assert "note: fedfomo's recommended training settings, left unset by the config: train.lr = 0.1" in log
    written = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert written["train"]["lr"] == 0.1 and written["train"]["threads"] == 0
