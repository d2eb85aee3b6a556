"""Ray Tune over the trials of a search space: each Tune trial runs one Ray Train trial.

Shape (Train V2 + Tune): a function trainable builds a ``TorchTrainer`` with a deterministic run name
and calls ``fit()``. CPU sweeps use Train's local mode (``num_workers=0``: the loop runs in the Tune
trial's own process, ~10 s of fixed cost instead of ~40 s for a worker group); GPU sweeps give each
trial a worker group. A parent MLflow run holds the sweep, a child run per trial; a resumed sweep finds
each trial's run again by its name and never creates a second one.

Transfer trials (an MLM initialised from a CLM trial) run in a second wave, after their parents.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from ..tracking import contract as c
from ..tracking import runs
from ..train.config import TrialConfig
from .space import SearchSpace, Trial, gpu_memory_gb, resources, workers


def trial_config(space: SearchSpace, trial: Trial, tracking_uri: str) -> TrialConfig:
    fields = {**space.defaults, "batch_tokens": trial.batch_tokens or space.defaults.get("batch_tokens", 0),
              "lr_max": trial.lr_max or space.defaults.get("lr_max", 0.0), "gpu_memory_gb": gpu_memory_gb(space)}
    return TrialConfig(objective=trial.objective, size=trial.size, budget_flops=trial.budget_flops,
                       data=space.data, tracking_uri=tracking_uri, experiment=space.name, name=trial.name,
                       seed=trial.seed, tags={c.SWEEP: space.name}, **fields)


def run_one(config: dict) -> None:
    """The Tune trainable: one trial, tracked as a child run of the sweep."""
    from ..train.trial import finish, prepare_run, trainer

    cfg = TrialConfig.from_dict(config["trial"])
    existing = runs.find_run(cfg.tracking_uri, cfg.experiment, cfg.name)
    if existing and runs.client(cfg.tracking_uri).get_run(existing).data.tags.get(c.STATUS) in (
            c.STATUS_COMPLETED, c.STATUS_DIVERGED):
        print(f"{cfg.name}: already finished (MLflow run {existing}); not trained again", flush=True)
        return
    if config.get("parent"):
        cfg.init_from = runs.find_run(cfg.tracking_uri, cfg.experiment, config["parent"]) or ""
        if not cfg.init_from:
            raise RuntimeError(f"transfer trial {cfg.name}: CLM parent {config['parent']} has no MLflow run")
    cfg = prepare_run(cfg, parent_run_id=config["sweep_run_id"])
    start = time.perf_counter()
    n = config["workers"]
    result = trainer(cfg, (n, n), config["storage"], max_failures=1, use_gpu=config["gpu"] and n > 0).fit()
    outcome = finish(cfg, result, time.perf_counter() - start)
    print(outcome.summary(cfg.name), flush=True)


def run_sweep(space: SearchSpace, tracking_uri: str, storage: str, resume: bool = False,
              max_failures: int = 1) -> dict:
    """Run every trial of ``space`` (finished ones are skipped on resume). Returns {trial: status}."""
    from ray import tune

    storage = _join(storage)
    sweep_run = runs.start_run(tracking_uri, space.name, f"sweep-{space.name}",
                               {"space": space.source, "trials": len(space.trials), "data": space.data},
                               {c.KIND: "sweep", c.SWEEP: space.name})
    done = _finished_trials(tracking_uri, space.name)
    statuses = {}
    first = [t for t in space.trials if not t.parent]
    second = [t for t in space.trials if t.parent]
    for wave, trials in enumerate((first, second)):
        todo = [t for t in trials if t.name not in done]
        statuses.update({t.name: c.STATUS_COMPLETED for t in trials if t.name in done})
        if not todo:
            continue
        gpu = bool(space.gpus_per_trial)
        param_space = {"trial_name": tune.grid_search([t.name for t in todo])}
        by_name = {t.name: t for t in trials}      # a restored Tune run also holds finished trials

        def trainable(config, _by_name=by_name):
            t = _by_name[config["trial_name"]]
            run_one({"trial": asdict(trial_config(space, t, tracking_uri)), "parent": t.parent,
                     "sweep_run_id": sweep_run, "storage": _join(storage, space.name, "trials"),
                     "gpu": gpu, "workers": workers(space, t)})

        def trial_resources(config, _by_name=by_name):
            res = resources(space, _by_name[config["trial_name"]])
            return tune.PlacementGroupFactory([{"CPU": res["cpu"], "GPU": res.get("gpu", 0)}])

        trainable = tune.with_resources(trainable, trial_resources)
        name = f"wave{wave}"
        path = _join(storage, space.name, name)
        if resume and tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                # No reuse_actors: DeepSpeed caches process groups at module level, and a reused
                # trial process fails in the next trial's deepspeed.initialize ("group not registered").
                tune_config=tune.TuneConfig(max_concurrent_trials=space.max_concurrent or None),
                run_config=tune.RunConfig(name=name, storage_path=_join(storage, space.name), verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=max_failures)))
        tuner.fit()
        done = _finished_trials(tracking_uri, space.name)
        statuses.update({t.name: done.get(t.name, c.STATUS_FAILED) for t in trials})
    ok = all(s == c.STATUS_COMPLETED for s in statuses.values())
    runs.finish_run(tracking_uri, sweep_run, c.STATUS_COMPLETED if ok else c.STATUS_FAILED)
    return statuses


def _join(storage: str, *parts: str) -> str:
    """Join storage paths: local paths become absolute; URIs (s3://, gs://) keep their scheme."""
    if "://" in storage:
        return "/".join([storage.rstrip("/"), *parts])
    return str(Path(storage, *parts).resolve())


def _finished_trials(tracking_uri: str, experiment: str) -> dict[str, str]:
    """{trial name: status} of trials whose run is closed (completed or diverged)."""
    cl = runs.client(tracking_uri)
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    out = {}
    for r in cl.search_runs([exp.experiment_id], filter_string=f"tags.{c.KIND} = 'trial'", max_results=10000):
        status = r.data.tags.get(c.STATUS)
        if status in (c.STATUS_COMPLETED, c.STATUS_DIVERGED):
            out[r.data.tags[c.TRIAL]] = status
    return out
