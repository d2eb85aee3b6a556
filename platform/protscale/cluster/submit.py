"""Ray jobs on any Ray cluster (local head, KubeRay on Kubernetes) through the Ray Jobs API.

``protscale submit -- python jobs/sweep.py search_spaces/demo_cpu.py`` uploads the working
directory (``.gitignore`` honoured, Ray's 512 MiB cap), ships ``platform/protscale`` as a py_module
when the working directory is a protscale checkout (so ``import protscale`` works on a cluster whose
image does not have it installed), adds ``--pip`` requirements and ``--env`` variables, submits, and
follows the logs until the job ends (``--no-wait`` returns at once). ``status``, ``logs`` and ``stop``
take the job id ``submit`` printed.

Address: ``--address``, else ``$RAY_ADDRESS``, else http://127.0.0.1:8265 (the dashboard port,
e.g. ``kubectl port-forward svc/protscale-head-svc 8265:8265``).

Ray token authentication (Ray >= 2.52; KubeRay ``authOptions: {mode: token}``): Ray's own job client
sends a token only when the *client's* environment has ``RAY_AUTH_MODE=token``. protscale sends it
whenever it finds one, in this order: ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, and
``~/.ray/auth_token`` when ``RAY_AUTH_MODE=token``. A cluster that refuses the request gets a one-line
error that says which variable to set.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path

from protscale.errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Never uploaded, even without a .gitignore (Ray honours .gitignore files on top of these).
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "**/__pycache__", "*.pyc", ".pytest_cache", "mlflow.db",
                    "mlruns", "runs", ".demo", "k8s/secrets/*.env"]
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL", re.IGNORECASE)
TOKEN_HELP = ("set RAY_AUTH_TOKEN (on Kubernetes: export RAY_AUTH_TOKEN=$(kubectl -n protscale get "
              "secret ray-auth-token -o jsonpath='{.data.auth_token}' | base64 -d))")


# --------------------------------------------------------------------------------------------
# address, token, client
# --------------------------------------------------------------------------------------------

def resolve_address(address: str | None = None) -> str:
    """The Jobs API URL: ``address``, ``$RAY_ADDRESS`` or the local default; ``http://`` added."""
    addr = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip().rstrip("/")
    if addr == "auto" or addr.startswith("ray://"):
        raise UserError(f"{addr!r} is not a Ray Jobs API address: give the dashboard URL, "
                        f"e.g. --address {DEFAULT_ADDRESS}")
    if "://" not in addr:
        addr = "http://" + addr
    return addr


def auth_token() -> str | None:
    """The Ray auth token this client can send, if any (see the module docstring for the order)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    paths = []
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        paths.append(Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser())
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        paths.append(Path.home() / ".ray" / "auth_token")
    for path in paths:
        if path.is_file():
            token = path.read_text().strip()
            if token:
                return token
    return None


def connect(address: str | None = None):
    """A ``JobSubmissionClient`` for the cluster, or a one-line ``UserError``."""
    import requests
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        raise UserError(f"cannot reach the Ray Jobs API at {url}: is the cluster up (and "
                        f"`kubectl -n protscale port-forward svc/protscale-head-svc 8265:8265` running)? "
                        f"Give the dashboard address with --address or RAY_ADDRESS") from None
    except Exception as exc:  # noqa: BLE001 - every way Ray reports a refusal becomes one line
        raise _as_user_error(exc, url) from None


def _as_user_error(exc: Exception, url: str, job_id: str | None = None) -> UserError:
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    # Ray raises AuthenticationError for both: 401 "Authentication required" (no token sent) and
    # 403 "Authentication failed" (a wrong token).
    if "Authentication failed" in first or "403" in first or "Forbidden" in first:
        return UserError(f"the Ray cluster at {url} refused the token: check RAY_AUTH_TOKEN "
                         f"(or RAY_AUTH_TOKEN_PATH) against the cluster's token")
    if type(exc).__name__ == "AuthenticationError" or "401" in first or "Unauthorized" in first:
        return UserError(f"the Ray cluster at {url} requires a token and none was sent: {TOKEN_HELP}")
    if job_id and ("404" in first or "does not exist" in text):
        return UserError(f"no job {job_id!r} on the Ray cluster at {url}")
    return UserError(f"{first} ({url})")


def _call(client, method: str, *args, job_id: str | None = None):
    try:
        return getattr(client, method)(*args)
    except Exception as exc:  # noqa: BLE001
        import requests

        if isinstance(exc, (ConnectionError, requests.exceptions.ConnectionError)):
            raise UserError(f"lost the Ray Jobs API at {client.get_address()}") from None
        raise _as_user_error(exc, client.get_address(), job_id) from None


# --------------------------------------------------------------------------------------------
# runtime environment
# --------------------------------------------------------------------------------------------

def parse_env(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs; a bare ``KEY`` copies the variable from this environment."""
    env = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"--env {item!r}: expected KEY=VALUE or the name of a set variable")
        if not sep:
            if key not in os.environ:
                raise UserError(f"--env {key}: not set in this environment (use {key}=VALUE)")
            value = os.environ[key]
        env[key] = value
    return env


