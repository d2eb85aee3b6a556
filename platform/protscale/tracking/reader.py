"""Bulk reader: every run of one or more MLflow experiments, with full metric histories, into Arrow.

``read_experiments(uri, ["sweep-a", "sweep-b"])`` returns :class:`Tables` with two ``pyarrow.Table``:

``runs`` -- one row per run (deleted runs and runs of deleted experiments are left out)

    ===========================  =========  ====================================================
    column                       type       what
    ===========================  =========  ====================================================
    run_id                       string     MLflow run id
    experiment_id                string
    experiment                   string     experiment name
    run_name                     string
    status                       string     MLflow lifecycle: RUNNING, FINISHED, FAILED, ...
                                            (the trial outcome is the ``tags.status`` column)
    start_time, end_time         int64      ms since the epoch (end_time null while running)
    parent_run_id                string     ``mlflow.parentRunId`` tag (the sweep's run), or null
    params.<key>                 string     one column per param of ``contract.TRIAL_PARAMS`` (always
                                            present, null where not logged) plus every other param
                                            key found in the experiments (e.g. ``params.init_budget_flops``)
    tags.<key>                   string     same for tags: ``sweep``, ``status``, ``source``,
                                            ``trial``, ``kind`` always, plus every other tag found,
                                            except MLflow's own ``mlflow.*`` tags
    n_params, n_params_non_embedding,       float64  typed copies of those params (null when
    budget_flops, tokens_target,                     missing or not a number)
    lr_max, mask_ratio
    layers, d_model, heads, batch_tokens,   int64    typed copies (null when missing / not an int)
    seq_len, seed
    ===========================  =========  ====================================================

``metrics`` -- long format, one row per logged value, sorted by (run_id, key, step, timestamp)

    run_id string, key string, step int64, value float64 (NaN where NaN was logged), timestamp int64 (ms)

Every value that was logged is returned (a step logged twice appears twice); :func:`curves` is the
helper that turns this into one tidy curve per run for the fits.

How the store is read (round trips):

* SQL stores (``sqlite://``, ``postgresql://``, ``mysql://``, ``mssql://``, with or without ``+driver``):
  MLflow's own tables ``experiments``, ``runs``, ``params``, ``tags`` and ``metrics`` are read directly
  with SQLAlchemy: five queries in all (plus a schema check), whatever the number of runs; the metrics
  go through the raw DB-API cursor. Experiments are looked up in the
  active MLflow workspace (``mlflow.set_workspace`` / ``$MLFLOW_WORKSPACE``, else ``default``).
* ``http(s)://`` tracking servers: ``search_runs`` (pages of up to 50,000 runs, with params and tags),
  then for each metric key the server's ``/ajax-api/2.0/mlflow/metrics/get-history-bulk`` endpoint (the
  one the MLflow UI uses; up to 100 runs and 25,000 points per call, complete histories, no
  down-sampling); a response that hits the 25,000 cap is continued from the first run it cut. The
  documented ``/api/2.0/mlflow/metrics/get-history-bulk-interval`` endpoint is *not* used: it samples
  each run down to at most 2,500 points, so it is not a faithful read. Where the bulk endpoint is
  missing (HTTP 404: another server implementation) or a single run has more than 25,000 points of a
  key, that history falls back to ``MlflowClient.get_metric_history`` (one paginated call per run and
  key) -- the only complete per-run read MLflow's REST API has. History requests run ``HTTP_CONCURRENCY``
  at a time. Measured: the server spends ~80 us per point turning rows into JSON, for the bulk and the
  per-run endpoint alike, so over HTTP the bulk read saves the per-call overhead (about 1.2-2x), not
  the server's serialisation; direct SQL (above) is where the large factor is.
* Anything else (``file://``, ``databricks``): ``search_runs`` + ``get_metric_history`` per run and key.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from protscale.errors import UserError

from . import contract as c

#: Params given a typed column (same name, no prefix) in ``Tables.runs``.
FLOAT_PARAMS = (c.N_PARAMS, c.N_PARAMS_NON_EMBEDDING, c.BUDGET_FLOPS, c.TOKENS_TARGET, c.LR_MAX, c.MASK_RATIO)
INT_PARAMS = (c.LAYERS, c.D_MODEL, c.HEADS, c.BATCH_TOKENS, c.SEQ_LEN, c.SEED)
#: Tags always given a ``tags.<key>`` column.
CONTRACT_TAGS = (c.SWEEP, c.STATUS, c.SOURCE, c.TRIAL, c.KIND)

SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_KEY_RE = re.compile(r"^[\w\-. /:]+$")  # MLflow's metric-key alphabet (plus ':'), safe to quote inline
HISTORY_BULK_ENDPOINT = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"
HISTORY_BULK_MAX_RUNS = 100          # server limit: run ids per get-history-bulk request
HISTORY_BULK_MAX_POINTS = 25_000     # server limit: points per get-history-bulk response
SEARCH_PAGE = 50_000                 # server limit: runs per search_runs page
HTTP_CONCURRENCY = 4                 # history requests in flight at once


class UnknownExperimentError(UserError, LookupError):
    """An experiment name that the store does not have (the message lists the ones it has)."""


@dataclass
class Tables:
    runs: "pyarrow.Table"
    metrics: "pyarrow.Table"
    experiment_ids: dict[str, str] = field(default_factory=dict)   # name -> id
    round_trips: int = 0                                             # queries / HTTP calls made

    def runs_df(self):
        return self.runs.to_pandas()

    def metrics_df(self):
        return self.metrics.to_pandas()


# ----------------------------------------------------------------------------------------------------
def read_experiments(tracking_uri: str, experiment_names: Sequence[str] | str,
                     metric_keys: Sequence[str] | None = None) -> Tables:
    """Read every (non-deleted) run of ``experiment_names`` with full metric histories.

    ``metric_keys`` restricts the metrics table to those keys (all keys by default).
    Raises :class:`UnknownExperimentError` (a ``protscale.cli.UserError``) naming the experiments the
    store has when one of the names is not there.
    """
    if isinstance(experiment_names, str):
        experiment_names = [experiment_names]
    names = list(dict.fromkeys(experiment_names))
    if not names:
        raise UserError("no experiment given")
    uri = c.resolve_tracking_uri(tracking_uri)
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    keys = list(metric_keys) if metric_keys is not None else None
    if scheme in SQL_SCHEMES:
        return _read_sql(uri, names, keys)
    if scheme in ("http", "https"):
        return _read_client(uri, names, keys, bulk_http=True)
    return _read_client(uri, names, keys, bulk_http=False)


def curves(tables: Tables, key: str = c.VAL_LOSS, run_columns: Sequence[str] = ()) -> "pandas.DataFrame":
    """One tidy curve per run for the fits: the ``key`` metric with tokens and FLOPs at the same step.

    Returns a ``pandas.DataFrame`` sorted by (run_id, step) with columns

    * ``run_id`` (str), ``step`` (int64),
    * ``value`` (float64) -- the ``key`` metric (NaN kept: a diverged run stays visible),
    * ``tokens``, ``flops`` (float64) -- the ``tokens`` / ``flops`` metrics logged at the *same step* of
      the same run, NaN where that run logged none at that step (no interpolation),
    * ``timestamp`` (int64, ms) of the ``key`` value,
    * then the ``run_columns`` asked for, copied from ``tables.runs`` (e.g. ``"params.objective"``,
      ``"params.size"``, ``"n_params"``, ``"budget_flops"``, ``"tags.status"``, ``"tags.kind"``).

    Only runs that logged ``key`` appear. Where a step was logged more than once (a resumed trial, say),
    the value with the latest timestamp is kept -- for ``key``, ``tokens`` and ``flops`` alike.
    Example::

        t = read_experiments(uri, ["clm-sweep"])
        df = curves(t, "val_loss", run_columns=["params.objective", "n_params", "budget_flops", "tags.kind"])
        df = df[df["tags.kind"] == "trial"]
    """
    import pandas as pd
    import pyarrow.compute as pc

    m = tables.metrics
    wanted = m.filter(pc.is_in(m["key"], value_set=_pa().array([key, c.TOKENS, c.FLOPS])))
    df = wanted.to_pandas()
    cols = ["run_id", "step", "value", "tokens", "flops", "timestamp", *run_columns]
    if df.empty:
        out = pd.DataFrame({k: pd.Series(dtype="float64") for k in cols})
        out["run_id"] = out["run_id"].astype(object)
        out["step"] = out["step"].astype("int64")
        out["timestamp"] = out["timestamp"].astype("int64")
        return out
    # Latest timestamp wins for a repeated (run, key, step); the table is sorted by timestamp within it.
    df = df.drop_duplicates(["run_id", "key", "step"], keep="last")
    main = df[df["key"] == key][["run_id", "step", "value", "timestamp"]]
    for extra in (c.TOKENS, c.FLOPS):
        if extra == key:
            main = main.assign(**{extra: main["value"]})
            continue
        side = df[df["key"] == extra][["run_id", "step", "value"]].rename(columns={"value": extra})
        main = main.merge(side, on=["run_id", "step"], how="left")
    main = main[["run_id", "step", "value", "tokens", "flops", "timestamp"]]
    if run_columns:
        runs = tables.runs.select(["run_id", *run_columns]).to_pandas()
        main = main.merge(runs, on="run_id", how="left")
    main = main.sort_values(["run_id", "step"], kind="stable").reset_index(drop=True)
    main["step"] = main["step"].astype("int64")
    main["timestamp"] = main["timestamp"].astype("int64")
    return main[cols]


# ----------------------------------------------------------------------------------------------------
def _pa():
    import pyarrow

    return pyarrow


def _unknown(names: Iterable[str], available: Iterable[str], uri: str) -> UnknownExperimentError:
    avail = sorted(available)
    listed = ", ".join(repr(a) for a in avail) if avail else "none"
    missing = ", ".join(repr(n) for n in names)
    return UnknownExperimentError(f"no experiment {missing} in {uri} (experiments there: {listed})")


def _to_float(v):
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x


def _to_int(v):
    x = _to_float(v)
    if x is None or not math.isfinite(x) or x != int(x):
        return None
    return int(x)


def _build_runs(run_rows: list[tuple], params: dict[str, dict[str, str]], tags: dict[str, dict[str, str]]):
    """run_rows: (run_id, experiment_id, experiment, run_name, status, start_time, end_time)."""
    pa = _pa()
    param_keys = list(c.TRIAL_PARAMS) + sorted({k for d in params.values() for k in d} - set(c.TRIAL_PARAMS))
    tag_keys = list(CONTRACT_TAGS) + sorted(
        {k for d in tags.values() for k in d if not k.startswith("mlflow.")} - set(CONTRACT_TAGS))
    run_rows = sorted(run_rows, key=lambda r: (r[2], r[5] if r[5] is not None else 0, r[0]))
    ids = [r[0] for r in run_rows]
    cols: dict[str, "pyarrow.Array"] = {
        "run_id": pa.array(ids, pa.string()),
        "experiment_id": pa.array([str(r[1]) for r in run_rows], pa.string()),
        "experiment": pa.array([r[2] for r in run_rows], pa.string()),
        "run_name": pa.array([r[3] for r in run_rows], pa.string()),
        "status": pa.array([r[4] for r in run_rows], pa.string()),
        "start_time": pa.array([r[5] for r in run_rows], pa.int64()),
        "end_time": pa.array([r[6] for r in run_rows], pa.int64()),
        "parent_run_id": pa.array([tags.get(i, {}).get(c.PARENT_RUN_ID) for i in ids], pa.string()),
    }
    for k in param_keys:
        cols[f"params.{k}"] = pa.array([params.get(i, {}).get(k) for i in ids], pa.string())
    for k in tag_keys:
        cols[f"tags.{k}"] = pa.array([tags.get(i, {}).get(k) for i in ids], pa.string())
    for k in FLOAT_PARAMS:
        cols[k] = pa.array([_to_float(params.get(i, {}).get(k)) for i in ids], pa.float64())
    for k in INT_PARAMS:
        cols[k] = pa.array([_to_int(params.get(i, {}).get(k)) for i in ids], pa.int64())
    return pa.table(cols)


def _build_metrics(run_ids, keys, steps, values, timestamps):
    pa = _pa()
    t = pa.table({
        "run_id": pa.array(run_ids, pa.string()),
        "key": pa.array(keys, pa.string()),
        "step": pa.array(steps, pa.int64()),
        "value": pa.array(values, pa.float64()),
        "timestamp": pa.array(timestamps, pa.int64()),
    })
    if t.num_rows:
        t = t.sort_by([("run_id", "ascending"), ("key", "ascending"), ("step", "ascending"),
                       ("timestamp", "ascending")])
    return t


# --- SQL stores ---------------------------------------------------------------------------------------
def repr_sql(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _active_workspace() -> str:
    try:
        from mlflow.utils.workspace_utils import resolve_entity_workspace_name

        return resolve_entity_workspace_name(None)
    except Exception:  # older/newer MLflow without workspaces
        return "default"


def _read_sql(uri: str, names: list[str], keys: list[str] | None) -> Tables:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    if uri.startswith("sqlite:"):
        from pathlib import Path

        path = uri.split("///", 1)[1] if "///" in uri else ""
        if path and path != ":memory:" and not Path(path.split("?", 1)[0]).is_file():
            raise UserError(f"no MLflow store at {uri} (file not found)")
    engine = sa.create_engine(uri, poolclass=NullPool)
    trips = 0
    try:
        with _store_errors(uri), engine.connect() as conn:
            insp = sa.inspect(conn)
            if not insp.has_table("experiments") or not insp.has_table("runs"):
                raise UserError(f"{uri} is not an MLflow tracking store (no experiments/runs tables)")
            has_ws = any(col["name"] == "workspace" for col in insp.get_columns("experiments"))
            trips += 1
            q = "SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active'"
            bind: dict = {}
            if has_ws:
                q += " AND workspace = :ws"
                bind["ws"] = _active_workspace()
            exps = {name: str(eid) for eid, name in conn.execute(sa.text(q), bind).fetchall()}
            trips += 1
            missing = [n for n in names if n not in exps]
            if missing:
                raise _unknown(missing, exps, uri)
            exp_ids = [int(exps[n]) for n in names]
            id_to_name = {int(exps[n]): n for n in names}
            eb = sa.bindparam("eids", expanding=True)
            run_filter = "r.experiment_id IN :eids AND r.lifecycle_stage = 'active'"

            rows = conn.execute(sa.text(
                "SELECT r.run_uuid, r.experiment_id, r.name, r.status, r.start_time, r.end_time "
                f"FROM runs r WHERE {run_filter}").bindparams(eb), {"eids": exp_ids}).fetchall()
            trips += 1
            run_rows = [(r[0], str(r[1]), id_to_name[int(r[1])], r[2], r[3], r[4], r[5]) for r in rows]

            def key_values(table: str) -> dict[str, dict[str, str]]:
                """{run_id: {key: value}} of MLflow's params or tags table, one query."""
                out: dict[str, dict[str, str]] = {}
                for rid, k, v in conn.execute(sa.text(
                        f"SELECT x.run_uuid, x.key, x.value FROM {table} x JOIN runs r ON r.run_uuid = x.run_uuid "
                        f"WHERE {run_filter}").bindparams(eb), {"eids": exp_ids}):
                    out.setdefault(rid, {})[k] = v
                return out

            params, tags = key_values("params"), key_values("tags")
            trips += 2

            # The metrics are the bulk: read them through the raw DB-API cursor (no per-row SQLAlchemy
            # objects). Experiment ids are integers from the store and keys are checked against MLflow's
            # key alphabet, so both can be written into the statement (no driver-specific paramstyle).
            # (IN-subquery, not a join: the store's index on metrics.run_uuid is used, so other experiments'
            # metrics are never scanned.)
            mq = ("SELECT m.run_uuid, m.key, m.step, m.value, m.timestamp, m.is_nan FROM metrics m "
                  "WHERE m.run_uuid IN (SELECT r.run_uuid FROM runs r WHERE r.experiment_id IN "
                  f"({', '.join(str(int(e)) for e in exp_ids)}) AND r.lifecycle_stage = 'active')")
            if keys is not None:
                bad = [k for k in keys if not _KEY_RE.match(k)]
                if bad:
                    raise UserError(f"not a valid MLflow metric key: {bad[0]!r}")
                mq += f" AND m.key IN ({', '.join(repr_sql(k) for k in keys) or repr_sql('')})"
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                cursor.execute(mq)
                mrows = cursor.fetchall()
            finally:
                cursor.close()
            trips += 1
    finally:
        engine.dispose()

    import numpy as np

    if mrows:
        run_ids, mkeys, steps, values, stamps, nans = zip(*mrows)
        values = np.fromiter(values, np.float64, len(values))
        nan_mask = np.fromiter(nans, np.bool_, len(nans))
        if nan_mask.any():
            values[nan_mask] = np.nan
    else:
        run_ids = mkeys = steps = values = stamps = ()
    return Tables(runs=_build_runs(run_rows, params, tags),
                  metrics=_build_metrics(run_ids, mkeys, steps, values, stamps),
                  experiment_ids={n: exps[n] for n in names}, round_trips=trips)


