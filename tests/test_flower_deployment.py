"""`fedpal flower` deployment: certificates and node keys, the daemons' command lines, the app directory, run
submission, and two loopback deployments (TLS; node authentication) run end to end with a probe app.

The probe app stands in for fedpal's ServerApp/ClientApp: its ServerApp sends one query to every node and writes
the replies (each node's ``node_config``) and the run config it received into ``fedpal-out``. Flower's own parsers
and verifiers (run config, node config, connection file, app validation, X.509 path validation) are the independent
check of what the builders write. Every daemon is stopped by PID (tests/flower_processes.py).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tomllib
from pathlib import Path

import pytest
from tests.conftest import tiny_config
from tests.flower_processes import (
    Processes,
    Started,
    fedpal_argv,
    flower_processes,
    free_port,
    superlink_healthy,
    wait_until,
)

from fedpal.cli import build_parser, main
from fedpal.config import load_config, to_toml
from fedpal.errors import UserError
from fedpal.flower import deployment as dep
from fedpal.flower.certificates import CertificateFiles, server_certificate_names, write_certificates
from fedpal.flower.client_ids import node_clients, parse_clients

pytest.importorskip("flwr")

REPO = Path(__file__).resolve().parents[1]

PROBE_SERVER = '''
"""Probe ServerApp: one query per node; the replies and the run config received go to <fedpal-out>/probe.json."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while not list(grid.get_node_ids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    nodes = sorted(grid.get_node_ids())
    asks = [Message(RecordDict({"ask": ConfigRecord({"what": "node-config"})}), dst_node_id=n, message_type="query")
            for n in nodes]
    replies = {}
    for reply in grid.send_and_receive(asks, timeout=60):
        node = str(reply.metadata.src_node_id)
        replies[node] = {"error": reply.error.reason} if reply.has_error() else dict(reply.content["node"])
    out = Path(str(context.run_config["fedpal-out"]))
    out.mkdir(parents=True, exist_ok=True)
    received = {"config": context.run_config["fedpal-config"], "resume": context.run_config["fedpal-resume"]}
    (out / "probe.json").write_text(json.dumps({"nodes": [str(n) for n in nodes], "replies": replies, **received}))
'''

PROBE_CLIENT = '''
"""Probe ClientApp: answers a query with its node config."""
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"node": ConfigRecord({str(k): str(v) for k, v in context.node_config.items()})}),
                   reply_to=msg)
