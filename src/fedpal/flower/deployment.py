"""Running fedpal on Flower's deployment runtime: the daemons' command lines and environment, the Flower app
directory, the ``flwr`` CLI's connection entry, and run submission.

Nothing here imports ``flwr``: the core package must import without the ``[flower]`` extra. Flower is driven
through the console scripts installed beside the current interpreter (``flower-superlink``, ``flower-supernode``,
``flwr``), so the daemons run the same fedpal and torch as the command that started them.

Every process gets the same environment (:func:`flower_environment`): telemetry and update checks off (both call
flower.ai), runtime dependency installation off (it would ``uv sync`` the app's dependencies from PyPI for every
run, ignoring pip.conf), ``FLWR_HOME`` inside the directory the user chose, and this interpreter's ``bin`` first
on ``PATH`` because the daemons start ``flower-superexec`` and the app processes by name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpal.errors import UserError
from fedpal.flower import INSTALL, QUIET_ENVIRONMENT, require_flower
from fedpal.flower.certificates import require_certificates
from fedpal.flower.client_ids import parse_clients

FLWR_REQUIREMENT = "flwr>=1.41,<1.43"  # the range the adapter is tested with (the [flower] extra pins the same)
SERVER_APP = "fedpal.flower.server_app:app"
CLIENT_APP = "fedpal.flower.client_app:app"
CONFIG_KEY = "fedpal-config"  # run config: the experiment's TOML text
OUT_KEY = "fedpal-out"  # run config: the run directory, a path on the SuperLink machine
RESUME_KEY = "fedpal-resume"  # run config: true continues the run in fedpal-out from its last checkpoint
CONNECTION = "fedpal"  # the name of the SuperLink connection fedpal writes for the flwr CLI

DEFAULT_HOME = Path(".flwr")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_SUPERLINK_PORT = 8000  # Flower's own defaults, so Flower's documentation applies unchanged
DEFAULT_SUPERNODE_PORT = 9094


# ---- the Flower installation and the environment of every Flower process


def flower_tool(name: str) -> Path:
    """A Flower console script of this interpreter's environment, or a one-line error naming the extra."""
    require_flower("fedpal flower")
    tool = Path(sys.executable).parent / name
    if not tool.exists():
        raise UserError(f"{tool} is missing: reinstall the Flower extra with {INSTALL}")
    return tool


def flower_environment(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with Flower kept offline and quiet and ``FLWR_HOME`` set."""
    env = dict(os.environ if base is None else base)
    env.update(QUIET_ENVIRONMENT)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    tools = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([tools, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != tools)])
    return env


@dataclass(frozen=True)
class FlowerCommand:
    """A command line with the environment it must run in."""

    argv: list[str]
    env: dict[str, str]

    def shown(self) -> str:
        """The command as a user could paste it (environment settings first)."""
        settings = [f"{k}={self.env[k]}" for k in ("FLWR_HOME", *QUIET_ENVIRONMENT)]
        return " ".join([*settings, *(_shell_word(a) for a in self.argv)])


def _shell_word(text: str) -> str:
    return text if re.fullmatch(r"[\w@%+=:,./-]+", text) else "'" + text.replace("'", "'\"'\"'") + "'"


def run_in_foreground(command: FlowerCommand) -> int:
    """Become the daemon (exec), so signals (Ctrl-C, SIGTERM from a supervisor) reach it directly and its exit
    code is the command's. Elsewhere (Windows, where exec starts a new process), wait for it as a child."""
    sys.stderr.write(f"fedpal: {command.shown()}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    if os.name == "posix":
        os.execve(command.argv[0], command.argv, command.env)
    return subprocess.call(command.argv, env=command.env)


# ---- the SuperNode's fedpal clients


def format_clients(ids: Sequence[int]) -> str:
    """The shortest spec :func:`parse_clients` reads back as ``ids``: ``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    parts: list[str] = []
    ordered = sorted(ids)
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            first, last = ordered[start], ordered[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(parts)


def node_config(clients: Sequence[int], state_dir: Path, data_dir: Path | None) -> str:
    """The ``--node-config`` text the ClientApp reads as ``context.node_config``. Values are TOML literal strings
    (single quotes), the one form Flower's parser keeps whole when it holds spaces or backslashes."""
    values = {"clients": format_clients(clients), "state-dir": str(state_dir)}
    if data_dir is not None:
        values["data-dir"] = str(data_dir)
    for key, value in values.items():
        if "'" in value:
            raise UserError(f"the {key} path may not contain a single quote: {value}")
    return " ".join(f"{key}='{value}'" for key, value in values.items())


# ---- daemons


def parse_address(text: str, option: str = "--superlink") -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) → (host, port)."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})", text.strip())
    if match is None or not 1 <= int(match[2]) <= 65535:
        raise UserError(f"{option} expects HOST:PORT (e.g. 10.0.0.5:{DEFAULT_SUPERLINK_PORT}), got '{text}'")
    return match[1], int(match[2])