import contextlib


@contextlib.contextmanager
def _store_errors(uri: str):
    """A store that is corrupt, of another schema or unreachable: one ``UserError`` naming it."""
    import sqlalchemy.exc

    try:
        yield
    except sqlalchemy.exc.SQLAlchemyError as exc:
        from .auth import shown

        first = str(getattr(exc, "orig", exc)).strip().splitlines()
        raise UserError(f"cannot read the MLflow store {shown(uri)}: {first[0] if first else type(exc).__name__}"
                        " (corrupt, of another MLflow version, or not reachable)") from None


# --- MLflow client (HTTP servers and others) ----------------------------------------------------------
class _Counter:
    def __init__(self):
        self.n = 0


def _read_client(uri: str, names: list[str], keys: list[str] | None, bulk_http: bool) -> Tables:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    trips = _Counter()
    exps: dict[str, str] = {}
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=50_000, page_token=token)
        trips.n += 1
        exps.update({e.name: e.experiment_id for e in page})
        token = page.token
        if not token:
            break
    missing = [n for n in names if n not in exps]
    if missing:
        raise _unknown(missing, exps, uri)
    id_to_name = {exps[n]: n for n in names}

    runs = []
    token = None
    while True:
        page = client.search_runs([exps[n] for n in names], run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=SEARCH_PAGE, page_token=token)
        trips.n += 1
        runs.extend(page)
        token = page.token
        if not token:
            break

    run_rows, params, tags = [], {}, {}
    keys_by_run: dict[str, list[str]] = {}
    for r in runs:
        i = r.info
        run_rows.append((i.run_id, str(i.experiment_id), id_to_name[str(i.experiment_id)], i.run_name,
                         i.status, i.start_time, i.end_time))
        params[i.run_id] = dict(r.data.params)
        tags[i.run_id] = dict(r.data.tags)
        ks = list(r.data.metrics)
        keys_by_run[i.run_id] = [k for k in ks if keys is None or k in keys]

    # Histories: one job per (key, block of <= 100 runs); each job continues its own cut responses, and the
    # jobs run HTTP_CONCURRENCY at a time (same number of calls; a server with several workers answers them
    # in parallel -- the server's own serialisation, ~10-20k points/s per worker, is the bottleneck).
    jobs = []
    for key in sorted({k for ks in keys_by_run.values() for k in ks}):
        pending = sorted(rid for rid, ks in keys_by_run.items() if key in ks)
        jobs += [(key, pending[i:i + HISTORY_BULK_MAX_RUNS]) for i in range(0, len(pending), HISTORY_BULK_MAX_RUNS)]

    def per_run_job(key, run_ids):
        out = _Points()
        for rid in run_ids:
            out.per_run(client, rid, key)
        return out

    def bulk_job(key, run_ids):
        out = _Points()
        _history_bulk(uri, key, run_ids, out, client)
        return out

    results: list[_Points] = []
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=HTTP_CONCURRENCY) as pool:
        if bulk_http and jobs:
            try:
                results = list(pool.map(lambda j: bulk_job(*j), jobs))
            except _BulkUnavailable as exc:
                warnings.warn(f"{uri}: {exc}; reading metric histories run by run (slower)", stacklevel=2)
                results = []
        if not results:
            results = list(pool.map(lambda j: per_run_job(*j), jobs))
    cols: tuple[list, list, list, list, list] = ([], [], [], [], [])
    for part in results:
        trips.n += part.trips
        for dst, src in zip(cols, part.cols):
            dst.extend(src)
    return Tables(runs=_build_runs(run_rows, params, tags), metrics=_build_metrics(*cols),
                  experiment_ids={n: exps[n] for n in names}, round_trips=trips.n)


