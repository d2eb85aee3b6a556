"""Ray Tune over the trials of a search space: each Tune trial runs one Ray Train trial.

Shape (Train V2 + Tune): a function trainable builds a ``TorchTrainer`` with a deterministic run name
and calls ``fit()``. CPU sweeps use Train's local mode (``num_workers=0``: the loop runs in the Tune
trial's own process, ~10 s of fixed cost instead of ~40 s for a worker group); GPU sweeps give each
trial a worker group. A parent MLflow run holds the sweep, a child run per trial; a resumed sweep finds
each trial's run again by its name and never creates a second one.

Transfer trials (an MLM initialised from a CLM trial) run in a second wave, after their parents.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

from ..tracking import contract as c
from ..tracking import provenance, runs
from ..train.config import TrialConfig
from .space import SearchSpace, Trial, gpu_memory_gb, resources, trial_hashes, workers



def trial_config(space: SearchSpace, trial: Trial, tracking_uri: str) -> TrialConfig:
    fields = {**space.defaults, "batch_tokens": trial.batch_tokens or space.defaults.get("batch_tokens", 0),
              "lr_max": trial.lr_max or space.defaults.get("lr_max", 0.0), "gpu_memory_gb": gpu_memory_gb(space)}
    return TrialConfig(objective=trial.objective, size=trial.size, budget_flops=trial.budget_flops,
                       data=space.data, tracking_uri=tracking_uri, experiment=space.name, name=trial.name,
                       seed=trial.seed, tags={c.SWEEP: space.name}, **fields)


def run_one(config: dict) -> None:
    """The Tune trainable: one trial, tracked as a child run of the sweep. A finished run of the same
    name *and identity* (``trial_hash``) is not trained again; a run of that name under another config
    is left as it is and the trial trains in a new run (``runs.start_run``)."""
    from ..train.checkpoint import CheckpointStorageError
    from ..train.trial import failure_reason, finish, identify, prepare_run, trainer

    cfg = TrialConfig.from_dict(config["trial"])
    if config.get("parent"):
        cfg.init_from = _parent_run(cfg, config["parent"], config.get("parent_hash") or None) or ""
        if not cfg.init_from:
            raise RuntimeError(f"transfer trial {cfg.name}: CLM parent {config['parent']} has no completed "
                               "MLflow run of its current config")
    identify(cfg)
    existing = runs.find_run(cfg.tracking_uri, cfg.experiment, cfg.name, cfg.trial_hash)
    if existing and runs.client(cfg.tracking_uri).get_run(existing).data.tags.get(c.STATUS) in (
            c.STATUS_COMPLETED, c.STATUS_DIVERGED):
        print(f"{cfg.name}: already finished (MLflow run {existing}, trial_hash {cfg.trial_hash}); "
              "not trained again", flush=True)
        return
    cfg = prepare_run(cfg, parent_run_id=config["sweep_run_id"])
    start = time.perf_counter()
    n = config["workers"]
    try:
        result = trainer(cfg, (n, n), config["storage"], max_failures=1, use_gpu=config["gpu"] and n > 0).fit()
        outcome = finish(cfg, result, time.perf_counter() - start, config["storage"])
    except Exception as exc:
        # Closed as failed with its reason; Tune retries it (re-opening the same run) up to the sweep's
        # max_failures, except where no retry can help: the checkpoint storage refused a write.
        reason = failure_reason(exc)
        runs.finish_run(cfg.tracking_uri, cfg.run_id, c.STATUS_FAILED, reason)
        if _caused_by(exc, CheckpointStorageError):
            print(f"{cfg.name}: failed, not retried: {reason}", flush=True)
            return
        raise
    print(outcome.summary(cfg.name), flush=True)


def _caused_by(exc: BaseException, kind: type) -> bool:
    """Whether ``kind`` is in the chain of ``exc`` (its causes and contexts)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _parent_run(cfg: TrialConfig, parent: str, parent_hash: str | None) -> str | None:
    """The completed run of CLM trial ``parent`` (of identity ``parent_hash`` when known, else its
    latest completed run)."""
    return runs.find_run(cfg.tracking_uri, cfg.experiment, parent, parent_hash, status=c.STATUS_COMPLETED)