def _check_port(port: int, option: str = "--port") -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"{option} must be between 1 and 65535, got {port}")


@dataclass(frozen=True)
class SuperLinkOptions:
    """What ``fedpal flower superlink`` was asked for."""

    home: Path = DEFAULT_HOME
    host: str = DEFAULT_HOST
    port: int = DEFAULT_SUPERLINK_PORT
    certs: Path | None = None  # None: --insecure
    auth: bool = False  # only registered SuperNode keys may connect
    database: str | None = None  # None: <home>/superlink/state.db


def superlink_home(home: Path) -> Path:
    return Path(home) / "superlink"


def superlink_command(options: SuperLinkOptions) -> FlowerCommand:
    """``flower-superlink`` on one HTTPS (or, with --insecure, HTTP) port for the Fleet, Control and Runtime APIs.

    The state (registered node keys, runs) lives in an SQLite file under the home directory, so registrations
    survive a restart; Flower's default would keep them in memory only."""
    _check_port(options.port)
    if options.auth and options.certs is None:
        raise UserError("--auth needs TLS: give --certs DIR (flwr refuses node authentication over plain HTTP)")
    flwr_home = superlink_home(options.home)
    database = options.database or str((flwr_home / "state.db").resolve())
    argv = [
        str(flower_tool("flower-superlink")),
        "--host",
        options.host,
        "--port",
        str(options.port),
        "--database",
        database,
        "--disable-runtime-dependency-installation",
    ]
    if options.certs is None:
        argv.append("--insecure")
    else:
        files = require_certificates(options.certs, server=True)
        argv += [
            "--ssl-ca-certfile",
            str(files.ca_cert.resolve()),
            "--ssl-certfile",
            str(files.server_cert.resolve()),
            "--ssl-keyfile",
            str(files.server_key.resolve()),
        ]
    if options.auth:
        argv.append("--enable-supernode-auth")
    return FlowerCommand(argv, flower_environment(flwr_home))


@dataclass(frozen=True)
class SuperNodeOptions:
    """What ``fedpal flower supernode`` was asked for."""

    superlink: str
    clients: str
    home: Path = DEFAULT_HOME
    state_dir: Path | None = None  # None: <home>/state/clients-<spec>
    data_dir: Path | None = None
    key: Path | None = None  # the node's private key (SuperLink started with --auth)
    certs: Path | None = None  # None: --insecure
    port: int = DEFAULT_SUPERNODE_PORT  # its Runtime API, on loopback; unique per machine


def supernode_home(home: Path, port: int) -> Path:
    """One Flower home per SuperNode: the port is unique on a machine, so two nodes never share installed apps."""
    return Path(home) / f"supernode-{port}"


def default_state_dir(home: Path, clients: Sequence[int]) -> Path:
    """Named after the clients, not the port: a node restarted on another port finds its clients' state."""
    return Path(home) / "state" / ("clients-" + format_clients(clients).replace(",", "_"))


