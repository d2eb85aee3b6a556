"""Trial-side MLflow writing: one run per trial, kept across worker restarts, every step logged once.

The driver creates (or finds) the trial's run before training starts and hands its id to the workers,
so a restarted worker group re-attaches to the same run. Rank 0 buffers metrics and writes them with
``log_batch``; on attach it reads how far the run's history already goes and never writes a step twice
(steps re-trained after a restart from an older checkpoint are skipped, not duplicated).
"""

from __future__ import annotations

import time

from . import contract as c

_BATCH = 1000              # MLflow's log_batch limit on metrics per call


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=c.resolve_tracking_uri(tracking_uri))


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, created if needed. With a SQLite store, artifacts go beside the database
    file (MLflow's default, ``./mlruns``, would depend on each process's working directory)."""
    cl = client(tracking_uri)
    exp = cl.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    uri = c.resolve_tracking_uri(tracking_uri)
    location = None
    if uri.startswith("sqlite:///"):
        from pathlib import Path

        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return cl.create_experiment(name, artifact_location=location)
    except Exception:           # created meanwhile by a concurrent trial
        exp = cl.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(tracking_uri: str, experiment: str, trial: str, trial_hash: str | None = None,
             status: str | None = None) -> str | None:
    """The run id of trial ``trial`` in ``experiment``, if one exists (used to resume, never to duplicate).
    With ``trial_hash``, only a run of that identity (param ``trial_hash``) counts; without, the latest
    run of that name. With ``status``, only runs whose status tag is that one."""
    cl = client(tracking_uri)
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        return None
    where = f"tags.{c.TRIAL} = {_quote(trial)}"
    if trial_hash:
        where += f" and params.{c.TRIAL_HASH} = {_quote(trial_hash)}"
    if status:
        where += f" and tags.{c.STATUS} = {_quote(status)}"
    runs = cl.search_runs([exp.experiment_id], filter_string=where, max_results=1,
                          order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _quote(value: str) -> str:
    """A string literal of MLflow's search grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def start_run(tracking_uri: str, experiment: str, name: str, params: dict, tags: dict,
              parent_run_id: str | None = None, trial_hash: str | None = None) -> str:
    """Find the run tagged ``trial=name`` (and of identity ``trial_hash`` when given) or create it, with
    params and tags; returns its id. Older runs of the same name under another identity are tagged
    ``superseded_by`` the new run (kept, never reused)."""
    from mlflow.entities import Param

    run_id = find_run(tracking_uri, experiment, name, trial_hash)
    cl = client(tracking_uri)
    if run_id is None:
        all_tags = {c.TRIAL: name, c.STATUS: c.STATUS_RUNNING, **tags}
        if parent_run_id:
            all_tags[c.PARENT_RUN_ID] = parent_run_id
        run = cl.create_run(experiment_id(tracking_uri, experiment), run_name=name, tags=all_tags)
        run_id = run.info.run_id
        cl.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        if trial_hash:
            exp_id = run.info.experiment_id
            for old in cl.search_runs([exp_id], filter_string=f"tags.{c.TRIAL} = {_quote(name)}", max_results=1000):
                if old.info.run_id != run_id and old.data.params.get(c.TRIAL_HASH) != trial_hash:
                    cl.set_tag(old.info.run_id, c.SUPERSEDED_BY, run_id)
    else:
        cl.update_run(run_id, status="RUNNING")
        cl.set_tag(run_id, c.STATUS, c.STATUS_RUNNING)
    return run_id


def finish_run(tracking_uri: str, run_id: str, status: str, reason: str = "") -> None:
    """Tag the trial's outcome (completed / diverged / failed) and close the MLflow run; a failed run
    also gets ``failure_reason``, one line."""
    cl = client(tracking_uri)
    if reason:
        cl.set_tag(run_id, c.FAILURE_REASON, " ".join(reason.split())[:500])
    cl.set_tag(run_id, c.STATUS, status)
    cl.set_terminated(run_id, status="FINISHED" if status == c.STATUS_COMPLETED else "FAILED")