'''


def run_cli(*argv: object) -> int:
    try:
        return int(main([str(a) for a in argv]))
    except SystemExit as exc:  # argparse
        return int(exc.code or 0)


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    """Run ``fedpal ARGV``, expecting bad input: exit code 2 and one error line, no traceback; return that line."""
    code = run_cli(*argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpal: error:") and "Traceback" not in err, err
    return lines[0]


# ---- certificates and node keys


def verify_server(files: CertificateFiles, name: str) -> None:
    """X.509 path validation of the server certificate for ``name`` with the CA as the only root."""
    import ipaddress

    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store

    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    try:
        subject: x509.DNSName | x509.IPAddress = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    verifier.verify(leaf, [])


def test_certificates_verify_for_loopback_and_the_given_hosts_and_keys_are_private(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.verification import VerificationError
    from flwr.cli.supernode.register import try_load_public_key

    files = CertificateFiles(tmp_path / "certs")
    created = write_certificates(files.directory, ["flower.example.org", "10.1.2.3"], nodes=2)
    assert set(created) == {
        files.ca_cert,
        files.ca_key,
        files.server_cert,
        files.server_key,
        *(files.node_key(i) for i in range(2)),
        *(files.node_public_key(i) for i in range(2)),
    }
    for name in ("127.0.0.1", "localhost", "flower.example.org", "10.1.2.3"):
        verify_server(files, name)
    with pytest.raises(VerificationError):  # a name the certificate was not made for
        verify_server(files, "elsewhere.example.org")
    for private in (files.ca_key, files.server_key, files.node_key(0), files.node_key(1)):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    for i in range(2):  # the SuperNode's private key format, and the public key flwr's `supernode register` reads
        key = serialization.load_ssh_private_key(files.node_key(i).read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        registered = try_load_public_key(files.node_public_key(i))
        assert registered == key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    assert try_load_public_key(files.node_public_key(0)) != try_load_public_key(files.node_public_key(1))


def test_certs_rerun_keeps_existing_files_and_refuses_a_server_certificate_missing_a_host(tmp_path: Path) -> None:
    files = CertificateFiles(tmp_path / "certs")
    write_certificates(files.directory, [], nodes=1)
    before = {p: p.read_bytes() for p in files.directory.rglob("*") if p.is_file()}
    created = write_certificates(files.directory, [], nodes=2)
    assert created == [files.node_key(1), files.node_public_key(1)]
    assert all(p.read_bytes() == content for p, content in before.items())
    with pytest.raises(UserError, match=r"does not cover flower\.example\.org"):
        write_certificates(files.directory, ["flower.example.org"], nodes=0)
    files.server_cert.unlink()
    files.server_key.unlink()
    write_certificates(files.directory, ["flower.example.org"], nodes=0)  # reissued by the kept CA
    assert "flower.example.org" in server_certificate_names(files.server_cert)
    verify_server(files, "flower.example.org")


# ---- the daemons' command lines


def check_quiet_environment(env: dict[str, str], flwr_home: Path) -> None:
    """Offline and quiet under the names flwr itself reads, FLWR_HOME as asked, this environment's tools first."""
    from flwr.common.constant import FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
    from flwr.supercore.constant import FLWR_DISABLE_UPDATE_CHECK

    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env[FLWR_DISABLE_UPDATE_CHECK] == "1"
    assert env[FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION] == "1"
    assert env["FLWR_HOME"] == str(flwr_home.resolve())
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # flower-superexec is found by name


def test_superlink_command_is_loopback_offline_and_persists_its_state(tmp_path: Path) -> None:
    args = build_parser().parse_args(["flower", "superlink", "--insecure", "--home", str(tmp_path)])
    assert (args.host, args.port) == ("127.0.0.1", 8000)  # loopback unless asked
    insecure = dep.superlink_command(dep.SuperLinkOptions(home=tmp_path, host=args.host, port=args.port))
    argv = insecure.argv
    assert argv[0] == str(Path(sys.executable).parent / "flower-superlink")
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8000"
    assert "--insecure" in argv and "--disable-runtime-dependency-installation" in argv
    assert argv[argv.index("--database") + 1] == str((tmp_path / "superlink" / "state.db").resolve())
    check_quiet_environment(insecure.env, tmp_path / "superlink")

    files = CertificateFiles(tmp_path / "certs")
    write_certificates(files.directory, [], nodes=0)
    secure = dep.superlink_command(dep.SuperLinkOptions(home=tmp_path, certs=files.directory, auth=True)).argv
    assert "--insecure" not in secure and "--enable-supernode-auth" in secure
    for flag, path in [
        ("--ssl-ca-certfile", files.ca_cert),
        ("--ssl-certfile", files.server_cert),
        ("--ssl-keyfile", files.server_key),
    ]:
        assert secure[secure.index(flag) + 1] == str(path.resolve())
    with pytest.raises(UserError, match="--auth needs TLS"):
        dep.superlink_command(dep.SuperLinkOptions(home=tmp_path, auth=True))


def test_supernode_command_carries_the_clients_and_paths_as_flower_parses_them(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    files = CertificateFiles(tmp_path / "certs")
    write_certificates(files.directory, [], nodes=1)
    (tmp_path / "data dir").mkdir()
    options = dep.SuperNodeOptions(
        superlink="10.0.0.5:8000",
        clients="7,3,0-2",
        home=tmp_path / "home",
        state_dir=tmp_path / "my state",
        data_dir=tmp_path / "data dir",
        key=files.node_key(0),
        certs=files.directory,
        port=9123,
    )
    command = dep.supernode_command(options)
    argv = command.argv
    text = argv[argv.index("--node-config") + 1]
    assert text == f"clients='0-3,7' state-dir='{tmp_path / 'my state'}' data-dir='{tmp_path / 'data dir'}'"
    parsed = parse_config_args([text])  # what flower-supernode hands the ClientApp as context.node_config
    assert parsed == {
        "clients": "0-3,7",
        "state-dir": str(tmp_path / "my state"),
        "data-dir": str(tmp_path / "data dir"),
    }
    assert node_clients(parsed, num_clients=10) == [0, 1, 2, 3, 7]
    assert argv[argv.index("--superlink") + 1] == "10.0.0.5:8000"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "9123"
    assert argv[argv.index("--root-certificates") + 1] == str(files.ca_cert.resolve())
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(files.node_key(0).resolve())
    assert "--insecure" not in argv and "--allow-runtime-dependency-installation" not in argv
    check_quiet_environment(command.env, tmp_path / "home" / "supernode-9123")

    plain = dep.supernode_command(dep.SuperNodeOptions(superlink="127.0.0.1:8000", clients="4", home=tmp_path))
    default_state = tmp_path / "state" / "clients-4"  # named after the clients, so a restart on another port finds it
    assert plain.argv[plain.argv.index("--node-config") + 1] == f"clients='4' state-dir='{default_state.resolve()}'"
    assert "--insecure" in plain.argv


@pytest.mark.parametrize(
    ("ids", "spec"), [([0, 1, 2, 3, 4], "0-4"), ([0, 3, 7, 8, 9], "0,3,7-9"), ([5], "5"), ([1, 2, 4, 5], "1-2,4-5")]
)
def test_client_specs_are_written_in_their_shortest_form_and_read_back(ids: list[int], spec: str) -> None:
    assert dep.format_clients(ids) == spec
    assert parse_clients(spec) == ids


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(
        capsys, "flower", "supernode", "--superlink", "127.0.0.1:8000", "--clients", "0-", "--insecure"
    )
    assert "'0-'" in line
    line = one_line_error(capsys, "flower", "superlink", "--certs", tmp_path / "missing")
    assert str(tmp_path / "missing") in line and "does not exist" in line
    (tmp_path / "empty").mkdir()
    assert "ca.crt" in one_line_error(capsys, "flower", "supernode", "--superlink", "h:1", "--clients", "0", "--certs",
                                      tmp_path / "empty")  # fmt: skip
    line = one_line_error(capsys, "flower", "supernode", "--superlink", "nohost", "--clients", "0", "--insecure")
    assert "HOST:PORT" in line
    line = one_line_error(capsys, "flower", "superlink")  # neither --certs nor --insecure: a choice to make
    assert "--certs" in line and "--insecure" in line
    config = tmp_path / "config.toml"
    config.write_text(to_toml(tiny_config()))
    line = one_line_error(
        capsys, "flower", "submit", config, "--superlink", "127.0.0.1:8000", "--insecure", "--out", "runs/x"
    )
    assert "absolute" in line
    line = one_line_error(capsys, "flower", "nodes", "--home", tmp_path / "nowhere")
    assert "--superlink" in line


def test_without_the_extra_the_commands_name_the_install_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else find_spec(name, *a))
    for argv in (["superlink", "--insecure", "--home", tmp_path], ["certs", tmp_path / "certs"]):
        assert 'pip install -e ".[flower]"' in one_line_error(capsys, "flower", *argv)
    assert not (tmp_path / "certs").exists()


# ---- the app directory, the run config, the CLI connection


def test_app_directory_names_the_fedpal_apps_and_keeps_torch_out(tmp_path: Path) -> None:
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import get_fused_config_from_dir
    from packaging.requirements import Requirement

    pyproject = dep.write_app(tmp_path / "app")
    load_and_validate(pyproject, check_module=False)  # Flower's own checks of an app's pyproject.toml
    app = tomllib.loads(pyproject.read_text())
    assert app["tool"]["flwr"]["app"]["publisher"] == "fedpal"
    assert app["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedpal.flower.server_app:app",
        "clientapp": "fedpal.flower.client_app:app",
    }
    assert get_fused_config_from_dir(tmp_path / "app", {}) == {
        "fedpal-config": "",
        "fedpal-out": "",
        "fedpal-resume": False,
    }
    names = [Requirement(d).name for d in app["project"]["dependencies"]]
    assert not [n for n in names if n.startswith("torch")]
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["flower"]
    flwr_pin = next(Requirement(d) for d in extra if Requirement(d).name == "flwr")
    assert Requirement(dep.FLWR_REQUIREMENT).specifier == flwr_pin.specifier  # the app asks what the extra installs
    with pytest.raises(UserError, match="already exists"):
        dep.write_app(tmp_path / "app")


def test_run_config_file_carries_a_multiline_config_whole(tmp_path: Path) -> None:
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    text = 'seed = 1\n[data]\ndataset = "a \\"b\\" \\\\ c"\nnote = """x"""\nother = \'\'\'y\'\'\'\nname = "ünï"\n'
    path = dep.write_run_config(tmp_path / "run-config.toml", text, "/srv/runs/r1", resume=True)
    overrides = parse_config_args([str(path)])  # how `flwr run --run-config FILE.toml` reads it
    assert overrides == {"fedpal-config": text, "fedpal-out": "/srv/runs/r1", "fedpal-resume": True}
    dep.write_app(tmp_path / "app")
    fused = get_fused_config_from_dir(tmp_path / "app", overrides)  # every key is one the app declares
    assert fused["fedpal-config"] == text


def test_connection_entry_is_what_the_flwr_cli_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    files = CertificateFiles(tmp_path / "certs")
    write_certificates(files.directory, [], nodes=0)
    config = tmp_path / "home" / "cli" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[superlink.mine]\naddress = "10.9.9.9:8000"\ninsecure = true\n')
    dep.write_connection(tmp_path / "home", "10.0.0.5:8000", files.directory)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home" / "cli"))
    connection = read_superlink_connection(None)  # the default connection
    assert connection.name == "fedpal" and connection.address == "10.0.0.5:8000"
    assert connection.root_certificates == str(files.ca_cert.resolve()) and connection.insecure is False
    assert read_superlink_connection("mine").address == "10.9.9.9:8000"  # another connection is kept
    dep.write_connection(tmp_path / "home", "127.0.0.1:9000", None)
    assert read_superlink_connection("fedpal").insecure is True


# ---- loopback deployments with the probe app


def probe_app(directory: Path) -> Path:
    dep.write_app(directory, serverapp="probe_server:app", clientapp="probe_client:app")
    (directory / "probe_server.py").write_text(PROBE_SERVER)
    (directory / "probe_client.py").write_text(PROBE_CLIENT)
    return directory


def start_superlink(processes: Processes, home: Path, port: int, certs: Path, *extra: str) -> Started:
    superlink = processes.start(
        "superlink", fedpal_argv("flower", "superlink", "--port", port, "--certs", certs, "--home", home, *extra)
    )
    ca = CertificateFiles(certs).ca_cert
    wait_until(lambda: superlink_healthy(port, ca), 40, "the SuperLink's health route over TLS", processes)
    return superlink


def submit_probe(tmp_path: Path, home: Path, port: int, certs: Path) -> dict:
    config = tmp_path / "experiment.toml"
    config.write_text(to_toml(tiny_config()))
    out = tmp_path / "run"
    app = probe_app(tmp_path / "app")
    code = run_cli(
        "flower", "submit", config, "--superlink", f"127.0.0.1:{port}", "--certs", certs, "--out", out,
        "--app", app, "--home", home,
    )  # fmt: skip
    assert code == 0
    sent = to_toml(load_config(config).to_dict())  # the resolved config, as `fedpal run` writes it
    return {"out": out / "probe.json", "sent": sent}


def test_a_run_completes_over_tls(tmp_path: Path) -> None:
    certs, home = tmp_path / "certs", tmp_path / "home"
    write_certificates(certs, [], nodes=0)
    port = free_port()
    with flower_processes(tmp_path) as processes:
        start_superlink(processes, home, port, certs)
        assert not superlink_healthy(port, None)  # no plain-HTTP door
        state = tmp_path / "node state"
        processes.start(
            "supernode",
            fedpal_argv("flower", "supernode", "--superlink", f"127.0.0.1:{port}", "--clients", "0-2",
                        "--certs", certs, "--port", free_port(), "--state-dir", state, "--home", home),
        )  # fmt: skip
        run = submit_probe(tmp_path, home, port, certs)
        wait_until(run["out"].exists, 90, "the probe run to finish", processes)
    result = json.loads(run["out"].read_text())
    assert result["config"] == run["sent"] and result["resume"] is False
    assert list(result["replies"].values()) == [{"clients": "0-2", "state-dir": str(state.resolve())}]


def test_only_registered_node_keys_join_a_superlink_with_auth(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    certs, home = tmp_path / "certs", tmp_path / "home"
    files = CertificateFiles(certs)
    write_certificates(certs, [], nodes=2)
    port = free_port()
    link = ["--superlink", f"127.0.0.1:{port}", "--certs", certs, "--home", home]
    with flower_processes(tmp_path) as processes:
        start_superlink(processes, home, port, certs, "--auth")
        assert run_cli("flower", "register", files.node_public_key(0), *link) == 0
        # node 1's key is never registered; node 2 has no key, so it would register itself were --auth off
        for name, clients, key in [("registered", "0-1", 0), ("unregistered", "2-3", 1), ("keyless", "4-5", None)]:
            with_key = ["--key", files.node_key(key)] if key is not None else []
            processes.start(
                name, fedpal_argv("flower", "supernode", "--clients", clients, *with_key, "--port", free_port(), *link)
            )
        refused = [s.process for s in processes.started if s.name in ("unregistered", "keyless")]
        wait_until(lambda: all(p.poll() is not None for p in refused), 40, "two nodes to be turned away", processes)
        assert all(p.returncode != 0 for p in refused)
        run = submit_probe(tmp_path, home, port, certs)
        wait_until(run["out"].exists, 90, "the probe run to finish", processes)
        capfd.readouterr()
        assert run_cli("flower", "nodes", "--json", "--home", home) == 0
        listed = json.loads(capfd.readouterr().out)
    result = json.loads(run["out"].read_text())
    assert [r["clients"] for r in result["replies"].values()] == ["0-1"]  # clients 2-5 never got a message
    assert [n["node-id"] for n in listed["nodes"]] == result["nodes"] == list(result["replies"])
    assert listed["nodes"][0]["status"] == "online"