class _Points:
    """Columns of metric points collected by one job, and the calls it made."""

    def __init__(self):
        self.cols: tuple[list, list, list, list, list] = ([], [], [], [], [])
        self.trips = 0

    def add(self, run_id, key, step, value, ts):
        c0, c1, c2, c3, c4 = self.cols
        c0.append(run_id)
        c1.append(key)
        c2.append(int(step))
        c3.append(float(value))
        c4.append(int(ts))

    def per_run(self, client, run_id, key):
        for m in client.get_metric_history(run_id, key):
            self.add(run_id, key, m.step, m.value, m.timestamp)
        self.trips += 1  # at least one call (the client pages beyond 25,000 points)


class _BulkUnavailable(Exception):
    pass


def _history_bulk(uri, key, pending, out: _Points, client) -> None:
    """Fetch ``key`` for the sorted run ids ``pending`` through get-history-bulk, continuing cut responses.

    The server returns points ordered by run id (then timestamp, step, value) and cuts the whole response
    at HISTORY_BULK_MAX_POINTS: when a response is full, every run before the last run id it contains
    is complete, the last one may be cut and is asked again (alone, if it is the only one: then it has
    more than the cap and is read with the paginated per-run call).
    """
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    cap = HISTORY_BULK_MAX_POINTS
    while pending:
        batch = pending[:HISTORY_BULK_MAX_RUNS]
        resp = http_request(creds, HISTORY_BULK_ENDPOINT, "GET",
                            params={"run_id": batch, "metric_key": key, "max_results": cap})
        out.trips += 1
        if resp.status_code == 404:
            raise _BulkUnavailable(f"the server has no {HISTORY_BULK_ENDPOINT} endpoint")
        if resp.status_code != 200:
            raise UserError(f"{uri}: {HISTORY_BULK_ENDPOINT} failed with HTTP {resp.status_code}: "
                            f"{resp.text[:300]}")
        points = resp.json().get("metrics", [])
        if len(points) < cap:
            for p in points:
                out.add(p["run_id"], key, p.get("step", 0), p["value"], p.get("timestamp", 0))
            pending = pending[len(batch):]
            continue
        last = points[-1]["run_id"]
        complete = [p for p in points if p["run_id"] != last]
        if not complete:   # one run alone has more points than one response holds
            out.per_run(client, last, key)
            pending = [r for r in pending if r != last]
            continue
        for p in complete:
            out.add(p["run_id"], key, p.get("step", 0), p["value"], p.get("timestamp", 0))
        pending = [r for r in pending if r >= last]