def supernode_command(options: SuperNodeOptions) -> FlowerCommand:
    """``flower-supernode`` serving the fedpal clients ``options.clients`` of this machine."""
    parse_address(options.superlink)
    _check_port(options.port)
    clients = parse_clients(options.clients)
    if options.key is not None and options.certs is None:
        raise UserError("--key needs TLS: give --certs DIR (flwr refuses node authentication over plain HTTP)")
    if options.key is not None and not Path(options.key).is_file():
        raise UserError(f"--key {options.key} is not a file (node keys are made by `fedpal flower certs`)")
    if options.data_dir is not None and not Path(options.data_dir).is_dir():
        raise UserError(f"--data-dir {options.data_dir} is not a directory")
    state_dir = Path(options.state_dir or default_state_dir(options.home, clients)).resolve()
    data_dir = Path(options.data_dir).resolve() if options.data_dir is not None else None
    argv = [
        str(flower_tool("flower-supernode")),
        "--superlink",
        options.superlink.strip(),
        "--host",
        DEFAULT_HOST,
        "--port",
        str(options.port),
        "--node-config",
        node_config(clients, state_dir, data_dir),
    ]
    if options.certs is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(require_certificates(options.certs, server=False).ca_cert.resolve())]
    if options.key is not None:
        argv += ["--auth-supernode-private-key", str(Path(options.key).resolve())]
    return FlowerCommand(argv, flower_environment(supernode_home(options.home, options.port)))


def prepare_supernode_dirs(options: SuperNodeOptions) -> None:
    """Create the node's Flower home and its fedpal state directory before the daemon starts."""
    clients = parse_clients(options.clients)
    supernode_home(options.home, options.port).mkdir(parents=True, exist_ok=True)
    Path(options.state_dir or default_state_dir(options.home, clients)).mkdir(parents=True, exist_ok=True)


# ---- the Flower app directory


def app_pyproject(serverapp: str = SERVER_APP, clientapp: str = CLIENT_APP) -> str:
    """pyproject.toml of the Flower app: names the two fedpal apps and the run config keys they read."""
    from fedpal import __version__

    return f'''# The Flower app of fedpal. `flwr run` packs this folder (a FAB) and sends it to the SuperLink, which
# hands it to every SuperNode. Only this folder travels: fedpal and torch must already be installed on every
# machine, in the environment that runs flower-superlink / flower-supernode.
# torch is deliberately not a dependency: with runtime dependency installation on, Flower would `uv sync` the list
# below for every run, and uv (which ignores pip.conf) would fetch the multi-GB CUDA build of torch from PyPI.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedpal-app"
version = "{__version__}"
description = "fedpal personalized federated learning on Flower's deployment runtime"
license = "MIT"
dependencies = ["{FLWR_REQUIREMENT}"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedpal"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

# `fedpal flower submit` / `fedpal flower resume` set these for each run (flwr run --run-config).
[tool.flwr.app.config]
{CONFIG_KEY} = ""  # the experiment config, as TOML text
{OUT_KEY} = ""  # the run directory, an absolute path on the SuperLink machine
{RESUME_KEY} = false  # true: continue the run in {OUT_KEY} from its last checkpoint
'''


def write_app(directory: str | Path, serverapp: str = SERVER_APP, clientapp: str = CLIENT_APP) -> Path:
    """Write the Flower app directory; an existing pyproject.toml there is never overwritten."""
    app = Path(directory)
    if app.exists() and not app.is_dir():
        raise UserError(f"{app} exists and is not a directory")
    pyproject = app / "pyproject.toml"
    if pyproject.exists():
        raise UserError(f"{pyproject} already exists; choose an empty directory for the Flower app")
    app.mkdir(parents=True, exist_ok=True)
    pyproject.write_text(app_pyproject(serverapp, clientapp))
    return pyproject


