"""What a sweep tells MLflow besides its numbers: the kind and description of its experiment, the view
its runs table opens with, where its code and data came from, and the machine's load while it trained.

* Experiment: ``mlflow.experimentKind = custom_model_development`` (the tag MLflow's UI itself writes
  when a user marks an experiment "Machine learning" rather than "GenAI apps & agents"), a description
  (``mlflow.note.content``, shown above the runs), and a saved view of the runs table
  (``mlflow.sharedViewState.<key>``, the tag behind the UI's "Share" button): trials only, the scaling
  columns shown, sorted by ``val_loss``. :func:`runs_table_url` is the link that opens it.
* Runs: the git commit of the protscale source (``mlflow.source.git.commit``), and the prepared dataset
  as an MLflow dataset input whose digest is (the start of) its manifest hash.
* System metrics: MLflow's own monitor (CPU, memory, disk, network; GPUs when NVML is present), logged
  as ``system/...`` metrics of the trial run while it trains.
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import time
import warnings
from pathlib import Path
from urllib.parse import quote, urlencode

from . import contract as c

EXPERIMENT_KIND = "mlflow.experimentKind"
MACHINE_LEARNING = "custom_model_development"      # the UI's "Machine learning" experiment type
DESCRIPTION = "mlflow.note.content"
VIEW_KEY, VIEW_NAME = "protscale-trials", "protscale: trials"
SHARED_VIEW = "mlflow.sharedViewState."           # + share key; the UI's URL names it viewStateShareKey
GIT_COMMIT = "mlflow.source.git.commit"
SOURCE_NAME, SOURCE_TYPE = "mlflow.source.name", "mlflow.source.type"
DIGEST_CHARS = 12           # MLflow keeps at most 36 characters of a digest (and shows short ones)

#: Columns of the runs table, in order: what a scaling study is read by.
COLUMNS = [f"params.`{k}`" for k in (c.OBJECTIVE, c.SIZE, c.N_PARAMS_NON_EMBEDDING, c.BUDGET_FLOPS)] + [
    f"metrics.`{c.VAL_LOSS}`", f"metrics.`{c.TEST_LOSS}`", f"tags.`{c.STATUS}`", "attributes.`Dataset`",
    "attributes.`Models`"]


def trials_view() -> dict:
    """The runs-table state the UI loads from the shared-view tag (its own field names; columns are AG
    Grid column ids). The scaling columns come first, right after the run name, so they are on screen
    without scrolling sideways."""
    order = ["attributes.`Run Name`", *COLUMNS, "runDateAndNestInfo", "duration"]
    return {"searchFilter": f"tags.{c.KIND} = 'trial'", "orderByKey": f"metrics.`{c.VAL_LOSS}`",
            "orderByAsc": True, "selectedColumns": COLUMNS, "columnOrder": order,
            "columnWidths": {"attributes.`Dataset`": 180, f"params.`{c.N_PARAMS_NON_EMBEDDING}`": 170,
                             f"params.`{c.BUDGET_FLOPS}`": 120}, "runsHiddenMode": "SHOW_ALL"}


def describe_experiment(tracking_uri: str, experiment_id: str, description: str) -> None:
    """Mark the experiment as model training, describe it and save the trials view of its runs table."""
    from .runs import client

    cl = client(tracking_uri)
    cl.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MACHINE_LEARNING)
    cl.set_experiment_tag(experiment_id, DESCRIPTION, description)
    now = int(time.time() * 1000)       # MLflow 3.17's saved-view envelope: a named view, its state as JSON
    view = {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(trials_view())}
    cl.set_experiment_tag(experiment_id, SHARED_VIEW + VIEW_KEY, json.dumps(view))


def ui_base(tracking_uri: str) -> str:
    """Where a user browses this store: the tracking server itself, or ``mlflow ui``'s default address."""
    uri = c.resolve_tracking_uri(tracking_uri)
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def runs_table_url(tracking_uri: str, experiment_id: str) -> str:
    """The link that opens the experiment's runs table (training view) on the trials view."""
    query = urlencode({"workflowType": "machine_learning", "viewStateShareKey": VIEW_KEY}, quote_via=quote)
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?{query}"


