"""Driver side of one trial: the MLflow run, the ``TorchTrainer``, the outcome.

    run_trial(cfg, workers=(1, 2))   # elastic: start with >= 1 worker, use 2 when available
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..data.shards import read_manifest
from ..tracking import contract as c
from ..tracking import provenance, runs
from . import checkpoint
from .config import TrialConfig, trial_name
from .loop import trial_params, train_loop_per_worker

RESIZE_CHECK_S = 60.0     # an elastic trial looks at the cluster's resources this often (Ray's default)



@dataclass
class TrialResult:
    run_id: str
    status: str
    metrics: dict
    wall_s: float

    def summary(self, name: str) -> str:
        m = self.metrics
        evals = " ".join(f"{k} {m[k]:.4f}" for k in (c.VAL_LOSS, c.TEST_LOSS) if k in m)
        tokens = int(m.get(c.TOKENS, 0))
        return (f"{name}: {self.status} | train_loss {m.get(c.TRAIN_LOSS, float('nan')):.4f} {evals} | "
                f"tokens {tokens:,} | flops {m.get(c.FLOPS, 0):.3g} | {self.wall_s:.1f} s wall | "
                f"{m.get(c.TOKENS_PER_S, 0):,.0f} tok/s training, {tokens / max(self.wall_s, 1e-9):,.0f} "
                f"overall | mlflow run {self.run_id}")


def connect_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), else start a local Ray with its dashboard (the state API
    that cleans up stopped trials' workers lives there; see NOTES on ray-project/ray#54305)."""
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=None if address else True,
                     logging_level="WARNING", log_to_driver=True)
        except Exception as exc:    # no Ray to run on: one line, not Ray's traceback
            from ..errors import UserError

            raise UserError(f"Ray {'at ' + address if address else '(local)'} did not start or answer: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; run again (a loaded "
                            "machine can miss Ray's start-up timeout) or give --ray-address") from None


def default_name(cfg: TrialConfig) -> str:
    return trial_name(cfg.objective, cfg.size, cfg.budget_flops, cfg.seed, cfg.lr_max, cfg.batch_tokens)


def prepare_run(cfg: TrialConfig, parent_run_id: str | None = None) -> TrialConfig:
    """Fill in the trial name, its identity hash and its MLflow run: the run of the same name *and*
    ``trial_hash`` is found again (resume), otherwise a new run is created — a run of that name made
    under another config is never reused."""
    cfg.name = cfg.name or default_name(cfg)
    identify(cfg)
    manifest = read_manifest(cfg.data)
    source = provenance.source_tags("protscale sweep" if c.SWEEP in cfg.tags else "protscale train")
    cfg.run_id = runs.start_run(cfg.tracking_uri, cfg.experiment, cfg.name,
                                {**trial_params(cfg, manifest["seq_len"]), c.TRIAL_HASH: cfg.trial_hash},
                                {c.SOURCE: c.SOURCE_TRAINED, c.KIND: "trial", **source, **cfg.tags},
                                parent_run_id=parent_run_id, trial_hash=cfg.trial_hash)
    provenance.log_dataset(cfg.tracking_uri, cfg.run_id, cfg.data, manifest)
    return cfg


def identify(cfg: TrialConfig) -> str:
    """Set and return ``cfg.trial_hash`` (and ``init_budget_flops`` of a transfer trial, whose parent run
    must be a completed CLM trial; the parent's own ``trial_hash`` enters this trial's)."""
    parent_hash = ""
    if cfg.init_from:
        parent = runs.client(cfg.tracking_uri).get_run(cfg.init_from)     # raises for an unknown id
        if parent.data.params.get(c.OBJECTIVE) != "clm" or parent.data.tags.get(c.STATUS) != c.STATUS_COMPLETED:
            raise ValueError(f"init_from {cfg.init_from}: not a completed CLM trial")
        cfg.init_budget_flops = float(parent.data.params[c.BUDGET_FLOPS])
        parent_hash = parent.data.params.get(c.TRIAL_HASH, "")
    cfg.trial_hash = cfg.identity_hash(read_manifest(cfg.data), parent_hash)
    return cfg.trial_hash