def run_sweep(space: SearchSpace, tracking_uri: str, storage: str, resume: bool = False,
              max_failures: int = 1, verbose: bool = False, log_file: str | None = None) -> dict:
    """Run every trial of ``space`` (finished ones are skipped on resume). Returns {trial: status}.

    The console shows one live display of the sweep (``progress.SweepMonitor``), and the parent MLflow run
    gets the live frontier after each finished trial (``frontier.LiveFrontier``). Ray's own output goes to
    ``log_file`` (default ``<storage>/<sweep>/sweep.log``), or stays on the console with ``verbose``."""

    from .progress import SweepMonitor, default_log_path

    log = log_file or default_log_path(_join(storage), space.name)
    with SweepMonitor(space.name, log, verbose) as monitor:
        return _run_sweep(space, tracking_uri, storage, resume, max_failures, monitor)


def _run_sweep(space: SearchSpace, tracking_uri: str, storage: str, resume: bool, max_failures: int,
               monitor) -> dict:
    from ray import tune

    from .adaptive import trials_digest
    from .frontier import LiveFrontier
    from .progress import TuneEvents

    # Ctrl-C stops the sweep: Tune's own first-SIGINT handler stops only the running wave (it saves the
    # wave's state and returns), and the sweep would go on to the next one.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

    storage = _join(storage)
    sweep_run = runs.start_run(tracking_uri, space.name, f"sweep-{space.name}",
                               {"space": space.source, "trials": len(space.trials), "data": space.data},
                               {c.KIND: "sweep", c.SWEEP: space.name,
                                **provenance.source_tags(space.source or "protscale sweep")})
    print(f"[sweep] {space.name}: {provenance.record_sweep(tracking_uri, sweep_run, space)}", flush=True)
    hashes = trial_hashes(space, tracking_uri)       # identity of every trial (skip-if-done matches it)
    done = _finished_trials(tracking_uri, space.name, hashes)
    monitor.attach(LiveFrontier(tracking_uri, space.name, sweep_run, hashes))
    monitor.plan(space.trials, done)                 # adaptive waves add theirs as they come
    statuses = {}
    for name, trials in _waves(space, tracking_uri, hashes):
        if any(t.name not in hashes for t in trials):      # an adaptive wave's new trials: their identity too
            hashes.update(trial_hashes(space, tracking_uri, trials, hashes))
            done = _finished_trials(tracking_uri, space.name, hashes)
        todo = [t for t in trials if t.name not in done]
        monitor.plan(trials, done)
        statuses.update({t.name: c.STATUS_COMPLETED for t in trials if t.name in done})
        if not todo:
            continue
        gpu = bool(space.gpus_per_trial)
        param_space = {"trial_name": tune.grid_search([t.name for t in todo])}
        by_name = {t.name: t for t in trials}      # a restored Tune run also holds finished trials

        def protscale_trial(config, _by_name=by_name):     # Tune names trials and their dirs after it
            t = _by_name[config["trial_name"]]
            run_one({"trial": asdict(trial_config(space, t, tracking_uri)), "parent": t.parent,
                     "parent_hash": hashes.get(t.parent, ""),
                     "sweep_run_id": sweep_run, "storage": _join(storage, space.name, "trials"),
                     "gpu": gpu, "workers": workers(space, t)})

        def trial_resources(config, _by_name=by_name):
            res = resources(space, _by_name[config["trial_name"]])
            return tune.PlacementGroupFactory([{"CPU": res["cpu"], "GPU": res.get("gpu", 0)}])

        trainable = tune.with_resources(protscale_trial, trial_resources)
        # The Tune experiment of exactly these trials: a resumed sweep restores it only when the same trials
        # are left to run (an edited space, or trials finished since, make a new one; each trial resumes
        # from its own checkpoint either way), never a Tune state that names trials no longer asked for.
        name = f"{name}-{trials_digest(todo)}"
        path = _join(storage, space.name, name)
        if resume and tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                # No reuse_actors: DeepSpeed caches process groups at module level, and a reused
                # trial process fails in the next trial's deepspeed.initialize ("group not registered").
                tune_config=tune.TuneConfig(metric=c.VAL_LOSS, mode="min",
                                            max_concurrent_trials=space.max_concurrent or None),
                # No checkpoints reach Tune: each trial keeps its own, at most checkpoint.KEEP of them
                # (Train's for a worker group, checkpoint.TrialStore in local mode).
                run_config=tune.RunConfig(name=name, storage_path=_join(storage, space.name), verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=max_failures),
                                          callbacks=[TuneEvents()]))
        with monitor.tuning():          # Tune's tables go to the sweep's log (unless --verbose)
            try:
                tuner.fit()
            except KeyboardInterrupt:   # the whole sweep stops (``--resume`` goes on from the checkpoints)
                runs.finish_run(tracking_uri, sweep_run, c.STATUS_FAILED, "interrupted (Ctrl-C)")
                raise
        done = _finished_trials(tracking_uri, space.name, hashes)
        statuses.update({t.name: done.get(t.name, c.STATUS_FAILED) for t in trials})
    ok = all(s == c.STATUS_COMPLETED for s in statuses.values())
    runs.finish_run(tracking_uri, sweep_run, c.STATUS_COMPLETED if ok else c.STATUS_FAILED)
    return statuses