def parse_pip(items: list[str]) -> list[str]:
    """Requirement specifiers; an item naming an existing file is read as a requirements file."""
    packages = []
    for item in items or []:
        path = Path(item)
        if item.endswith(".txt") or path.is_file():
            if not path.is_file():
                raise UserError(f"--pip {item}: no such requirements file")
            packages += [line.split("#")[0].strip() for line in path.read_text().splitlines()
                         if line.split("#")[0].strip()]
        else:
            packages.append(item)
    return packages


def build_runtime_env(working_dir: str | Path | None, env: dict[str, str] | None = None,
                      pip: list[str] | None = None, package: bool = True) -> dict:
    """The Ray runtime_env for a submission (pure: no cluster needed)."""
    runtime_env: dict = {}
    if working_dir is not None:
        wd = Path(working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise UserError(f"--working-dir {working_dir}: not a directory")
        runtime_env["working_dir"] = str(wd)
        runtime_env["excludes"] = list(DEFAULT_EXCLUDES)
        pkg = wd / "platform" / "protscale"
        if package and (pkg / "__init__.py").is_file():
            runtime_env["py_modules"] = [str(pkg)]
    if env:
        runtime_env["env_vars"] = dict(env)
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------

def submit(entrypoint: list[str], *, address: str | None = None, working_dir: str | None = ".",
           env: dict[str, str] | None = None, pip: list[str] | None = None, package: bool = True,
           submission_id: str | None = None, wait: bool = True, out=None) -> int:
    out = out or sys.stdout
    if entrypoint and entrypoint[0] == "--":
        entrypoint = entrypoint[1:]
    if not entrypoint:
        raise UserError("nothing to run: protscale submit [options] -- python jobs/sweep.py ...")
    for key in env or {}:
        if _SECRET_NAME.search(key):
            print(f"protscale submit: warning: {key} goes into the job's runtime_env, which anyone who "
                  f"can read the cluster's dashboard can see; prefer a Kubernetes Secret",
                  file=sys.stderr)
    runtime_env = build_runtime_env(working_dir, env, pip, package)
    client = connect(address)
    url = client.get_address()
    command = shlex.join(entrypoint)
    try:
        job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env,
                                   submission_id=submission_id,
                                   metadata={"submitted_by": "protscale"})
    except Exception as exc:  # noqa: BLE001
        raise _as_user_error(exc, url) from None
    print(f"submitted {job_id} to {url}: {command}", file=out, flush=True)
    if not wait:
        print(f"  protscale status {job_id}\n  protscale logs {job_id} --follow\n"
              f"  protscale stop {job_id}", file=out)
        return 0
    try:
        follow_logs(client, job_id, out)
    except KeyboardInterrupt:
        print(f"\ndetached; {job_id} keeps running (protscale stop {job_id} to stop it)",
              file=sys.stderr)
        return 130
    final = wait_for(client, job_id)
    print(f"{job_id}: {final}", file=out)
    return 0 if final == "SUCCEEDED" else 1


def wait_for(client, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        st = _call(client, "get_job_status", job_id, job_id=job_id)
        st = str(getattr(st, "value", st))
        if st in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return st
        time.sleep(poll_s)


def follow_logs(client, job_id: str, out=None) -> None:
    """Stream the job's logs until it ends."""
    out = out or sys.stdout
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _as_user_error(exc, client.get_address(), job_id) from None


def status(job_id: str, address: str | None = None, out=None) -> int:
    out = out or sys.stdout
    client = connect(address)
    info = _call(client, "get_job_info", job_id, job_id=job_id)
    st = getattr(info.status, "value", info.status)
    line = f"{job_id}: {st}"
    if info.message:
        line += f" - {info.message.strip().splitlines()[0]}"
    print(line, file=out)
    print(f"  entrypoint: {info.entrypoint}", file=out)
    if info.start_time:
        end = info.end_time or time.time() * 1000
        print(f"  running time: {(end - info.start_time) / 1000:.1f} s", file=out)
    return 0


def logs(job_id: str, address: str | None = None, follow: bool = False, out=None) -> int:
    out = out or sys.stdout
    client = connect(address)
    if follow:
        _call(client, "get_job_status", job_id, job_id=job_id)     # unknown id: a clear error first
        try:
            follow_logs(client, job_id, out)
        except KeyboardInterrupt:
            return 130
        return 0
    out.write(_call(client, "get_job_logs", job_id, job_id=job_id))
    out.flush()
    return 0


def stop(job_id: str, address: str | None = None, wait: bool = True, out=None) -> int:
    out = out or sys.stdout
    client = connect(address)
    stopped = _call(client, "stop_job", job_id, job_id=job_id)
    if not stopped:
        st = wait_for(client, job_id, timeout_s=0)
        print(f"{job_id}: already {st}", file=out)
        return 0
    st = wait_for(client, job_id, timeout_s=60) if wait else "STOPPING"
    print(f"{job_id}: {st}", file=out)
    return 0