class MetricsLogger:
    """Buffered, exactly-once metric writer for one run (use on one process per run: rank 0).

    Network faults: a batch that fails for a reason that may pass (server unreachable or restarting,
    timeout, HTTP 5xx/429, a database error) is sent again with exponential backoff (``backoff_s``
    doubling up to ``max_backoff_s``) for up to ``retry_s`` seconds, then the error is raised. A retried
    batch never lands twice:

    * each point keeps the timestamp it was given when logged, so a re-sent point is the same row
      (MLflow's SQL stores drop an identical (key, step, value, timestamp) instead of appending it);
    * before re-sending, the steps of the batch that already landed (the server may have committed
      and failed before answering) are read back with ``get_metric_history`` and left out;
    * over HTTP the batch goes out with MLflow's own retries off (they re-send a POST whose answer
      was lost, blindly), so the only re-send is the checked one above.
    """

    def __init__(self, tracking_uri: str, run_id: str, step_key: str = c.TRAIN_LOSS, retry_s: float = 600.0,
                 backoff_s: float = 0.5, max_backoff_s: float = 15.0):
        self.client, self.run_id = client(tracking_uri), run_id
        self.uri = c.resolve_tracking_uri(tracking_uri)
        self.retry_s, self.backoff_s, self.max_backoff_s = retry_s, backoff_s, max_backoff_s
        self.retries = 0                   # batches re-sent after a fault (for tests and logs)
        self.skipped_on_retry = 0          # points found already logged when a batch was re-sent
        history = self._retrying(lambda: self.client.get_metric_history(run_id, step_key), "read the run's history")
        self.logged_through = max((m.step for m in history), default=0)
        self._buffer: list = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None)

    def flush(self) -> None:
        for i in range(0, len(self._buffer), _BATCH):
            self._send(self._buffer[i:i + _BATCH])
        if self._buffer:
            self.logged_through = max(m.step for m in self._buffer)
        self._buffer = []

    # --- sending, with retries ----------------------------------------------------------------------
    def _send(self, batch: list) -> None:
        attempt = {"n": 0}

        def once():
            todo = batch
            if attempt["n"]:             # a retry: leave out what the failed attempt did write
                todo = self._not_landed(batch)
                self.skipped_on_retry += len(batch) - len(todo)
                self.retries += 1
            attempt["n"] += 1
            if todo:
                self._post(todo)

        self._retrying(once, f"log {len(batch)} metric values")

    def _not_landed(self, batch: list) -> list:
        landed: set = set()
        for key in sorted({m.key for m in batch}):
            landed |= {(key, m.step) for m in self.client.get_metric_history(self.run_id, key)}
        return [m for m in batch if (m.key, m.step) not in landed]

    def _post(self, metrics: list) -> None:
        if not self.uri.startswith(("http://", "https://")):
            self.client.log_batch(self.run_id, metrics=metrics)
            return
        import json

        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.proto_json_utils import message_to_json
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        endpoint = "/api/2.0/mlflow/runs/log-batch"
        body = json.loads(message_to_json(LogBatch(run_id=self.run_id, metrics=[m.to_proto() for m in metrics])))
        resp = http_request(get_default_host_creds(self.uri), endpoint, "POST", json=body, max_retries=0,
                            timeout=60)
        verify_rest_response(resp, endpoint)

    def _retrying(self, fn, what: str):
        start = time.monotonic()
        delay, failures = self.backoff_s, 0
        while True:
            try:
                result = fn()
            except Exception as exc:
                if not transient(exc) or time.monotonic() - start + delay > self.retry_s:
                    raise
                if failures == 0:           # one line when it starts failing, one when it recovers
                    first = str(exc).splitlines()[0][:200] if str(exc) else ""
                    print(f"[mlflow] could not {what} ({type(exc).__name__}: {first}); retrying with backoff "
                          f"for up to {self.retry_s:.0f} s", flush=True)
                failures += 1
                time.sleep(delay)
                delay = min(2 * delay, self.max_backoff_s)
                continue
            if failures:
                print(f"[mlflow] {what}: done after {failures} failed attempt(s), "
                      f"{time.monotonic() - start:.1f} s", flush=True)
            return result


#: MLflow error codes that no retry can fix (the request itself is wrong or not allowed).
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "PERMISSION_DENIED",
              "UNAUTHENTICATED", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "ENDPOINT_NOT_FOUND"}


def transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call may succeed if made again: connection errors and timeouts, HTTP 5xx
    and 429 (a server restarting or overloaded), database errors of SQL stores; not a refused login, an
    unknown run or an invalid value."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = getattr(exc, "error_code", "") or ""
        if code in _PERMANENT:
            return False
        status = getattr(exc, "get_http_status_code", lambda: 500)()
        return status >= 500 or status == 429 or code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "")
    import requests
    import sqlalchemy.exc

    return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                            TimeoutError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.DisconnectionError))
