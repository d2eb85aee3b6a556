"""The bulk reader returns exactly what was logged, on a SQLite store and through a real ``mlflow server``."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protscale.errors import UserError
from protscale.tracking import contract as c
from protscale.tracking import reader
from protscale.tracking.reader import UnknownExperimentError, curves, read_experiments
from servers import free_port, wait_for_health

T0 = 1_700_000_000_000


def _log_store(uri: str) -> dict:
    """Two experiments of trial runs (+ a parent, a deleted run, a deleted and an unrelated experiment)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(tracking_uri=uri)
    expected = {"runs": {}, "metrics": []}
    for e, exp_name in enumerate(["sweep-a", "sweep-b"]):
        exp_id = cl.create_experiment(exp_name)
        parent = cl.create_run(exp_id, run_name=f"{exp_name}-parent", tags={c.KIND: "sweep", c.SWEEP: exp_name},
                               start_time=T0)
        cl.set_terminated(parent.info.run_id, "FINISHED", end_time=T0 + 5)
        expected["runs"][parent.info.run_id] = dict(
            experiment=exp_name, run_name=f"{exp_name}-parent", status="FINISHED", params={},
            tags={c.KIND: "sweep", c.SWEEP: exp_name}, parent=None)
        for i in range(3):
            n = 1_000_000 * (i + 1) * (e + 1)
            params = {c.OBJECTIVE: "clm" if e == 0 else "mlm", c.SIZE: f"tiny-{i}", c.N_PARAMS: str(n + 7),
                      c.N_PARAMS_NON_EMBEDDING: str(n), c.BUDGET_FLOPS: "1e+15", c.LAYERS: str(i + 2),
                      "extra_param": f"x{i}"}
            if i == 2:
                params[c.TOKENS_TARGET] = "not-a-number"      # typed column must be null, not an error
            tags = {c.SWEEP: exp_name, c.STATUS: c.STATUS_COMPLETED, c.SOURCE: c.SOURCE_TRAINED,
                    c.KIND: "trial", c.TRIAL: f"t{i}", "custom": "yes", c.PARENT_RUN_ID: parent.info.run_id}
            run = cl.create_run(exp_id, run_name=f"{exp_name}-t{i}", tags=tags, start_time=T0 + i)
            rid = run.info.run_id
            ms = []
            for step in range(1, 41 + 10 * i):
                for key, val in ((c.VAL_LOSS, 3.0 / step + i), (c.TOKENS, 1000.0 * step),
                                 (c.FLOPS, 6.0 * n * 1000.0 * step)):
                    ms.append(Metric(key, val, T0 + 10 * step, step))
            ms.append(Metric(c.VAL_LOSS, float("nan"), T0 + 99_999, 1000))    # a NaN survives the round trip
            ms.append(Metric(c.VAL_LOSS, 0.5, T0 + 99_998, 5))                  # step 5 logged twice
            for j in range(0, len(ms), 1000):
                cl.log_batch(rid, metrics=ms[j:j + 1000], params=[Param(k, v) for k, v in params.items()] if j == 0 else [])
            status = "FINISHED" if i < 2 else "FAILED"
            cl.set_terminated(rid, status, end_time=T0 + 10_000)
            expected["runs"][rid] = dict(experiment=exp_name, run_name=f"{exp_name}-t{i}", status=status,
                                         params=params, tags=tags, parent=parent.info.run_id)
            expected["metrics"].extend((rid, m.key, m.step, m.value, m.timestamp) for m in ms)
        gone = cl.create_run(exp_id, run_name="deleted")
        cl.log_batch(gone.info.run_id, metrics=[Metric(c.VAL_LOSS, 1.0, T0, 1)])
        cl.delete_run(gone.info.run_id)
    other = cl.create_experiment("unrelated")
    r = cl.create_run(other, run_name="elsewhere")
    cl.log_batch(r.info.run_id, metrics=[Metric(c.VAL_LOSS, 9.0, T0, 1)])
    dead = cl.create_experiment("deleted-exp")
    cl.delete_experiment(dead)
    return expected


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    uri = f"sqlite:///{path}"
    expected = _log_store(uri)
    return uri, path, expected


def _rows(metrics_table):
    d = metrics_table.to_pydict()
    return list(zip(d["run_id"], d["key"], d["step"], d["value"], d["timestamp"]))


def _norm(rows):
    return sorted(((a, b, s, "nan" if math.isnan(v) else v, t) for a, b, s, v, t in rows),
                  key=lambda r: (r[0], r[1], r[2], r[4], str(r[3])))


def _check_tables(t, expected):
    runs = t.runs.to_pylist()
    assert {r["run_id"] for r in runs} == set(expected["runs"])          # deleted run / other experiments out
    for r in runs:
        exp = expected["runs"][r["run_id"]]
        assert (r["experiment"], r["run_name"], r["status"]) == (exp["experiment"], exp["run_name"], exp["status"])
        assert r["parent_run_id"] == exp["parent"]
        for k in c.TRIAL_PARAMS:
            assert r[f"params.{k}"] == exp["params"].get(k)
        assert r["params.extra_param"] == exp["params"].get("extra_param")
        for k in (c.SWEEP, c.STATUS, c.SOURCE, c.TRIAL, c.KIND, "custom"):
            assert r[f"tags.{k}"] == exp["tags"].get(k)
        if exp["params"]:
            assert r["n_params_non_embedding"] == float(exp["params"][c.N_PARAMS_NON_EMBEDDING])
            assert r["n_params"] == float(exp["params"][c.N_PARAMS])
            assert r["budget_flops"] == 1e15
            assert r["layers"] == int(exp["params"][c.LAYERS])
            assert r["tokens_target"] is None                  # absent or not a number -> null
        else:
            assert r["n_params"] is None and r["layers"] is None
    assert not any(k.startswith("tags.mlflow.") for k in t.runs.column_names)
    schema = dict(zip(t.metrics.schema.names, map(str, t.metrics.schema.types)))
    assert schema == {"run_id": "string", "key": "string", "step": "int64", "value": "double", "timestamp": "int64"}
    assert str(t.runs.schema.field("n_params").type) == "double"
    assert str(t.runs.schema.field("budget_flops").type) == "double"
    got = _rows(t.metrics)
    assert _norm(got) == _norm(expected["metrics"])            # every logged value, NaN and repeats included
    assert got == sorted(got, key=lambda r: (r[0], r[1], r[2], r[4]))


