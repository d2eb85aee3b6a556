"""Helpers for tests that start real servers (`ray start --head`, `mlflow server`) as child processes."""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Live processes of the session that a server started with ``start_new_session=True`` leads: what
    is left of *that* server, by process id (never a name-based kill that could hit other servers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def wait_for_health(url: str, proc, log: Path, timeout_s: float = 180) -> None:
    """Block until ``url``/health answers 200; fail the test with the server's log if it exits or the
    time runs out."""
    import time
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            state = "exited" if proc.poll() is not None else f"did not answer /health within {timeout_s:.0f} s"
            pytest.fail(f"server {state}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