def trainer(cfg: TrialConfig, workers: tuple[int, int], storage: str, max_failures: int,
            use_gpu: bool = False, callbacks=(), resize_check_s: float = RESIZE_CHECK_S):
    """The Ray Train ``TorchTrainer`` of one trial (``workers=(0, 0)``: Train's local mode). An elastic
    range (``lo < hi``) restarts the worker group at a new size when the cluster's resources change,
    looked at every ``resize_check_s`` seconds; the run resumes from its latest checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    lo, hi = workers
    num_workers = hi if lo == hi else (lo, hi)
    if lo != hi:
        cfg = elastic_config(cfg, lo)
    cfg = replace(cfg, checkpoint_dir=checkpoint_dir(cfg, storage))
    storage, name = cfg.checkpoint_dir.rsplit("/", 1)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               elastic_resize_monitor_interval_s=resize_check_s),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoint.KEEP),
            callbacks=[*callbacks, *(_tune_report() if hi > 0 else []),
                       *([_fresh_node_view()] if lo != hi else [])]),
    )


def checkpoint_dir(cfg: TrialConfig, storage: str) -> str:
    """``<storage>/<name>-<hash>``: the trial's checkpoints (Ray Train's run folder, or the trial's own
    ``checkpoint.TrialStore`` in local mode). The identity hash in the name keeps another config of the
    same trial from resuming them."""
    name = f"{cfg.name}-{cfg.trial_hash[:8]}" if cfg.trial_hash else cfg.name
    storage = storage.rstrip("/") if "://" in storage else str(Path(storage).resolve())
    return f"{storage}/{name}"


def _fresh_node_view():
    """A controller callback of elastic trials. Ray Train 2.60 sizes a restarted worker group from the
    AutoscalingCoordinator's view of the nodes, which it refreshes every 20 s: right after a node is
    lost that view still counts it, so Train asks for a group that cannot be placed, waits 60 s for it
    and books a controller failure (3 end the trial). Found by ``tests/test_elastic_live.py``. When a
    worker group fails, this refreshes the view first (and lets the policy's 1 s cache of it lapse)."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator)
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class FreshNodeView(ControllerCallback):
        def before_controller_execute_failure_decision(self, failure_decision):
            try:
                coordinator = get_or_create_autoscaling_coordinator()
                ray.get(coordinator.get_reserved_resources.remote("protscale", recompute=True), timeout=10)
                time.sleep(1.1)
            except Exception:           # best effort: without it Train still recovers, a minute later
                pass

    return FreshNodeView()


def _tune_report() -> list:
    """Inside a Tune trial, a worker group's ``ray.train.report`` reaches Tune only through Train's
    ``TuneReportCallback`` (rank 0's metrics; a checkpoint as its path, not copied). Train's local mode
    reports to Tune directly (``loop._session``). Outside Tune (``protscale train``): nothing."""
    from ray.tune.integration.ray_train import TuneReportCallback

    try:
        return [TuneReportCallback()]
    except RuntimeError:            # "must be used in a Tune session"
        return []


def elastic_config(cfg: TrialConfig, min_workers: int) -> TrialConfig:
    """An elastic GPU trial keeps one ZeRO stage at every world size of its range: a checkpoint cannot
    move between ZeRO-0 and ZeRO >= 1 (``checkpoint.CheckpointLayoutError``). The stage the memory plan
    needs at the smallest world size (at least 1) fits every larger one too."""
    if cfg.zero_stage != "auto" or not cfg.gpu_memory_gb:
        return cfg
    from dataclasses import replace

    from ..data.shards import read_manifest
    from .plan import Plan

    stage = Plan(cfg, read_manifest(cfg.data)["seq_len"], max(1, min_workers)).zero_stage
    return replace(cfg, zero_stage=max(1, stage))


def run_trial(cfg: TrialConfig, workers: tuple[int, int] = (1, 1), storage: str = "runs",
              max_failures: int = 2, use_gpu: bool = False, parent_run_id: str | None = None,
              resize_check_s: float = RESIZE_CHECK_S) -> TrialResult:
    cfg = prepare_run(cfg, parent_run_id)
    start = time.perf_counter()
    try:
        result = trainer(cfg, workers, storage, max_failures, use_gpu, resize_check_s=resize_check_s).fit()
    except Exception as exc:
        runs.finish_run(cfg.tracking_uri, cfg.run_id, c.STATUS_FAILED, failure_reason(exc))
        raise
    return finish(cfg, result, time.perf_counter() - start, storage)


def finish(cfg: TrialConfig, result, wall_s: float, storage: str) -> TrialResult:
    """Close the MLflow run with the trial's outcome; its latest metrics come from the run itself (in
    Train's local mode inside Tune, ``Result.metrics`` is empty: the reports went to Tune). A trial that
    ended (completed or diverged) needs its checkpoints no more: its final weights are its MLflow model,
    and a finished run is never trained again. They are deleted once the run is closed (at the paper's
    scale a 3.4B trial's checkpoint is ~48 GB: 14 bytes a parameter in bf16 with Adam)."""
    run = runs.client(cfg.tracking_uri).get_run(cfg.run_id)
    reason = ""
    if result.error:
        status, reason = c.STATUS_FAILED, failure_reason(result.error)
    elif run.data.tags.get(c.STATUS) == c.STATUS_DIVERGED:     # set by rank 0 when the loss went non-finite
        status = c.STATUS_DIVERGED
    else:
        status = c.STATUS_COMPLETED
    runs.finish_run(cfg.tracking_uri, cfg.run_id, status, reason)
    if status != c.STATUS_FAILED:
        checkpoint.discard(checkpoint_dir(cfg, storage))
    return TrialResult(cfg.run_id, status, dict(run.data.metrics), wall_s)


def failure_reason(exc: BaseException) -> str:
    """One line on why a trial failed, for its ``failure_reason`` tag: the message of the first
    ``UserError`` found in the error's chain (Ray wraps a worker's error in ``WorkerGroupError`` /
    ``RayTaskError``), else the error's type and first line."""
    from ..errors import UserError, first_line

    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return first_line(str(e.args[0]) if e.args else str(e))
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values(),
                 getattr(e, "cause", None)]
    return f"{type(exc).__name__}: {first_line(str(exc))}"