def test_sqlite_returns_exactly_what_was_logged(store):
    uri, _, expected = store
    t = read_experiments(uri, ["sweep-a", "sweep-b"])
    _check_tables(t, expected)
    assert set(t.experiment_ids) == {"sweep-a", "sweep-b"}
    assert t.round_trips <= 6                                   # no per-run queries


def test_bare_path_and_single_name_and_key_filter(store):
    _, path, expected = store
    t = read_experiments(str(path), "sweep-b", metric_keys=[c.VAL_LOSS])
    assert set(t.runs.column("experiment").to_pylist()) == {"sweep-b"}
    assert set(t.metrics.column("key").to_pylist()) == {c.VAL_LOSS}
    want = [m for m in expected["metrics"] if m[1] == c.VAL_LOSS and expected["runs"][m[0]]["experiment"] == "sweep-b"]
    assert _norm(_rows(t.metrics)) == _norm(want)


def test_unknown_experiment_lists_the_available_ones(store):
    uri, _, _ = store
    with pytest.raises(UnknownExperimentError) as err:
        read_experiments(uri, ["sweep-a", "nope"])
    msg = str(err.value)
    assert "'nope'" in msg and "'sweep-a'" in msg and "'unrelated'" in msg and "deleted-exp" not in msg
    assert isinstance(err.value, UserError)


def test_missing_store_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no MLflow store"):
        read_experiments(f"sqlite:///{tmp_path / 'absent.db'}", ["x"])
    assert not (tmp_path / "absent.db").exists()


def test_curves_join_tokens_and_flops_by_step(store):
    uri, _, expected = store
    t = read_experiments(uri, ["sweep-a"])
    df = curves(t, c.VAL_LOSS, run_columns=["params.size", "n_params_non_embedding", "tags.kind"])
    assert list(df.columns) == ["run_id", "step", "value", "tokens", "flops", "timestamp", "params.size",
                                "n_params_non_embedding", "tags.kind"]
    assert set(df["tags.kind"]) == {"trial"}                   # the parent logged no val_loss
    rid = next(r for r, e in expected["runs"].items() if e["run_name"] == "sweep-a-t1")
    one = df[df.run_id == rid].set_index("step")
    assert len(one) == 50 + 1                                   # steps 1..50 and the NaN at 1000
    assert one.loc[5, "value"] == 0.5                           # repeated step: latest timestamp wins
    assert one.loc[7, "value"] == pytest.approx(3.0 / 7 + 1)
    assert one.loc[7, "tokens"] == 7000.0
    assert one.loc[7, "flops"] == pytest.approx(6.0 * 2_000_000 * 7000.0)
    assert math.isnan(one.loc[1000, "value"]) and math.isnan(one.loc[1000, "tokens"])
    assert df[["run_id", "step"]].equals(df[["run_id", "step"]].sort_values(["run_id", "step"]))
    assert str(df["step"].dtype) == "int64"
    assert curves(t, "no-such-key").empty


# --- through a real tracking server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    _, path, expected = store
    work = tmp_path_factory.mktemp("server")
    db = work / "server.db"
    shutil.copy(path, db)
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--default-artifact-root", str(work / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, work / "server.log")
        yield url, expected
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


@pytest.mark.slow
def test_http_server_returns_exactly_what_was_logged(server, store, monkeypatch):
    url, expected = server
    t = read_experiments(url, ["sweep-a", "sweep-b"])
    _check_tables(t, expected)
    n_runs_with_metrics = 6
    assert t.round_trips <= 2 + 3 * 1 + 1                      # experiments, runs, one bulk call per key
    sql = read_experiments(store[0], ["sweep-a", "sweep-b"])
    assert _norm(_rows(t.metrics)) == _norm(_rows(sql.metrics))
    assert n_runs_with_metrics == len(set(t.metrics.column("run_id").to_pylist()))

    # Responses cut at the point cap are continued from the run they cut; a run longer than the cap alone
    # falls back to the paginated per-run call. Shrinking the cap exercises both paths against the server.
    monkeypatch.setattr(reader, "HISTORY_BULK_MAX_POINTS", 45)
    small = read_experiments(url, ["sweep-a", "sweep-b"])
    assert _norm(_rows(small.metrics)) == _norm(_rows(t.metrics))
    assert small.round_trips > t.round_trips

    # A server without the bulk endpoint (HTTP 404): per-run reads, with a warning, same result.
    monkeypatch.setattr(reader, "HISTORY_BULK_ENDPOINT", "/ajax-api/2.0/mlflow/metrics/no-such-endpoint")
    with pytest.warns(UserWarning, match="run by run"):
        fallback = read_experiments(url, ["sweep-a", "sweep-b"])
    assert _norm(_rows(fallback.metrics)) == _norm(_rows(t.metrics))

    with pytest.raises(UnknownExperimentError, match="sweep-a"):
        read_experiments(url, ["missing"])
