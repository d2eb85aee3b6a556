"""Tracking that survives the network, on the store the Kubernetes deployment uses: a real PostgreSQL
behind a real ``mlflow server``.

* the bulk reader returns exactly what was logged, straight from PostgreSQL and through the server;
* the trial-side writer (``runs.MetricsLogger``) keeps logging while the server is SIGKILLed and started
  again, and while an answer to a batch that did land is lost on the way back: every step is in the
  store exactly once.

PostgreSQL comes from Debian's ``postgresql`` package (``.ci/run`` installs it); without its programs the
PostgreSQL tests are skipped and the writer test runs against a server on SQLite.
"""

from __future__ import annotations

import threading
import time

import pytest

from protscale.tracking import contract as c
from protscale.tracking import runs
from protscale.tracking.reader import read_experiments
from servers import MlflowServer, Postgres, ResponseDroppingProxy, postgres_binaries
from test_tracking_reader import _check_tables, _log_store, _norm, _rows

pytestmark = pytest.mark.slow
PG = postgres_binaries()
NO_PG = "PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does it)"


@pytest.fixture(scope="module")
def postgres():
    if PG is None:
        pytest.skip(NO_PG)
    pg = Postgres(PG).start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def backend(request, tmp_path_factory):
    """The server's store: a PostgreSQL database when PostgreSQL is installed, else a SQLite file."""
    if PG is None:
        return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mlflow.db'}"
    return request.getfixturevalue("postgres").create_db("mlflow")


@pytest.fixture(scope="module")
def server(backend, tmp_path_factory):
    srv = MlflowServer(backend, tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_reader_and_server_on_postgres(postgres, server, backend):
    """Runs logged through the server land in PostgreSQL; the reader's direct SQL path and its HTTP path
    both return every value exactly as logged (NaN, repeated steps, deleted runs left out)."""
    expected = _log_store(server.url)
    sql = read_experiments(backend, ["sweep-a", "sweep-b"])
    _check_tables(sql, expected)
    assert sql.round_trips <= 6
    http = read_experiments(server.url, ["sweep-a", "sweep-b"])
    _check_tables(http, expected)
    assert _norm(_rows(http.metrics)) == _norm(_rows(sql.metrics))


STEPS, FLUSH_EVERY = 60, 5


def test_writer_survives_a_killed_server_and_a_lost_answer(server, monkeypatch):
    """A writer logs 60 steps (train_loss + lr each step; val_loss, tokens at each flush) through a
    proxy that drops the answer to one batch that landed; midway the server is SIGKILLed and started
    again. Afterwards every (key, step) is in the store once, with the value that was logged."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")     # reads: our retry loop, not MLflow's
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    proxy = ResponseDroppingProxy(server.port, drops=1)
    try:
        run_id = runs.start_run(server.url, "network", "writer", {c.SEED: 0}, {c.KIND: "trial"})
        logger = runs.MetricsLogger(proxy.url, run_id, retry_s=300, backoff_s=0.2, max_backoff_s=2.0)
        expected: dict[tuple[str, int], float] = {}
        progress = {"flushed": 0, "error": None}

        def write():
            try:
                for step in range(1, STEPS + 1):
                    point = {c.TRAIN_LOSS: 3.0 - step / 100, c.LR: step * 1e-5}
                    if step % FLUSH_EVERY == 0:
                        point.update({c.VAL_LOSS: 3.1 - step / 100, c.TOKENS: 1000.0 * step})
                    logger.log(step, point)
                    expected.update({(k, step): v for k, v in point.items()})
                    if step % FLUSH_EVERY == 0:
                        logger.flush()
                        progress["flushed"] = step
                    time.sleep(0.05)
            except BaseException as exc:      # noqa: BLE001 -- reported by the test below
                progress["error"] = exc

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 120
        while progress["flushed"] < 3 * FLUSH_EVERY and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        killed_at = progress["flushed"]
        server.kill()                          # mid-sweep crash: connections refused until it is back
        time.sleep(1.0)
        server.start()
        writer.join(timeout=360)
        assert not writer.is_alive(), "writer still blocked after the server came back"
        assert progress["error"] is None, repr(progress["error"])
        assert killed_at < STEPS, "the server was killed after the writer had finished"
        assert proxy.dropped == 1 and logger.retries >= 1 and logger.skipped_on_retry >= 1
    finally:
        proxy.close()

    cl = runs.client(server.url)
    for key in (c.TRAIN_LOSS, c.LR, c.VAL_LOSS, c.TOKENS):
        history = cl.get_metric_history(run_id, key)
        steps = [m.step for m in history]
        assert sorted(steps) == sorted({s for k, s in expected if k == key}), key     # none lost
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice"             # none duplicated
        assert all(m.value == pytest.approx(expected[(key, m.step)]) for m in history)
    print(f"writer: {len(expected)} points, server killed after step {killed_at} and restarted, 1 answer "
          f"dropped; {logger.retries} batch(es) re-sent, {logger.skipped_on_retry} point(s) found already "
          "landed and not re-sent; lost 0, duplicated 0")
