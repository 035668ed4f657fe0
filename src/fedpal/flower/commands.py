"""``fedpal flower …``: certificates, the two Flower daemons, the Flower app, run submission and watching.

The daemons (``superlink``, ``supernode``) replace this process (exec), so they run in the foreground, take
signals directly and exit with Flower's own code. The other commands drive the ``flwr`` CLI against the ``fedpal``
SuperLink connection kept in ``<home>/cli/config.toml``; any of them given ``--superlink`` (re)writes it.
Usage: docs/flower.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedpal.errors import UserError
from fedpal.flower import deployment as dep

CONNECTION_HELP = "SuperLink address as HOST:PORT"


def add_flower_commands(subparsers: Any) -> None:
    """Add ``fedpal flower`` and its subcommands to the ``fedpal`` command line."""
    flower = subparsers.add_parser("flower", help="run fedpal across machines with Flower (docs/flower.md)")
    sub = flower.add_subparsers(dest="flower_command", required=True, parser_class=type(flower))

    def with_home(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--home",
            default=str(dep.DEFAULT_HOME),
            help="folder for Flower's own files: FLWR_HOME of each daemon and of the flwr CLI (default ./.flwr)",
        )

    def with_tls(p: argparse.ArgumentParser, required: bool) -> None:
        group = p.add_mutually_exclusive_group(required=required)
        group.add_argument("--certs", help="certificates directory from `fedpal flower certs` (TLS)")
        group.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS (a trusted network only)")

    def with_connection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--superlink", help=f"{CONNECTION_HELP} (default: the one the last command used)")
        with_tls(p, required=False)
        with_home(p)

    p = sub.add_parser("certs", help="a CA, the SuperLink's TLS certificate and SuperNode key pairs")
    p.add_argument("dir", help="directory to create them in (existing files are kept)")
    p.add_argument("--hosts", default="", help="comma-separated names/IPs SuperNodes use to reach the SuperLink")
    p.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to create (node-0 .. node-N-1)")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("superlink", help="run the Flower SuperLink in the foreground")
    p.add_argument("--host", default=dep.DEFAULT_HOST, help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=dep.DEFAULT_SUPERLINK_PORT, help="its one port (default 8000)")
    with_tls(p, required=True)
    p.add_argument("--auth", action="store_true", help="accept only SuperNodes whose keys are registered")
    p.add_argument("--database", help="state file: node registrations, runs (default <home>/superlink/state.db)")
    with_home(p)
    p.set_defaults(func=cmd_superlink)

    p = sub.add_parser("supernode", help="run a Flower SuperNode for some fedpal clients, in the foreground")
    p.add_argument("--superlink", required=True, help=CONNECTION_HELP)
    p.add_argument("--clients", required=True, help="the fedpal client ids this node serves: 0-4, 0,3,7-9")
    p.add_argument("--state-dir", help="clients' state kept on this machine (default <home>/state/clients-<ids>)")
    p.add_argument("--data-dir", help="where this machine's dataset copies are (passed to the client app)")
    p.add_argument("--key", help="this node's private key (nodes/node-<i>.key) when the SuperLink runs --auth")
    with_tls(p, required=True)
    p.add_argument(
        "--port", type=int, default=dep.DEFAULT_SUPERNODE_PORT, help="its local Runtime API port (default 9094)"
    )
    with_home(p)
    p.set_defaults(func=cmd_supernode)

    p = sub.add_parser("app", help="write the Flower app directory (pyproject.toml) that `flwr run` ships")
    p.add_argument("dir", help="directory to write it in")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("submit", help="start a fedpal run on a SuperLink")
    p.add_argument("config", help="experiment config (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--superlink", required=True, help=CONNECTION_HELP)
    p.add_argument("--out", required=True, help="run directory: an absolute path on the SuperLink machine")
    with_tls(p, required=True)
    p.add_argument("--stream", action="store_true", help="then follow the run's log (Ctrl-C stops watching only)")
    p.add_argument("--app", help="a Flower app directory to use instead of a fresh one (`fedpal flower app`)")
    with_home(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("resume", help="continue an interrupted Flower run from its last checkpoint")
    p.add_argument("--superlink", required=True, help=CONNECTION_HELP)
    p.add_argument("--out", required=True, help="the run's directory on the SuperLink machine (absolute)")
    with_tls(p, required=True)
    p.add_argument("--stream", action="store_true", help="then follow the run's log (Ctrl-C stops watching only)")
    p.add_argument("--app", help="a Flower app directory to use instead of a fresh one (`fedpal flower app`)")
    with_home(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("register", help="register SuperNode public keys with a SuperLink run with --auth")
    p.add_argument("keys", nargs="+", help="public key files (node-<i>.pub), or a certificates directory: all")
    with_connection(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("nodes", help="list the SuperNodes the SuperLink knows, with their status")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    with_connection(p)
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("runs", help="list the runs of the SuperLink")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    with_connection(p)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("log", help="follow a run's log (Ctrl-C stops watching, not the run)")
    p.add_argument("run_id", type=int)
    p.add_argument("--show", action="store_true", help="print the log so far and return")
    with_connection(p)
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("stop", help="stop a run")
    p.add_argument("run_id", type=int)
    with_connection(p)
    p.set_defaults(func=cmd_stop)


# ---- handlers


def _certs(args: argparse.Namespace) -> Path | None:
    return Path(args.certs) if args.certs else None


def cmd_certs(args: argparse.Namespace) -> int:
    from fedpal.flower.certificates import parse_hosts, write_certificates

    created = write_certificates(args.dir, parse_hosts(args.hosts), args.nodes)
    for path in created:
        print(f"written: {path}")
    if not created:
        print(f"{args.dir} already holds everything asked for; nothing written")
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    options = dep.SuperLinkOptions(
        home=Path(args.home),
        host=args.host,
        port=args.port,
        certs=_certs(args),
        auth=args.auth,
        database=args.database,
    )
    command = dep.superlink_command(options)
    dep.superlink_home(options.home).mkdir(parents=True, exist_ok=True)
    return dep.run_in_foreground(command)


def cmd_supernode(args: argparse.Namespace) -> int:
    options = dep.SuperNodeOptions(
        superlink=args.superlink,
        clients=args.clients,
        home=Path(args.home),
        state_dir=Path(args.state_dir) if args.state_dir else None,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        key=Path(args.key) if args.key else None,
        certs=_certs(args),
        port=args.port,
    )
    command = dep.supernode_command(options)
    dep.prepare_supernode_dirs(options)
    return dep.run_in_foreground(command)


def cmd_app(args: argparse.Namespace) -> int:
    print(f"written: {dep.write_app(args.dir)}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from fedpal.config import load_config, to_toml

    dep.check_run_out(args.out)
    dep.flower_tool("flwr")
    config = load_config(args.config, args.set)  # a bad config fails here, before any machine is involved
    return _start(args, to_toml(config.to_dict()), resume=False)


def cmd_resume(args: argparse.Namespace) -> int:
    dep.check_run_out(args.out)
    dep.flower_tool("flwr")
    return _start(args, "", resume=True)


def _start(args: argparse.Namespace, config_text: str, resume: bool) -> int:
    """Submit a new run (or a resumption) through the app directory given or a fresh temporary one."""
    home = Path(args.home)
    dep.write_connection(home, args.superlink, _certs(args))
    try:
        run_id = _submit(args, home, config_text, resume)
    except KeyboardInterrupt:
        raise UserError("interrupted before the SuperLink confirmed the run; `fedpal flower runs` tells") from None
    where = "" if home == dep.DEFAULT_HOME else f" --home {args.home}"
    verb = "resumed" if resume else "started"
    print(f"{verb} run {run_id} on {args.superlink}; run directory (on the SuperLink machine): {args.out}")
    print(f"watch it: fedpal flower log {run_id}{where}    stop it: fedpal flower stop {run_id}{where}")
    if args.stream:
        return _follow(home, run_id)
    return 0


def _submit(args: argparse.Namespace, home: Path, config_text: str, resume: bool) -> int:
    if args.app:
        if not (Path(args.app) / "pyproject.toml").is_file():
            raise UserError(f"--app {args.app} has no pyproject.toml (write one with `fedpal flower app DIR`)")
        return dep.submit(Path(args.app), home, config_text, args.out, resume)
    with tempfile.TemporaryDirectory(prefix="fedpal-flower-app-") as app_dir:  # flwr run uploads it as a FAB
        dep.write_app(app_dir)
        return dep.submit(Path(app_dir), home, config_text, args.out, resume)


def _use_connection(args: argparse.Namespace) -> Path:
    home = Path(args.home)
    if args.superlink:
        if not args.certs and not args.insecure:
            raise UserError("with --superlink, give --certs DIR (TLS) or --insecure")
        dep.write_connection(home, args.superlink, _certs(args))
    elif args.certs or args.insecure:
        raise UserError("--certs/--insecure describe a connection: give --superlink HOST:PORT with them")
    dep.require_connection(home)
    return home


def _flwr(home: Path, *args: str, timeout: float | None = 120.0) -> int:
    """``flwr ARGS`` with this terminal; its exit code. Only following a log may take longer than ``timeout``."""
    command = dep.flwr_command(home, *args)
    try:
        return subprocess.call(command.argv, env=command.env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"flwr {args[0]} got no answer from the SuperLink within {timeout:.0f} s") from None


def _public_keys(paths: list[str]) -> list[Path]:
    keys: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted((path / "nodes").glob("node-*.pub")) or sorted(path.glob("*.pub"))
            if not found:
                raise UserError(f"{path} holds no public keys (nodes/node-<i>.pub)")
            keys += found
        elif path.is_file():
            keys.append(path)
        else:
            raise UserError(f"public key {path} does not exist")
    return keys


def cmd_register(args: argparse.Namespace) -> int:
    keys = _public_keys(args.keys)
    home = _use_connection(args)
    for key in keys:
        code = _flwr(home, "supernode", "register", str(key), dep.CONNECTION)
        if code != 0:
            sys.stderr.write(f"fedpal: registering {key} failed (flwr exit code {code})\n")
            return code
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    home = _use_connection(args)
    return _flwr(home, "supernode", "list", dep.CONNECTION, *(["--format", "json"] if args.json else []))


def cmd_runs(args: argparse.Namespace) -> int:
    home = _use_connection(args)
    return _flwr(home, "ls", dep.CONNECTION, *(["--format", "json"] if args.json else []))


def _follow(home: Path, run_id: int, show: bool = False) -> int:
    try:
        return _flwr(home, "log", str(run_id), dep.CONNECTION, "--show" if show else "--stream", timeout=None)
    except KeyboardInterrupt:
        sys.stderr.write(f"fedpal: stopped watching; run {run_id} goes on (fedpal flower stop {run_id} ends it)\n")
        return 130


def cmd_log(args: argparse.Namespace) -> int:
    return _follow(_use_connection(args), args.run_id, args.show)


def cmd_stop(args: argparse.Namespace) -> int:
    return _flwr(_use_connection(args), "stop", str(args.run_id), dep.CONNECTION)
