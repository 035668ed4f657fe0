"""Metrics also sent to the experiment trackers people already use (``run.log_to``); ``metrics.jsonl`` stays the
source of truth. Each tracker is its own library, installed as an extra, and writes inside the run directory:

- ``tensorboard``: event files in ``<run>/tensorboard`` (``pip install 'fedpal[tensorboard]'``);
- ``mlflow``: an MLflow run in the local store ``<run>/mlruns`` (``mlflow ui --backend-store-uri <run>/mlruns``),
  or on the server ``MLFLOW_TRACKING_URI`` names when it is set (``pip install 'fedpal[mlflow]'``);
- ``wandb``: a Weights & Biases run in offline mode under ``<run>/wandb`` (``wandb sync`` uploads it later), unless
  ``WANDB_MODE`` says otherwise (``pip install 'fedpal[wandb]'``).

Every number of each evaluation becomes one scalar at its round; MLflow and W&B also get the resolved config as
parameters. A resumed run continues the same MLflow / W&B run (its id is kept in the run directory).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fedpal.errors import UserError

TRACKERS = ("tensorboard", "mlflow", "wandb")


class Tracker(Protocol):
    def log(self, entry: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(entry: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of a metrics entry by its slash-joined path (lists and non-numbers left out)."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(scalars(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "round":
            out[name] = float(value)
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as dotted key -> text, the form trackers take parameters in."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flat_config(value, name))
        else:
            out[name] = str(value)
    return out


def _missing(name: str, exc: ImportError) -> UserError:
    package = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}[name]
    return UserError(f"run.log_to = ['{name}'] needs the {package} package: pip install 'fedpal[{name}]' ({exc})")


def _kept_id(path: Path, make: Callable[[], str]) -> tuple[str, bool]:
    """The tracker run id kept in the run directory (a resume continues it), or a new one written there."""
    if path.exists():
        return path.read_text().strip(), True
    run_id = make()
    path.write_text(run_id + "\n")
    return run_id, False


class TensorBoardTracker:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing("tensorboard", exc) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, entry: dict[str, Any]) -> None:
        step = int(entry.get("round", 0))
        for name, value in scalars(entry).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per fedpal run, written through MLflow's client (no global active run is touched)."""

    def __init__(self, run_path: Path, config: dict[str, Any]) -> None:
        try:
            import mlflow
            from mlflow.entities import Metric, Param
        except ImportError as exc:
            raise _missing("mlflow", exc) from None
        self._metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # offline: MLflow's file store inside the run directory
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the local store MLflow keeps maintained
            uri = (run_path / "mlruns").resolve().as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("fedpal")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("fedpal")

        def new_run() -> str:
            run = self.client.create_run(experiment_id, run_name=run_path.name)
            params = [Param(k, v[:6000]) for k, v in flat_config(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(run.info.run_id, params=params[start : start + 100])
            return str(run.info.run_id)

        self.run_id, resumed = _kept_id(run_path / "mlflow_run_id", new_run)
        if resumed:
            self.client.update_run(self.run_id, status="RUNNING")

    def log(self, entry: dict[str, Any]) -> None:
        import time

        step, stamp = int(entry.get("round", 0)), int(time.time() * 1000)
        metrics = [self._metric(name, value, stamp, step) for name, value in scalars(entry).items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """One W&B run per fedpal run, offline by default; a resumed fedpal run resumes it."""

    def __init__(self, run_path: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise _missing("wandb", exc) from None
        run_id, _ = _kept_id(run_path / "wandb_run_id", lambda: uuid.uuid4().hex[:12])
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fedpal"),
            name=run_path.name,
            id=run_id,
            resume="allow",
            dir=str(run_path),
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            config=config,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            reinit="create_new",
        )

    def log(self, entry: dict[str, Any]) -> None:
        # W&B keeps steps increasing: rounds a resumed run redoes (identical numbers) are kept as first written.
        self.run.log(scalars(entry), step=int(entry.get("round", 0)))

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: list[str], run_path: Path, config: dict[str, Any]) -> list[Tracker]:
    """The trackers ``run.log_to`` names, writing beside the run directory's own files."""
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_path / "tensorboard"))
        elif name == "mlflow":
            trackers.append(MlflowTracker(run_path, config))
        elif name == "wandb":
            trackers.append(WandbTracker(run_path, config))
    return trackers