def _waves(space: SearchSpace, tracking_uri: str, hashes: dict[str, str]):
    """(Ray Tune experiment name, trials) of each wave, in order: the space's trials; then, with
    ``space.adaptive``, the waves placement asks for (``sweep/adaptive.py``), each decided from the
    finished trials once the wave before it is over; then the transfer trials (after their CLM parents)."""
    yield "wave0", [t for t in space.trials if not t.parent]
    if space.adaptive is not None:
        from . import adaptive

        attempted = {t.name for t in space.trials}
        index = 0
        while True:
            points = adaptive.read_points(tracking_uri, space.name, space.adaptive, hashes)
            decided = adaptive.next_wave(space.adaptive, points,
                                         attempted | set(_finished_trials(tracking_uri, space.name, hashes)))
            for w in decided:
                print(f"[adaptive] after wave {index}: {adaptive.describe(w)}", flush=True)
            trials = [t for w in decided for t in w.trials]
            if not trials:
                break
            attempted |= {t.name for t in trials}
            index += 1
            yield adaptive.wave_name(index, trials), trials
        # a resumed sweep: trials an earlier run's waves trained count too (reported, never retrained)
        finished = _finished_trials(tracking_uri, space.name, hashes)
        earlier = [t for t in space.adaptive.grid() if t.name in finished and t.name not in attempted]
        if earlier:
            yield "adaptive-earlier", earlier
    yield "wave1", [t for t in space.trials if t.parent]


def _join(storage: str, *parts: str) -> str:
    """Join storage paths: local paths become absolute; URIs (s3://, gs://) keep their scheme."""
    if "://" in storage:
        return "/".join([storage.rstrip("/"), *parts])
    return str(Path(storage, *parts).resolve())


def _finished_trials(tracking_uri: str, experiment: str, hashes: dict[str, str] | None = None) -> dict[str, str]:
    """{trial name: status} of trials whose run is closed (completed or diverged). With ``hashes``
    ({trial name: trial_hash}, ``space.trial_hashes``), only runs of the trial's current identity count:
    a trial whose config changed since its run finished is not done."""
    cl = runs.client(tracking_uri)
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    out = {}
    for r in cl.search_runs([exp.experiment_id], filter_string=f"tags.{c.KIND} = 'trial'", max_results=10000):
        status, name = r.data.tags.get(c.STATUS), r.data.tags.get(c.TRIAL)
        if status not in (c.STATUS_COMPLETED, c.STATUS_DIVERGED) or name is None:
            continue
        if hashes is not None and r.data.params.get(c.TRIAL_HASH) != hashes.get(name):
            continue
        out[name] = status
    return out
