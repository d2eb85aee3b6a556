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


def find_run(tracking_uri: str, experiment: str, trial: str) -> str | None:
    """The run id of trial ``trial`` in ``experiment``, if one exists (used to resume, never to duplicate)."""
    cl = client(tracking_uri)
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = cl.search_runs([exp.experiment_id], filter_string=f"tags.{c.TRIAL} = '{trial}'", max_results=1)
    return runs[0].info.run_id if runs else None


def start_run(tracking_uri: str, experiment: str, name: str, params: dict, tags: dict,
              parent_run_id: str | None = None) -> str:
    """Find the run tagged ``trial=name`` or create it, with params and tags; returns its id."""
    from mlflow.entities import Param

    run_id = find_run(tracking_uri, experiment, name)
    cl = client(tracking_uri)
    if run_id is None:
        all_tags = {c.TRIAL: name, c.STATUS: c.STATUS_RUNNING, **tags}
        if parent_run_id:
            all_tags[c.PARENT_RUN_ID] = parent_run_id
        run = cl.create_run(experiment_id(tracking_uri, experiment), run_name=name, tags=all_tags)
        run_id = run.info.run_id
        cl.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    else:
        cl.update_run(run_id, status="RUNNING")
        cl.set_tag(run_id, c.STATUS, c.STATUS_RUNNING)
    return run_id


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Tag the trial's outcome (completed / diverged / failed) and close the MLflow run."""
    cl = client(tracking_uri)
    cl.set_tag(run_id, c.STATUS, status)
    cl.set_terminated(run_id, status="FINISHED" if status == c.STATUS_COMPLETED else "FAILED")


class MetricsLogger:
    """Buffered, exactly-once metric writer for one run (use on one process per run: rank 0)."""

    def __init__(self, tracking_uri: str, run_id: str, step_key: str = c.TRAIN_LOSS):
        self.client, self.run_id = client(tracking_uri), run_id
        history = self.client.get_metric_history(run_id, step_key)
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
            self.client.log_batch(self.run_id, metrics=self._buffer[i:i + _BATCH])
        if self._buffer:
            self.logged_through = max(m.step for m in self._buffer)
        self._buffer = []
