"""What the speed scripts share: running one measurement in a child process, and a process's peak memory.

The scripts run as files; each imports this from its own folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def in_child(script: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --child KIND SPEC`` in a fresh process (its own threads and memory) and read its last line."""
    done = subprocess.run([sys.executable, script, "--child", kind, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM), which unlike ru_maxrss is not inherited across fork + exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")
