"""Flower daemons for tests: started on free loopback ports, waited for by polling, and stopped by PID.

Every process a test starts is recorded; at the end its whole process tree (the daemon, the ``flower-superexec`` it
spawns, the ServerApp/ClientApp processes that one spawns) is found through /proc and stopped by PID: SIGTERM,
then SIGKILL for what is left after a grace period. Each daemon writes to its own log file, which failures quote.
Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

LOG_TAIL = 3000


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fedpal_argv(*args: object) -> list[str]:
    """``fedpal ARGS`` with this interpreter (the daemon commands exec Flower, keeping the PID)."""
    return [sys.executable, "-m", "fedpal", *(str(a) for a in args)]


@dataclass
class Started:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"---- {self.name} (pid {self.process.pid}, exit {self.process.poll()}) ----\n{text[-LOG_TAIL:]}"


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now, parents before children."""
    children = _children_by_parent()
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        queue += children.get(current, [])
    return tree


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"  # a zombie has exited; only its parent's wait is missing


def _signal(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


class Processes:
    """The processes one test started; :meth:`stop_all` ends them and everything they started."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Started] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Started:
        log = self.directory / f"{name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                argv, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=self.directory, start_new_session=True
            )
        started = Started(name, process, log)
        self.started.append(started)
        return started

    def logs(self) -> str:
        return "\n".join(s.tail() for s in self.started)

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM to every started process and its descendants (found before any of them exits, while the tree
        is intact), SIGKILL to any still alive after ``grace`` seconds, and reap the direct children."""
        pids: list[int] = []
        for started in reversed(self.started):
            if started.process.poll() is None:
                pids += [p for p in process_tree(started.process.pid) if p not in pids]
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for started in self.started:
                started.process.poll()  # reap, so a finished child is not left a zombie
            if not any(_alive(p) for p in pids):
                break
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        for started in self.started:
            with suppress(subprocess.TimeoutExpired):
                started.process.wait(timeout=5)


@contextmanager
def flower_processes(directory: Path) -> Iterator[Processes]:
    """Processes started inside the block are stopped when it ends, however it ends."""
    processes = Processes(directory)
    try:
        yield processes
    finally:
        processes.stop_all()


def wait_until(condition: Callable[[], bool], timeout: float, what: str, processes: Processes | None = None) -> None:
    """Poll ``condition`` until true; after ``timeout`` seconds fail, quoting the daemons' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    logs = processes.logs() if processes is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def superlink_healthy(port: int, ca_file: Path | None) -> bool:
    """The SuperLink answers its health route (over HTTPS verified against ``ca_file`` when given)."""
    scheme = "http" if ca_file is None else "https"
    context = None if ca_file is None else ssl.create_default_context(cafile=str(ca_file))
    try:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=2, context=context) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
        return False
