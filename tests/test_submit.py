"""`protscale submit/status/logs/stop` against a real local Ray head started by this module.

The head runs with Ray token authentication on (RAY_AUTH_MODE=token), like a KubeRay cluster with
`authOptions: {mode: token}`, on free ports and its own --temp-dir, and is stopped by its own
process id (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from protscale.cli import main
from protscale.errors import UserError
from protscale.cluster import submit as sb
from servers import free_port, session_pids

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


# ----------------------------------------------------------------------------------------------
# without a cluster
# ----------------------------------------------------------------------------------------------

def test_address_resolution(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert sb.resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert sb.resolve_address() == "http://10.0.0.5:8265"
    assert sb.resolve_address("https://ray.example.org/") == "https://ray.example.org"
    with pytest.raises(UserError, match="not a Ray Jobs API address"):
        sb.resolve_address("ray://10.0.0.5:10001")


def test_auth_token_sources(monkeypatch, tmp_path):
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert sb.auth_token() is None                          # Ray's rule: the file only in token mode
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert sb.auth_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert sb.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sb.auth_token() == "from-env"


def test_env_and_pip_parsing(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert sb.parse_env(["A=1", "B=x=y", "MLFLOW_TRACKING_URI"]) == {
        "A": "1", "B": "x=y", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    with pytest.raises(UserError, match="not set"):
        sb.parse_env(["PROTSCALE_SURELY_UNSET_VARIABLE"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        sb.parse_env(["1BAD=x"])
    req = tmp_path / "req.txt"
    req.write_text("# pinned\ntorch==2.13.0  # cpu\n\nscipy\n")
    assert sb.parse_pip(["rich", str(req)]) == ["rich", "torch==2.13.0", "scipy"]
    with pytest.raises(UserError, match="no such requirements file"):
        sb.parse_pip([str(tmp_path / "missing.txt")])
    assert sb.parse_pip([str(REPO / "k8s/ray-runtime-requirements.txt")])


def test_runtime_env_of_a_checkout_ships_the_package(tmp_path):
    env = sb.build_runtime_env(REPO, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, ["scipy"])
    assert env["working_dir"] == str(REPO)
    assert env["py_modules"] == [str(REPO / "platform" / "protscale")]
    assert ".git" in env["excludes"] and "k8s/secrets/*.env" in env["excludes"]
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"} and env["pip"] == ["scipy"]
    assert "py_modules" not in sb.build_runtime_env(REPO, package=False)
    assert "py_modules" not in sb.build_runtime_env(tmp_path)
    assert sb.build_runtime_env(None) == {}
    with pytest.raises(UserError, match="not a directory"):
        sb.build_runtime_env(tmp_path / "nope")


def test_unreachable_address_is_one_clear_line(capsys):
    port = free_port()   # nothing listens there
    assert main(["status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot reach the Ray Jobs API" in err and "--address" in err


def test_submit_needs_an_entrypoint(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:1", "--"]) == 2
    assert "nothing to run" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# a real head
# ----------------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with the Jobs API and token auth, on its own ports and temp dir."""
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="psray", dir="/tmp")    # short: Ray's unix sockets live here
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard,
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--ray-client-server-port": free_port()}
    cmd = [str(RAY), "start", "--head", "--block", "--num-cpus", "1", "--temp-dir", temp_dir,
           "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--include-dashboard", "true", "--disable-usage-stats",
           "--min-worker-port", "0", "--max-worker-port", "0"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:                       # up when the Jobs API answers an authenticated request
            if proc.poll() is not None:
                pytest.fail(f"ray start exited: {(Path(temp_dir) / 'ray-start.log').read_text()[-2000:]}")
            try:
                req = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (OSError, urllib.error.HTTPError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Ray head did not come up within 90 s")
            time.sleep(0.5)
        yield {"url": url, "token": token}
    finally:
        proc.send_signal(signal.SIGTERM)          # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in session_pids(proc.pid):       # whatever is left of *this* head, by process id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def authed(monkeypatch, ray_head):
    for var in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head["token"])
    return ray_head["url"]


@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "wd"
    (wd / "data").mkdir(parents=True)
    (wd / ".gitignore").write_text("big.bin\ndata/\n")
    (wd / "big.bin").write_bytes(b"\0" * 4096)
    (wd / "data" / "x.parquet").write_bytes(b"x")
    (wd / "hello.py").write_text(
        "import os, sys\n"
        "print('files:', sorted(os.listdir('.')))\n"
        "print('GREETING=' + os.environ.get('GREETING', '<unset>'))\n"
        "print('args:', sys.argv[1:])\n"
        "sys.exit(int(os.environ.get('EXIT_CODE', '0')))\n")
    (wd / "sleepy.py").write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(600)\n")
    return wd


def _job_id(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("submitted "))
    return line.split()[1]


@pytest.mark.slow
def test_a_token_is_required_and_checked(ray_head, monkeypatch, capsys):
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["status", "raysubmit_x", "--address", ray_head["url"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "requires a token" in err and "RAY_AUTH_TOKEN" in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    assert main(["status", "raysubmit_x", "--address", ray_head["url"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refused the token" in err


@pytest.mark.slow
def test_submit_waits_and_ships_the_working_dir(authed, workdir, capsys):
    rc = main(["submit", "--address", authed, "--working-dir", str(workdir), "--env", "GREETING=hi",
               "--", "python", "hello.py", "--flag", "two words"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    job_id = _job_id(out)
    assert "GREETING=hi" in out and "args: ['--flag', 'two words']" in out
    files = next(ln for ln in out.splitlines() if ln.startswith("files:"))
    assert "hello.py" in files and "big.bin" not in files and "data" not in files   # .gitignore honoured
    assert out.rstrip().endswith(f"{job_id}: SUCCEEDED")

    assert main(["status", job_id, "--address", authed]) == 0
    status_out = capsys.readouterr().out
    assert status_out.startswith(f"{job_id}: SUCCEEDED") and "python hello.py" in status_out

    assert main(["logs", job_id, "--address", authed]) == 0
    assert "GREETING=hi" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failing_job_exits_non_zero(authed, workdir, capsys):
    rc = main(["submit", "--address", authed, "--working-dir", str(workdir), "--env", "EXIT_CODE=3",
               "--", "python", "hello.py"])
    out = capsys.readouterr().out
    assert rc == 1 and out.rstrip().endswith("FAILED")


@pytest.mark.slow
def test_no_wait_then_logs_follow_then_stop(authed, workdir, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", authed)            # the address from the environment
    assert main(["submit", "--no-wait", "--working-dir", str(workdir), "--", "python", "sleepy.py"]) == 0
    job_id = _job_id(capsys.readouterr().out)
    client = sb.connect()
    deadline = time.monotonic() + 60
    while "sleeping" not in client.get_job_logs(job_id):
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.5)
    assert main(["status", job_id]) == 0
    assert capsys.readouterr().out.startswith(f"{job_id}: RUNNING")

    assert main(["stop", job_id]) == 0
    assert capsys.readouterr().out.strip() == f"{job_id}: STOPPED"
    assert main(["status", job_id]) == 0
    assert capsys.readouterr().out.startswith(f"{job_id}: STOPPED")
    assert main(["logs", job_id, "--follow"]) == 0          # returns: the job has ended
    assert "sleeping" in capsys.readouterr().out
    assert main(["stop", job_id]) == 0
    assert "already STOPPED" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("command", ["status", "logs", "stop"])
def test_unknown_job_id_is_one_clear_line(authed, capsys, command):
    assert main([command, "raysubmit_doesnotexist", "--address", authed]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no job 'raysubmit_doesnotexist'" in err


@pytest.mark.slow
def test_sweep_job_entrypoint_runs_on_the_head(authed, demo_data, tmp_path, capsys):
    """`jobs/sweep.py` as users submit it: the repository as working dir, the driver joins the head's
    cluster (RAY_ADDRESS), and the trial lands in the MLflow store as a child of the sweep run."""
    from mlflow.tracking import MlflowClient

    space = tmp_path / "one_trial.py"
    space.write_text("from protscale.sweep.space import SearchSpace, Trial\n"
                     f"SPACE = SearchSpace(name='job-test', data={str(demo_data)!r},\n"
                     "                    trials=[Trial('clm', 'tiny-2', 2e10)], defaults={'batch_tokens': 2048})\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["submit", "--address", authed, "--working-dir", str(REPO), "--",
               "python", "jobs/sweep.py", str(space), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "sweep job-test: 1/1 trials completed" in out and out.rstrip().endswith("SUCCEEDED")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("job-test")
    trials = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'")
    assert [r.data.tags["status"] for r in trials] == ["completed"]
    assert trials[0].data.tags["mlflow.parentRunId"]
