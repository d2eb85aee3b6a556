"""What MLflow users see: the experiment marked as model training with the trials view its link opens,
provenance (git commit, dataset input, system metrics), and trial models that load and register."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import torch
from mlflow.tracking import MlflowClient

from protscale.cli import main
from protscale.tracking import models
from protscale.model.transformer import ModelConfig, ProteinLM
from protscale.tracking import contract as c
from protscale.tracking import provenance

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real SQLite store with one sweep: a parent run and trial runs at two budgets (MLM and CLM)."""
    root = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cl = MlflowClient(uri)
    exp = cl.create_experiment("ui-sweep", artifact_location=(root / "artifacts").as_uri())
    sweep = cl.create_run(exp, run_name="sweep-ui-sweep", tags={c.KIND: "sweep", c.SWEEP: "ui-sweep"}).info.run_id
    trials = {}
    for objective, size, budget, loss in [("mlm", "tiny-1", 1e10, 2.70), ("mlm", "tiny-2", 3e10, 2.65),
                                          ("mlm", "tiny-1", 3e10, 2.60), ("mlm", "tiny-3", 3e10, 2.62),
                                          ("clm", "tiny-1", 3e10, 2.80)]:
        name = f"{objective}-{size}-{budget:.0e}"
        run = cl.create_run(exp, run_name=name, tags={c.KIND: "trial", c.TRIAL: name, c.STATUS: c.STATUS_COMPLETED,
                                                      c.PARENT_RUN_ID: sweep})
        rid = run.info.run_id
        for k, v in {c.OBJECTIVE: objective, c.SIZE: size, c.BUDGET_FLOPS: budget,
                     c.N_PARAMS_NON_EMBEDDING: 1000}.items():
            cl.log_param(rid, k, v)
        cl.log_metric(rid, c.VAL_LOSS, loss, step=10)
        if name not in ("mlm-tiny-1-1e+10", "mlm-tiny-2-3e+10"):     # no model: never chosen
            torch.manual_seed(len(trials))
            models.log_model(uri, rid, ProteinLM(ModelConfig(1, 16, 2, causal=objective == "clm")))
        cl.set_terminated(rid)
        trials[name] = rid
    return uri, exp, sweep, trials


def test_experiment_is_model_training_and_its_link_opens_the_trials_view(store):
    uri, exp, _, trials = store
    provenance.describe_experiment(uri, exp, "a sweep")
    cl = MlflowClient(uri)
    tags = cl.get_experiment(exp).tags
    assert tags[provenance.EXPERIMENT_KIND] == "custom_model_development"
    assert tags[provenance.DESCRIPTION] == "a sweep"

    url = provenance.runs_table_url(uri, exp)
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.fragment.startswith(f"/experiments/{exp}/runs?")
    query = parse_qs(parts.fragment.split("?", 1)[1])
    assert query == {"workflowType": ["machine_learning"], "viewStateShareKey": [provenance.VIEW_KEY]}

    # The view the UI loads for that key: a named saved view whose state filters to exactly the trials
    # and shows the scaling columns, each a param or metric the trials have.
    saved = json.loads(tags[provenance.SHARED_VIEW + query["viewStateShareKey"][0]])
    view = json.loads(saved["state"])
    assert saved["name"] and isinstance(saved["createdAt"], int)
    found = cl.search_runs([exp], filter_string=view["searchFilter"])
    assert {r.info.run_id for r in found} == set(trials.values())
    run = found[0]
    for column in view["selectedColumns"]:
        kind, key = column.split(".", 1)
        key = key.strip("`")
        if kind == "params":
            assert key in run.data.params, column
        elif kind == "metrics":
            assert key in c.TRIAL_METRICS, column
    shown = {col.split(".", 1)[1].strip("`") for col in view["selectedColumns"]}
    assert {c.OBJECTIVE, c.SIZE, c.N_PARAMS_NON_EMBEDDING, c.BUDGET_FLOPS, c.VAL_LOSS} <= shown


def test_provenance_git_commit_dataset_input_and_system_metrics(store, tmp_path):
    uri, exp, _, _ = store
    cl = MlflowClient(uri)
    rid = cl.create_run(exp, run_name="provenance").info.run_id
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    tags = provenance.source_tags("protscale train")
    if head.returncode == 0:                       # a git checkout (CI, development)
        assert tags[provenance.GIT_COMMIT] == head.stdout.strip()

    manifest = {"hash": "ab" * 32, "seq_len": 128}
    provenance.log_dataset(uri, rid, str(tmp_path / "mix-1024"), manifest)
    provenance.log_dataset(uri, rid, str(tmp_path / "mix-1024"), manifest)       # a resumed trial: once
    inputs = cl.get_run(rid).inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.name == "mix-1024" and manifest["hash"].startswith(inputs[0].dataset.digest)
    assert len(inputs[0].dataset.digest) == provenance.DIGEST_CHARS

    with provenance.system_metrics(uri, rid, interval_s=0.5):
        time.sleep(1.5)
    keys = set(cl.get_run(rid).data.metrics)
    assert "system/cpu_utilization_percentage" in keys and "system/system_memory_usage_megabytes" in keys


def test_trial_models_load_and_the_compute_optimal_one_registers(store, capsys):
    uri, exp, _, trials = store
    best = trials["mlm-tiny-1-3e+10"]                  # lowest val_loss at the largest budget (3e10)
    assert main(["register", "--experiment", "ui-sweep", "--objective", "mlm", "--name", "ui-mlm",
                 "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "registered ui-mlm version 1" in out and best in out
    cl = MlflowClient(uri)
    version = cl.get_model_version("ui-mlm", "1")
    assert version.run_id == best and version.tags[c.BUDGET_FLOPS] == "30000000000.0"

    import mlflow.pytorch

    with models._quiet_mlflow(uri):
        registered = mlflow.pytorch.load_model("models:/ui-mlm/1", map_location="cpu")
    of_run = models.load_model(uri, best)
    assert isinstance(registered, ProteinLM) and not registered.cfg.causal
    for (k, a), b in zip(registered.state_dict().items(), of_run.state_dict().values()):
        assert torch.equal(a, b), k

    assert main(["register", "--experiment", "no-such", "--objective", "mlm", "--tracking-uri", uri]) == 2
    assert "no experiment 'no-such'" in capsys.readouterr().err
