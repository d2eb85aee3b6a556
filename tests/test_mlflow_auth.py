"""A real `mlflow server --app-name basic-auth`, configured like the one in k8s/base/mlflow/mlflow.yaml.

SQLite backend and its own SQLite user store in tmp, a free port, the admin bootstrapped from
MLFLOW_AUTH_ADMIN_PASSWORD, and the manifest's exact --allowed-hosts. The Kubernetes Job's script
(k8s/base/mlflow/create_user.py) creates the non-admin user a trial then logs as through
protscale.tracking.runs; unauthenticated, wrongly authenticated and unauthorized writes are refused
with one line that says what to set.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from protscale.errors import UserError
from protscale.tracking.auth import check_tracking_access, mlflow_errors
from protscale.tracking import contract as c
from protscale.tracking import runs
from servers import free_port, session_pids, wait_for_health

pytestmark = pytest.mark.slow          # a real server: start, migrations, two users; ~30 s or more

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "k8s/base/mlflow/mlflow.yaml"
CREATE_USER = REPO / "k8s/base/mlflow/create_user.py"
MLFLOW = Path(sys.executable).parent / "mlflow"
ADMIN = "admin"
RAY_USER = "ray"





def manifest_allowed_hosts() -> str:
    (hosts,) = re.findall(r'--allowed-hosts "([^"]+)"', MANIFEST.read_text())
    return hosts


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    admin_password = secrets.token_hex(12)                   # 24 characters (MLflow wants >= 12)
    ini = tmp / "basic_auth.ini"
    ini.write_text("[mlflow]\n"
                   "default_permission = READ\n"
                   f"database_uri = sqlite:///{tmp / 'auth.db'}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # Configured through the same environment variables as the Deployment in the manifest.
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_USERNAME=ADMIN,
               MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
               MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp / 'mlflow.db'}",
               MLFLOW_ARTIFACTS_DESTINATION=str(tmp / "artifacts"),
               # Not in the Deployment: MLflow's background job runners (GenAI features) took up to
               # 40 s of server start-up on a 2-core machine, and nothing here uses them.
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    # One worker (the Deployment runs 2): uvicorn's supervisor kills workers that take over 5 s to
    # start, which they do on a loaded CI machine.
    cmd = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--app-name", "basic-auth",
           "--serve-artifacts", "--workers", "1", "--allowed-hosts", manifest_allowed_hosts()]
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, tmp / "server.log", timeout_s=120)
        yield {"url": url, "admin_password": admin_password, "ray_password": secrets.token_hex(12)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


@pytest.fixture(scope="module")
def ray_user(server):
    """The non-admin user, created the way the Kubernetes Job creates it (the same script)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=server["url"], MLFLOW_TRACKING_USERNAME=ADMIN,
               MLFLOW_TRACKING_PASSWORD=server["admin_password"], PROTSCALE_USER_USERNAME=RAY_USER,
               PROTSCALE_USER_PASSWORD=server["ray_password"], PROTSCALE_WAIT_S="30")
    first = subprocess.run([sys.executable, str(CREATE_USER)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 0, first.stderr
    assert "created MLflow user 'ray'" in first.stdout
    again = subprocess.run([sys.executable, str(CREATE_USER)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "exists" in again.stdout, again.stderr    # idempotent
    return RAY_USER, server["ray_password"]


def test_the_user_script_refuses_wrong_admin_credentials(server, ray_user):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=server["url"], MLFLOW_TRACKING_USERNAME=ADMIN,
               MLFLOW_TRACKING_PASSWORD="not-the-admin-password", PROTSCALE_USER_USERNAME="eve",
               PROTSCALE_USER_PASSWORD="a-long-enough-password")
    proc = subprocess.run([sys.executable, str(CREATE_USER)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "rejected the admin credentials" in proc.stderr


@pytest.fixture
def as_user(monkeypatch):
    def login(username: str | None, password: str | None):
        for var, value in (("MLFLOW_TRACKING_USERNAME", username), ("MLFLOW_TRACKING_PASSWORD", password)):
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, value)
    for var in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return login


def _admin_client(server, as_user):
    from mlflow.tracking import MlflowClient

    as_user(ADMIN, server["admin_password"])
    return MlflowClient(tracking_uri=server["url"])


def test_a_trial_logs_with_credentials(server, ray_user, as_user):
    as_user(*ray_user)
    uri = server["url"]
    check_tracking_access(uri)
    params = {c.OBJECTIVE: "clm", c.SIZE: "tiny-2", c.N_PARAMS: 12345, c.BUDGET_FLOPS: 1e12, c.SEED: 0}
    with mlflow_errors(uri):
        run_id = runs.start_run(uri, "auth-sweep", "trial-0", params, {c.SWEEP: "auth-sweep",
                                                                    c.SOURCE: c.SOURCE_TRAINED})
        log = runs.MetricsLogger(uri, run_id)
        for step in (1, 2, 3):
            log.log(step, {c.TRAIN_LOSS: 3.0 - step / 10, c.TOKENS: 1024 * step})
        log.flush()
        runs.finish_run(uri, run_id, c.STATUS_COMPLETED)

    client = _admin_client(server, as_user)          # read back as someone else: it really is there
    run = client.get_run(run_id)
    assert run.data.params[c.OBJECTIVE] == "clm" and run.data.params[c.N_PARAMS] == "12345"
    assert run.data.tags[c.STATUS] == c.STATUS_COMPLETED and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, c.TRAIN_LOSS)] == [1, 2, 3]
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "auth-sweep"


def test_an_unauthenticated_write_is_refused_with_one_clear_line(server, as_user):
    as_user(None, None)
    uri = server["url"]
    with pytest.raises(UserError) as info:
        with mlflow_errors(uri):
            runs.start_run(uri, "intruder-sweep", "trial-0", {c.OBJECTIVE: "clm"}, {})
    message = str(info.value)
    assert "\n" not in message
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert uri in message
    with pytest.raises(UserError, match="requires a login"):
        check_tracking_access(uri)
    # Refused at the server, not just on the client side: nothing was written.
    assert _admin_client(server, as_user).get_experiment_by_name("intruder-sweep") is None
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/create", method="POST",
                                 data=b'{"name": "raw-intruder"}',
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=10)
    assert raw.value.code == 401


def test_a_wrong_password_is_refused(server, ray_user, as_user):
    as_user(ray_user[0], "not-the-password")
    with pytest.raises(UserError, match="rejected the credentials of user 'ray'"):
        check_tracking_access(server["url"])


def test_the_ray_user_cannot_write_to_someone_elses_experiment(server, ray_user, as_user):
    admin = _admin_client(server, as_user)
    exp_id = admin.create_experiment("admins-only")
    as_user(*ray_user)
    from mlflow.tracking import MlflowClient

    with pytest.raises(UserError, match="denied user 'ray'"):
        with mlflow_errors(server["url"]):
            MlflowClient(tracking_uri=server["url"]).create_run(exp_id)
    # ...but can read it (default_permission = READ, as in the manifest's basic_auth.ini).
    assert MlflowClient(tracking_uri=server["url"]).get_experiment(exp_id).name == "admins-only"


@pytest.mark.parametrize("host, allowed", [
    ("mlflow:5000", True),                                    # Ray pods: http://mlflow:5000
    ("mlflow.protscale.svc.cluster.local:5000", True),        # fully qualified service name
    ("localhost:5000", True),                                 # kubectl port-forward svc/mlflow 5000
    ("evil.example.com", False),                              # DNS rebinding protection stays on
])
def test_manifest_allowed_hosts(server, ray_user, host, allowed):
    import base64

    creds = base64.b64encode(f"{ray_user[0]}:{ray_user[1]}".encode()).decode()
    req = urllib.request.Request(f"{server['url']}/api/2.0/mlflow/experiments/search?max_results=1",
                                 headers={"Host": host, "Authorization": f"Basic {creds}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            code = resp.status
    except urllib.error.HTTPError as e:
        code = e.code
    assert (code == 200) == allowed, (host, code)


@pytest.mark.parametrize("argv", [["fit", "--experiment", "any"], ["sweep", "SPACE"]])
def test_commands_fail_fast_in_one_line_without_a_login(server, as_user, argv, tmp_path, capsys):
    """`protscale fit` / `sweep` against a server that wants a login: one line naming the variables,
    before any Ray cluster starts or any trial runs."""
    from protscale.cli import main

    space = tmp_path / "space.py"
    space.write_text("from protscale.sweep.space import SearchSpace, Trial\n"
                     f"SPACE = SearchSpace('auth', {str(tmp_path)!r}, [Trial('clm', 'tiny-2', 2e10)],\n"
                     "                    defaults={'batch_tokens': 2048})\n")
    (tmp_path / "manifest.json").write_text('{"seq_len": 128}')
    as_user(None, None)
    argv = [str(space) if a == "SPACE" else a for a in argv]
    assert main([*argv, "--tracking-uri", server["url"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "requires a login" in err and "MLFLOW_TRACKING_USERNAME" in err
