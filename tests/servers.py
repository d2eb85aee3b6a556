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


class MlflowServer:
    """A real ``mlflow server`` child process on a fixed loopback port, which a test can kill (SIGKILL,
    as a crash or an OOM kill would) and start again on the same port and store."""

    def __init__(self, backend_uri: str, work: Path, port: int | None = None):
        self.backend_uri, self.work = backend_uri, Path(work)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.starts = 0

    def start(self, timeout_s: float = 240) -> "MlflowServer":
        import os
        import subprocess
        import sys

        self.work.mkdir(parents=True, exist_ok=True)
        log_path = self.work / f"server-{self.starts}.log"
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(mlflow_bin), "server", "--backend-store-uri", self.backend_uri,
                 "--default-artifact-root", str(self.work / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                cwd=self.work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        wait_for_health(self.url, self.proc, log_path, timeout_s)
        return self

    def kill(self) -> None:
        """SIGKILL the server and every process of its session (by id), and wait until they are gone."""
        import os
        import time

        if self.proc is None:
            return
        for pid in session_pids(self.proc.pid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait()
        deadline = time.monotonic() + 30
        while session_pids(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.proc = None

    def stop(self) -> None:
        import os
        import subprocess

        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.kill()


def postgres_binaries() -> Path | None:
    """The folder of PostgreSQL's server programs (``initdb``, ``pg_ctl``), or None when not installed."""
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


class Postgres:
    """A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl``) on a loopback port, owned by the user
    ``postgres`` when the tests run as root (PostgreSQL refuses to run as root). ``uri(db)`` is a
    SQLAlchemy URI for a database created by ``create_db``."""

    def __init__(self, bindir: Path):
        import tempfile

        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="protscale-pg-", dir="/tmp"))
        self.port = free_port()
        self.data = self.root / "data"

    def _run(self, *args: str, timeout: float = 120):
        import os
        import shutil
        import subprocess

        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/tmp")

    def start(self) -> "Postgres":
        steps = [("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"),
                 ("pg_ctl", "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w", "-t", "120", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")]
        for step in steps:
            res = self._run(*step)
            if res.returncode:
                log = (self.root / "pg.log").read_text()[-2000:] if (self.root / "pg.log").exists() else ""
                raise RuntimeError(f"{step[0]} failed: {res.stdout[-1500:]}{res.stderr[-1500:]}{log}")
        return self

    def create_db(self, name: str) -> str:
        res = self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        if res.returncode:
            raise RuntimeError(f"createdb {name}: {res.stderr}")
        return self.uri(name)

    def uri(self, db: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{db}"     # the driver k8s/ uses

    def stop(self) -> None:
        import shutil

        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class ResponseDroppingProxy:
    """A TCP proxy on a loopback port in front of ``upstream_port`` that forwards everything, except that
    it drops the answer to the next ``drops`` requests containing ``marker`` (the server did the work,
    the client sees its connection close): the "request landed, answer lost" fault of a real network."""

    def __init__(self, upstream_port: int, marker: bytes = b"/runs/log-batch", drops: int = 1):
        import socket
        import threading

        self.upstream_port, self.marker, self.drops = upstream_port, marker, drops
        self.dropped = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:            # server down: the client sees a closed connection
                client.close()
                continue
            state = {"drop": False}
            threading.Thread(target=self._pump, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, state, False), daemon=True).start()

    def _pump(self, src, dst, state, to_server: bool):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if to_server and self.marker in data:
                    with self._lock:
                        if self.dropped < self.drops:
                            self.dropped += 1
                            state["drop"] = True
                if not to_server and state["drop"]:
                    break                      # swallow the answer and hang up
                dst.sendall(data)
        except OSError:
            pass
        finally:
            import socket

            for s in (src, dst):       # shutdown first: it wakes the other pump's recv and sends FIN
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self._closed = True
        self.sock.close()
