"""One-line errors for MLflow tracking servers with authentication (``mlflow server --app-name basic-auth``).

MLflow's own message for a refused request is a multi-line ``MlflowException`` ("API request to
endpoint ... failed with error code 401 != 200. Response body: 'You are not authenticated...'") that
names neither the variables to set nor the server. Wrap tracking calls that face the user:

    from protscale.tracking.auth import mlflow_errors
    with mlflow_errors(tracking_uri):
        run_id = runs.start_run(tracking_uri, ...)

or call ``check_tracking_access(uri)`` once before starting a sweep, so missing credentials fail in
a second instead of inside every trial.
"""

from __future__ import annotations

import contextlib
import os

from protscale.errors import UserError

CREDENTIAL_VARS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


def explain(exc: BaseException, tracking_uri: str) -> str | None:
    """A one-line explanation of an authentication/authorization refusal, or None for other errors."""
    code = getattr(exc, "error_code", None)
    text = str(exc)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "UNAUTHENTICATED" or "error code 401" in text:
        if user and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
            return (f"the MLflow server at {tracking_uri} rejected the credentials of user {user!r}: "
                    f"check {CREDENTIAL_VARS}")
        return (f"the MLflow server at {tracking_uri} requires a login: set {CREDENTIAL_VARS} "
                f"(on Kubernetes: the values in the Secret mlflow-ray)")
    if code == "PERMISSION_DENIED" or "error code 403" in text:
        who = f"user {user!r}" if user else "this user"
        return (f"the MLflow server at {tracking_uri} denied {who} this operation: ask an MLflow admin "
                f"for permission on the experiment, or log to an experiment of your own")
    return None


@contextlib.contextmanager
def mlflow_errors(tracking_uri: str):
    """Turn MLflow's 401/403 errors raised inside the block into a one-line ``UserError``."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - only auth refusals are translated, the rest re-raised
        message = explain(exc, tracking_uri)
        if message is None:
            raise
        raise UserError(message) from None


def check_tracking_access(tracking_uri: str) -> None:
    """Fail fast, in one line (``UserError``), when the tracking store cannot be used: an ``http(s)://``
    server that is unreachable or refuses this client, a SQLite file that is not an SQLite database (or
    is another program's database: MLflow would add its tables to it), a SQL server that does not answer.
    A SQLite file that does not exist yet is fine (MLflow creates it)."""
    if tracking_uri.startswith(("http://", "https://")):
        _check_server(tracking_uri)
    elif tracking_uri.startswith("sqlite:"):
        _check_sqlite(tracking_uri)
    elif tracking_uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        _check_sql_server(tracking_uri)


def shown(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (for messages)."""
    import re

    return re.sub(r"(//[^/:@]+:)[^/@]*@", r"\1***@", uri)


def _check_server(tracking_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                                            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"     # a probe: answer in seconds, not minutes
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or "20"
    try:
        with mlflow_errors(tracking_uri):
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure of the probe: the server is not usable
        reason = "not reachable" if "connect" in str(exc).lower() else f"not answering as an MLflow server " \
                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''})"
        raise UserError(f"the MLflow tracking server at {shown(tracking_uri)} is {reason}: start it, or give "
                        "another --tracking-uri (or $MLFLOW_TRACKING_URI)") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_sqlite(tracking_uri: str) -> None:
    import sqlite3
    from pathlib import Path

    path = tracking_uri.split("///", 1)[1].split("?", 1)[0] if "///" in tracking_uri else ""
    if not path or path == ":memory:":
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a folder, not an MLflow SQLite store; give a .db file as --tracking-uri")
    if not p.is_file() or p.stat().st_size == 0:
        return
    try:
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise UserError(f"{p}: not a usable SQLite database ({exc}); give the MLflow store's .db file as "
                        "--tracking-uri") from None
    if tables and not {"experiments", "runs"} <= tables:
        listed = ", ".join(sorted(tables)[:5])
        raise UserError(f"{p}: an SQLite database of another program (tables {listed}), not an MLflow store; "
                        "give another --tracking-uri") from None


def _check_sql_server(tracking_uri: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    try:
        engine = sa.create_engine(tracking_uri, poolclass=NullPool)
    except Exception as exc:  # noqa: BLE001 - a missing driver or a malformed URI
        raise UserError(f"{shown(tracking_uri)}: cannot use this tracking URI ({str(exc).splitlines()[0]})") from None
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - unreachable, refused login, unknown database
        first = str(getattr(exc, "orig", exc)).strip().splitlines()
        raise UserError(f"cannot connect to the MLflow store {shown(tracking_uri)}: "
                        f"{first[0] if first else type(exc).__name__}; start the database or fix "
                        "--tracking-uri") from None
    finally:
        engine.dispose()


def check_existing_store(tracking_uri: str) -> None:
    """``check_tracking_access`` for commands that only read a store (export, register, fit): a SQLite
    file that does not exist is an error too (MLflow would create an empty store there)."""
    from pathlib import Path

    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
        if not path.is_file():
            raise UserError(f"{path}: no such tracking store (give --tracking-uri or set $MLFLOW_TRACKING_URI)")
    check_tracking_access(tracking_uri)