# ---- the flwr CLI: its connection to the SuperLink, submission, watching


def cli_home(home: Path) -> Path:
    return Path(home) / "cli"


def write_connection(home: Path, superlink: str, certs: Path | None) -> Path:
    """Add (or replace) the ``fedpal`` SuperLink connection in ``<home>/cli/config.toml`` and make it the default,
    keeping any other connection there. TLS connections trust the CA certificate of ``certs``."""
    import tomllib

    parse_address(superlink)
    entry: dict[str, object] = {"address": superlink.strip()}
    if certs is None:
        entry["insecure"] = True
    else:  # flwr wants an absolute path here
        entry["root-certificates"] = str(require_certificates(certs, server=False).ca_cert.resolve())
    path = cli_home(home) / "config.toml"
    config: dict = {}
    if path.exists():
        try:
            config = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path} is not valid TOML ({exc}); remove it and try again") from None
    superlinks = config.setdefault("superlink", {})
    superlinks[CONNECTION] = entry
    superlinks["default"] = CONNECTION
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_toml_text(config))
    return path


def _toml_text(data: dict) -> str:
    try:
        import tomli_w  # comes with flwr
    except ImportError:
        require_flower("fedpal flower")
        raise
    return str(tomli_w.dumps(data))


def require_connection(home: Path) -> None:
    if not (cli_home(home) / "config.toml").exists():
        raise UserError(
            f"no SuperLink connection in {cli_home(home)}: pass --superlink HOST:PORT with --certs DIR or --insecure"
        )


def flwr_command(home: Path, *args: str) -> FlowerCommand:
    """``flwr ARGS`` against the fedpal connection of ``home``."""
    return FlowerCommand([str(flower_tool("flwr")), *args], flower_environment(cli_home(home)))


def write_run_config(path: Path, config_text: str, out: str, resume: bool = False) -> Path:
    """The ``--run-config`` file: flwr reads a single argument ending in .toml as a TOML file of overrides, which
    carries a multi-line config text whole (the KEY=VALUE form cannot)."""
    path.write_text(_toml_text({CONFIG_KEY: config_text, OUT_KEY: out, RESUME_KEY: resume}))
    return path


def check_run_out(out: str) -> str:
    """The run directory is opened by the ServerApp on the SuperLink machine, so it must not depend on where
    the submitting shell happens to be."""
    if not os.path.isabs(out):
        raise UserError(f"--out is a path on the SuperLink machine and must be absolute, got '{out}'")
    return out


def submit(app_dir: Path, home: Path, config_text: str, out: str, resume: bool = False, timeout: float = 120.0) -> int:
    """Start a run of the Flower app in ``app_dir`` with ``config_text`` and ``out`` (or, with ``resume``, continue
    the run in ``out``); returns Flower's run id."""
    check_run_out(out)
    require_connection(home)
    with tempfile.TemporaryDirectory(prefix="fedpal-run-config-") as scratch:
        overrides = write_run_config(Path(scratch) / "run-config.toml", config_text, out, resume)
        command = flwr_command(
            home, "run", str(Path(app_dir).resolve()), CONNECTION, "--run-config", str(overrides), "--format", "json"
        )
        try:
            done = subprocess.run(command.argv, env=command.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"flwr run got no answer from the SuperLink within {timeout:.0f} s") from None
    reply = _last_json_object(done.stdout)
    if done.returncode != 0 or not reply.get("success") or reply.get("run-id") is None:
        detail = reply.get("error-message") or (done.stderr.strip() or done.stdout.strip()).splitlines()
        text = detail if isinstance(detail, str) else (detail[-1] if detail else f"exit code {done.returncode}")
        raise UserError(f"flwr run failed: {' '.join(str(text).split())}")
    return int(reply["run-id"])


def _last_json_object(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    try:  # a pretty-printed object spans lines
        value = json.loads(text[text.index("{") :])
    except (ValueError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
