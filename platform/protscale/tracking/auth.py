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

from protscale.cli import UserError

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
    """Fail fast (``UserError``) when an ``http(s)://`` tracking server refuses this client."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    with mlflow_errors(tracking_uri):
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
