"""Create (or re-password) the MLflow user that Ray jobs log as, on a basic-auth tracking server.

Run by the `mlflow-create-ray-user` Job (k8s/base/mlflow/create-ray-user-job.yaml) with the admin's
credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD and the new user's in
PROTSCALE_USER_USERNAME / PROTSCALE_USER_PASSWORD. Idempotent: an existing user gets the password
from the Secret (so rotating the Secret and re-running the Job rotates the password).
The user is not an admin: it can create experiments (it manages those it creates) and read others.

Standard library only (MLflow's basic-auth REST API), so it starts in a fraction of a second.
tests/test_mlflow_auth.py runs this file against a real `mlflow server --app-name basic-auth`.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

USERS = "/api/2.0/mlflow/users"


def wait_for_server(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"create_user: MLflow did not answer at {url}/health within {timeout_s:.0f} s")
        time.sleep(2)


def call(url: str, method: str, path: str, auth: str, body: dict | None = None,
         query: dict | None = None) -> tuple[int, dict]:
    target = f"{url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(target, data=data, method=method,
                                 headers={"Authorization": auth, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read().decode() or "{}"
            return resp.status, json.loads(text)
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"message": text}


def main() -> int:
    url = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    admin = os.environ["MLFLOW_TRACKING_USERNAME"]
    admin_password = os.environ["MLFLOW_TRACKING_PASSWORD"]
    username = os.environ["PROTSCALE_USER_USERNAME"]
    password = os.environ["PROTSCALE_USER_PASSWORD"]
    if len(password) < 12:
        sys.exit(f"create_user: the password of {username!r} is shorter than 12 characters")
    wait_for_server(url, float(os.environ.get("PROTSCALE_WAIT_S", "300")))
    auth = "Basic " + base64.b64encode(f"{admin}:{admin_password}".encode()).decode()

    status, body = call(url, "GET", f"{USERS}/get", auth, query={"username": username})
    if status == 401:
        sys.exit(f"create_user: MLflow rejected the admin credentials of {admin!r} (Secret mlflow-server)")
    if status == 200:
        status, body = call(url, "PATCH", f"{USERS}/update-password", auth,
                            body={"username": username, "password": password})
        if status != 200:
            sys.exit(f"create_user: could not set the password of {username!r}: {status} {body}")
        print(f"create_user: MLflow user {username!r} exists; password set from the Secret")
        return 0
    if body.get("error_code") != "RESOURCE_DOES_NOT_EXIST":
        sys.exit(f"create_user: unexpected answer looking up {username!r}: {status} {body}")
    status, body = call(url, "POST", f"{USERS}/create", auth,
                        body={"username": username, "password": password})
    if status != 200:
        sys.exit(f"create_user: could not create {username!r}: {status} {body}")
    print(f"create_user: created MLflow user {username!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