def browse_hint(tracking_uri: str, experiment_id: str) -> str:
    """One line telling the user how to open the runs table."""
    uri = c.resolve_tracking_uri(tracking_uri)
    url = runs_table_url(uri, experiment_id)
    if uri.startswith(("http://", "https://")):
        return f"runs table: {url}"
    return f"runs table: mlflow ui --backend-store-uri {uri}  then open {url}"


def experiment_hint(tracking_uri: str, experiment: str) -> str:
    """:func:`browse_hint` for the experiment named ``experiment`` ("" when it does not exist)."""
    from .runs import client

    exp = client(tracking_uri).get_experiment_by_name(experiment)
    return browse_hint(tracking_uri, exp.experiment_id) if exp else ""


@functools.lru_cache(maxsize=None)
def git_commit() -> str | None:
    """The commit of the git checkout protscale runs from (None for an installed copy without git)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_tags(name: str) -> dict:
    """MLflow's source tags: the Source column shows ``name`` and the commit."""
    commit = git_commit()
    return {SOURCE_NAME: name, SOURCE_TYPE: "LOCAL", **({GIT_COMMIT: commit} if commit else {})}


def log_dataset(tracking_uri: str, run_id: str, data: str, manifest: dict, context: str = "training") -> None:
    """Record the prepared dataset at ``data`` as an input of the run (the Dataset column)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from .runs import client

    digest = str(manifest.get("hash", ""))[:DIGEST_CHARS] or None
    with warnings.catch_warnings():      # "can be interpreted in multiple ways": two local-path resolvers
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(data))
    dataset = MetaDataset(source, name=Path(str(data).rstrip("/")).name or str(data), digest=digest)
    client(tracking_uri).log_inputs(run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str, enabled: bool = True, interval_s: float = 5.0):
    """MLflow's system-metrics monitor on ``run_id`` while the block runs (resumes its step count when a
    restarted worker re-attaches). Monitoring never fails a trial: errors are MLflow's warnings."""
    if not enabled:
        yield
        return
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)     # no start/stop chatter
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                   tracking_uri=c.resolve_tracking_uri(tracking_uri))
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def record_sweep(tracking_uri: str, sweep_run_id: str, space) -> str:
    """Everything the sweep's parent run and experiment carry besides params: the experiment's kind,
    description and trials view, the search-space file as an artifact, the dataset as an input.
    Returns the line that tells the user where to browse the runs."""
    from ..data.shards import read_manifest
    from .runs import client

    cl = client(tracking_uri)
    experiment_id = cl.get_run(sweep_run_id).info.experiment_id
    objectives = sorted({t.objective for t in space.trials})
    budgets = sorted({t.budget_flops for t in space.trials})
    describe_experiment(tracking_uri, experiment_id, (
        f"**protscale sweep `{space.name}`**: {len(space.trials)} trials ({', '.join(objectives)}; "
        f"budgets {', '.join(f'{b:.3g}' for b in budgets)} FLOPs) on `{space.data}`, search space "
        f"`{space.source or '(in memory)'}`.\n\nOne child run per trial (`tags.{c.KIND} = 'trial'`) under the "
        f"parent run `sweep-{space.name}`: params `{c.OBJECTIVE}`, `{c.SIZE}`, `{c.N_PARAMS_NON_EMBEDDING}`, "
        f"`{c.BUDGET_FLOPS}`; metrics `{c.TRAIN_LOSS}`, `{c.VAL_LOSS}`, `{c.TEST_LOSS}` by optimizer step; "
        "the final model of each trial as an MLflow model. Fit the scaling laws with "
        f"`protscale fit --experiment {space.name}`."))
    if space.source and Path(space.source).is_file():
        cl.log_artifact(sweep_run_id, space.source, "search_space")
    try:
        log_dataset(tracking_uri, sweep_run_id, space.data, read_manifest(space.data))
    except FileNotFoundError:       # not prepared yet: the trials will fail with their own message
        pass
    return browse_hint(tracking_uri, experiment_id)
