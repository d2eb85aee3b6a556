"""Trained models in MLflow: each finished trial's final ``ProteinLM`` is an MLflow model (pytorch
flavor) of its run, loadable with ``mlflow.pytorch.load_model("runs:/<run_id>/model")`` and registrable;
:func:`register_compute_optimal` registers the best trial of a sweep under a model name.

The model is pickled (MLflow's ``pickle`` serialisation: the ``ProteinLM`` module itself, so loading
needs protscale installed) in the dtype it trained in: bf16 on GPUs (2 bytes a parameter: 21 GB for the
paper's 10.7B), fp32 on CPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from ..tracking import contract as c

ARTIFACT = "model"           # name of the logged model; runs:/<run_id>/model
PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "protscale"]


@contextlib.contextmanager
def _quiet_mlflow(tracking_uri: str):
    """MLflow's fluent model API reads the global tracking URI; it also warns about pickling (the point
    here) and draws download progress bars: set the URI, silence both, restore all three."""
    import mlflow
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as BAR

    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    log = logging.getLogger("mlflow.pytorch")
    level, bar = log.level, os.environ.get(BAR.name)
    mlflow.set_tracking_uri(c.resolve_tracking_uri(tracking_uri))
    log.setLevel(logging.ERROR)
    os.environ[BAR.name] = "false"
    try:
        yield mlflow
    finally:
        log.setLevel(level)
        if bar is None:
            os.environ.pop(BAR.name, None)
        else:
            os.environ[BAR.name] = bar
        mlflow.set_tracking_uri(previous)


def log_model(tracking_uri: str, run_id: str, model: torch.nn.Module) -> str:
    """Log ``model`` (on the CPU, in eval mode, in its own dtype) as the MLflow model of ``run_id``;
    returns its URI."""
    from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID

    from ..tracking.runs import client

    model = model.cpu().eval()
    experiment_id = client(tracking_uri).get_run(run_id).info.experiment_id
    previous = os.environ.get(MLFLOW_EXPERIMENT_ID.name)
    # The logged model belongs to an experiment, which MLflow takes from the active run or this variable
    # (without either: the Default experiment, with its artifacts under ./mlruns).
    os.environ[MLFLOW_EXPERIMENT_ID.name] = experiment_id
    try:
        with _quiet_mlflow(tracking_uri) as mlflow:
            info = mlflow.pytorch.log_model(model, name=ARTIFACT, run_id=run_id, serialization_format="pickle",
                                            pip_requirements=PIP_REQUIREMENTS)
    finally:
        if previous is None:
            os.environ.pop(MLFLOW_EXPERIMENT_ID.name, None)
        else:
            os.environ[MLFLOW_EXPERIMENT_ID.name] = previous
    return info.model_uri


def load_model(tracking_uri: str, run_id: str) -> torch.nn.Module:
    """The final model of trial run ``run_id`` (a ``ProteinLM``, on the CPU)."""
    with _quiet_mlflow(tracking_uri) as mlflow:
        return mlflow.pytorch.load_model(f"runs:/{run_id}/{ARTIFACT}", map_location="cpu")


def compute_optimal_run(tracking_uri: str, experiment: str, objective: str):
    """The trial of ``objective`` with the lowest ``val_loss`` at the largest compute budget of the sweep
    that has a completed trial with a logged model: the compute-optimal model the sweep has actually
    trained (rather than the size a fitted law predicts, which may not have been trained at all)."""
    from ..errors import UserError
    from ..tracking.runs import client

    cl = client(tracking_uri)
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no experiment {experiment!r} in {c.resolve_tracking_uri(tracking_uri)}")
    found = cl.search_runs([exp.experiment_id], max_results=10000, filter_string=(
        f"tags.{c.KIND} = 'trial' and tags.{c.STATUS} = '{c.STATUS_COMPLETED}' and "
        f"params.{c.OBJECTIVE} = '{objective}'"))
    with _quiet_mlflow(tracking_uri) as mlflow:
        with_model = {m.source_run_id for m in mlflow.search_logged_models(
            experiment_ids=[exp.experiment_id], filter_string=f"name = '{ARTIFACT}'", output_format="list")}
    found = [r for r in found if r.info.run_id in with_model and c.VAL_LOSS in r.data.metrics]
    if not found:
        raise UserError(f"experiment {experiment!r} has no completed {objective} trial with a logged model "
                        "and a val_loss (train one with `protscale sweep`)")
    top = max(float(r.data.params[c.BUDGET_FLOPS]) for r in found)
    return min((r for r in found if float(r.data.params[c.BUDGET_FLOPS]) == top),
               key=lambda r: r.data.metrics[c.VAL_LOSS])


def register(tracking_uri: str, run_id: str, name: str):
    """Register the model of trial run ``run_id`` as a new version of ``name``; returns the version."""
    with _quiet_mlflow(tracking_uri) as mlflow:
        return mlflow.register_model(f"runs:/{run_id}/{ARTIFACT}", name)


def register_compute_optimal(tracking_uri: str, experiment: str, objective: str, name: str):
    """(run, model version) of the sweep's compute-optimal trial (:func:`compute_optimal_run`)."""
    run = compute_optimal_run(tracking_uri, experiment, objective)
    version = register(tracking_uri, run.info.run_id, name)
    from ..tracking.runs import client

    cl = client(tracking_uri)
    for key, value in ((c.BUDGET_FLOPS, run.data.params[c.BUDGET_FLOPS]), (c.SIZE, run.data.params[c.SIZE]),
                       (c.OBJECTIVE, objective), (c.VAL_LOSS, f"{run.data.metrics[c.VAL_LOSS]:.6g}"),
                       (c.SWEEP, experiment), ("selected_by", "lowest val_loss at the largest budget")):
        cl.set_model_version_tag(name, version.version, key, str(value))
    return run, version
