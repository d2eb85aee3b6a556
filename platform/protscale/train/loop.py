"""``train_loop_per_worker``: one trial on one Ray Train worker (all ranks run this).

The model and optimizer are a DeepSpeed engine over the process group Ray Train created (gloo on CPU,
NCCL on GPU). Every ``eval_every`` steps: evaluation on IID validation and OOD test, metrics to MLflow
(rank 0), a checkpoint through ``ray.train.report`` (in Train's local mode inside Tune, into the trial's
own ``checkpoint.TrialStore``). A restarted trial resumes from the latest checkpoint and re-attaches to
the same MLflow run.

Data: the splits are streamed (``shards.SplitReader``); a background thread builds and copies the next
micro-batches (``batches.Prefetcher``). Inside a step nothing waits for the host: losses, token counts
and learning rates are kept (on the device, or as host floats the optimizer already holds) until the
evaluation boundary, the only synchronisation of the loop.

Global batch at any world size: step s trains on the ``plan.global_rows`` rows of ``Schedule.rows(s)``
whatever the world size; rank r takes every world-th, in ``plan.accumulation`` micro-batches. The loss
is the **token mean over the global batch**: micro-batch m of rank r has mean loss L over its n labelled
positions, and N labelled positions are in the whole step (one all-reduce of the per-rank counts, on the
device). DeepSpeed divides by the accumulation steps in ``backward`` and averages gradients over ranks,
so ``backward`` gets L · n · accumulation · world / N: the gradient is then that of Σ(L·n)/N, the same
at every world size and micro-batch split (``tests/test_batches.py`` checks one step at 2 and 3 workers
against one plain full-batch pass).
"""

from __future__ import annotations

import math
import shutil
import time

import numpy as np
import torch

from ..data.shards import SplitReader, read_manifest
from ..model.sizes import FLOPS_CONVENTION, effective_context, peak_flops, train_flops_per_token
from ..tracking import contract as c
from ..tracking import provenance
from ..tracking.runs import MetricsLogger
from ..errors import first_line
from . import checkpoint, faults
from .batches import EVAL_STEP, Prefetcher, Schedule, build_batch, step_micro_batches
from .config import TrialConfig
from .engine import build_engine, init_process_group
from .plan import Plan

RESUMED_FROM_STEP = "resumed_from_step"     # MLflow tag: the step of the checkpoint of the last restart


def train_loop_per_worker(config: dict) -> None:
    session = _session()
    cfg = TrialConfig.from_dict(config)
    ctx = session.get_context()
    rank, world = (ctx.get_world_rank(), ctx.get_world_size()) if session.__name__ == "ray.train" else (0, 1)
    local_rank = ctx.get_local_rank() if session.__name__ == "ray.train" else 0
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    init_process_group(world, device)
    torch.manual_seed(cfg.seed)

    manifest = read_manifest(cfg.data)
    train = SplitReader(cfg.data, "train", manifest=manifest)
    evals = {key: SplitReader(cfg.data, split, cache_blocks=2, manifest=manifest)
             for key, split in ((c.VAL_LOSS, "val"), (c.TEST_LOSS, "test")) if _has_split(manifest, split)}
    plan = Plan(cfg, train.seq_len, world)

    # Train's local mode inside Tune: the trial keeps its own checkpoints (``checkpoint.TrialStore``).
    store = checkpoint.TrialStore(cfg.checkpoint_dir) if session.__name__ == "ray.tune" and cfg.checkpoint_dir else None
    ckpt = store.latest() if store else session.get_checkpoint()

    # Transfer weights go into the model *before* DeepSpeed wraps it: with bf16 or ZeRO the optimizer
    # keeps fp32 master copies made at initialisation, which would overwrite weights loaded later.
    initial = checkpoint.load_weights(cfg.tracking_uri, cfg.init_from) if cfg.init_from and ckpt is None else None
    engine = build_engine(cfg, plan, device, False, initial)     # restore() picks sharded or universal
    state = {"step": 0, "tokens": 0, "world_size": world}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = checkpoint.restore(engine, d)     # each rank from its own copy: no cross-rank wait
        if rank == 0:
            print(f"[{cfg.name}] resumed at step {state['step']} (written by {state['world_size']} "
                  f"worker(s), now {world})", flush=True)
        state["world_size"] = world

    logger = MetricsLogger(cfg.tracking_uri, cfg.run_id) if rank == 0 else None
    if logger and state["step"]:       # visible in the UI: this trial was restarted from a checkpoint
        logger.client.set_tag(cfg.run_id, RESUMED_FROM_STEP, str(state["step"]))
    s_eff = _s_eff(manifest, train)
    flops_per_token = train_flops_per_token(cfg.model_size, s_eff)
    peak = cfg.peak_flops or _peak_flops(device)

    schedule = Schedule.for_reader(train, cfg.seed, plan.global_rows)
    train.cache_blocks = 2 * schedule.window_blocks + 1      # a step reads from at most two windows
    source = step_micro_batches(train, schedule, cfg.objective, cfg.seed, plan.global_rows, plan.accumulation,
                                rank, world, state["step"] + 1, plan.steps)
    prefetch = Prefetcher(source, device, depth=max(2, min(plan.accumulation + 1, 8)))
    try:
        with provenance.system_metrics(cfg.tracking_uri, cfg.run_id, enabled=rank == 0):   # rank 0's node
            _train(cfg, session, store, engine, plan, prefetch, evals, state, logger, rank, world, device,
                   flops_per_token, peak)
    finally:
        prefetch.close()


def _train(cfg, session, store, engine, plan, prefetch, evals, state, logger, rank, world, device,
           flops_per_token, peak) -> None:
    interval_start, interval_tokens = time.perf_counter(), state["tokens"]
    step_losses, step_counts, step_lrs = [], [], []
    for step in range(state["step"] + 1, plan.steps + 1):
        loss, counts, lr = train_step(engine, prefetch, plan.accumulation, world)
        step_losses.append(loss)
        step_counts.append(counts)
        step_lrs.append(lr)
        state["step"] = step
        faults.point("train_step", step)

        if step % plan.eval_every and step != plan.steps:
            continue
        # --- evaluation, metrics, checkpoint (the only host synchronisation of the loop) --------------
        train_losses = _sum_across_ranks(torch.stack(step_losses))
        tokens_per_step = torch.stack(step_counts)[:, 1].cpu().tolist()     # already summed over ranks
        state["tokens"] += int(sum(tokens_per_step))
        elapsed = time.perf_counter() - interval_start
        first = step - len(train_losses) + 1
        eval_losses = {key: _evaluate(engine, reader, cfg, plan, rank, world, device) for key, reader in evals.items()}
        tokens_per_s = (state["tokens"] - interval_tokens) / max(elapsed, 1e-9)
        diverged = not all(math.isfinite(x) for x in [*train_losses, *eval_losses.values()])
        if logger:
            tokens = state["tokens"]
            for i, value in enumerate(train_losses):
                logger.log(first + i, {c.TRAIN_LOSS: value, c.LR: step_lrs[i], c.WORLD_SIZE: world})
            logger.log(step, {**eval_losses, c.TOKENS: tokens, c.FLOPS: 6.0 * cfg.model_size.n_params_non_embedding * tokens,
                              c.TOKENS_PER_S: tokens_per_s,
                              c.MFU: tokens_per_s * flops_per_token / (peak * world) if peak else None})
            logger.flush()
            faults.point("after_metrics_flush", step)
            _progress(cfg, step, plan.steps, train_losses[-1], eval_losses, state["tokens"], tokens_per_s)
        final = step == plan.steps or diverged
        path = checkpoint.save(engine, dict(state), rank)
        if final and not diverged:
            weights = checkpoint.consolidated_state_dict(engine, rank)     # every rank: ZeRO-3 gathers
            if logger:
                log_final_model(cfg, weights)
            del weights
        # To Tune (directly in local mode, through ``TuneReportCallback`` from a worker group), which ranks
        # trials by val_loss: NaN when the data has no validation split.
        report = {"step": step, "tokens": state["tokens"], c.TRAIN_LOSS: train_losses[-1], c.VAL_LOSS: float("nan"),
                  **eval_losses, "diverged": diverged}
        faults.point("before_report", step)
        try:
            if store:
                store.persist(path, step)
                session.report(report)
            else:
                session.report(report, checkpoint=session.Checkpoint.from_directory(path))
        except OSError as exc:          # disk full, read-only, gone: no retry brings the storage back
            raise checkpoint.CheckpointStorageError(
                f"checkpoint of step {step} could not be written to {cfg.checkpoint_dir or 'Ray storage'}: "
                f"{type(exc).__name__}: {first_line(exc, 300)}; free space or fix the storage (--storage), then run again to resume from "
                "the last checkpoint") from None
        shutil.rmtree(path, ignore_errors=True)
        if not store:
            _await_registration(session)
        faults.hold(step, rank)
        if diverged:
            if logger:
                logger.client.set_tag(cfg.run_id, c.STATUS, c.STATUS_DIVERGED)
            break
        interval_start, interval_tokens = time.perf_counter(), state["tokens"]
        step_losses, step_counts, step_lrs = [], [], []


def log_final_model(cfg: TrialConfig, weights: dict) -> None:
    """The final weights as the MLflow model of the trial's run, in the dtype they trained in, once: a
    worker group restarted after logging it does not log a second one. The module is built on the meta
    device and takes the tensors as they are (no second, fp32 copy of a 10.7B model on the host)."""
    from ..model.transformer import ModelConfig, ProteinLM
    from ..tracking import models
    from ..tracking.runs import client

    run = client(cfg.tracking_uri).get_run(cfg.run_id)
    if run.outputs and run.outputs.model_outputs:
        return
    with torch.device("meta"):
        model = ProteinLM(ModelConfig.from_size(cfg.model_size, cfg.objective))
    model.load_state_dict(weights, assign=True)
    models.log_model(cfg.tracking_uri, cfg.run_id, model)


def train_step(engine, micro_batches, accumulation: int, world: int):
    """One optimizer step over this rank's next ``accumulation`` micro-batches (see the module docstring
    for the weighting). Returns (this rank's share of the step's token-mean loss, a device tensor; the
    step's [labelled positions, tokens] over all ranks, a device tensor; the learning rate the optimizer
    used, a float). Nothing here waits for the device."""
    total = counts = lr = None
    for m in range(accumulation):
        micro = next(micro_batches)
        if m == 0:
            counts = micro.step_counts
            if world > 1:
                torch.distributed.all_reduce(counts)
            scale = (accumulation * world / counts[0].clamp(min=1)).float()
        loss = engine(**micro.batch)
        weighted = loss * (micro.labels * scale)
        engine.backward(weighted)
        if m == accumulation - 1:           # the optimizer steps now: the LR it applies
            lr = float(engine.get_lr()[0])
        engine.step()
        total = weighted.detach() if total is None else total + weighted.detach()
    return total / (accumulation * world), counts, lr


def trial_params(cfg: TrialConfig, seq_len: int) -> dict:
    """The contract's params of a trial (logged once, when its MLflow run is created)."""
    size = cfg.model_size
    # Batch and LR only: the memory plan is the workers' (at 1 GPU a 10B trial has none that fits).
    plan = Plan(TrialConfig.from_dict({**cfg.to_dict(), "gpu_memory_gb": 0.0}), seq_len, 1)
    manifest = read_manifest(cfg.data)
    from ..data.tokenizer import VOCAB_SIZE

    return {
        c.OBJECTIVE: cfg.objective, c.SIZE: size.name, c.LAYERS: size.layers, c.D_MODEL: size.d_model,
        c.HEADS: size.heads, c.N_PARAMS: size.n_params(VOCAB_SIZE, cfg.objective),
        c.N_PARAMS_NON_EMBEDDING: size.n_params_non_embedding, c.BUDGET_FLOPS: cfg.budget_flops,
        c.TOKENS_TARGET: cfg.tokens_target, c.LR_MAX: plan.lr_max, c.BATCH_TOKENS: plan.batch_tokens,
        c.SEQ_LEN: seq_len, c.MASK_RATIO: 0.15 if cfg.objective == "mlm" else 0.0, c.SEED: cfg.seed,
        c.DATA_MANIFEST_HASH: manifest.get("hash", ""), c.INIT_FROM: cfg.init_from,
        c.FLOPS_CONVENTION: FLOPS_CONVENTION,
        **({c.INIT_OBJECTIVE: "clm", c.INIT_BUDGET_FLOPS: cfg.init_budget_flops} if cfg.init_from else {}),
    }


# --- pieces of the loop -----------------------------------------------------------------------------

@torch.no_grad()
def _evaluate(engine, reader: SplitReader, cfg: TrialConfig, plan, rank: int, world: int, device) -> float:
    """Token-weighted mean loss over the first ``eval_rows`` rows, split across ranks. Every rank runs the
    same number of forward passes (ZeRO-3 gathers parameters in each), a rank out of rows on a dummy row
    weighted 0. MLM masks are fixed per row (step ``EVAL_STEP``), so evaluations are comparable."""
    engine.eval()
    n = min(reader.n_rows, cfg.eval_rows)
    mine = np.arange(rank, n, world)
    chunk = max(1, plan.micro_rows)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, -(-n // world), chunk):
        part, weight = mine[i:i + chunk], 1.0
        if part.size == 0:
            part, weight = np.arange(1), 0.0
        tokens, lens = reader.rows(part)
        batch = build_batch(tokens, lens, cfg.objective, [(cfg.seed, EVAL_STEP, int(r)) for r in part])
        labelled = int((batch["labels"] != -100).sum())
        if labelled == 0:
            batch["labels"][0, 0], weight = batch["tokens"][0, 0], 0.0
        batch = {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}
        loss = engine(**batch).double()
        total += torch.stack([loss * labelled * weight, torch.tensor(labelled * weight, dtype=torch.float64, device=device)])
    engine.train()
    if torch.distributed.is_initialized() and world > 1:
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _sum_across_ranks(values: torch.Tensor) -> list[float]:
    values = values.double()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values)
    return values.cpu().tolist()


def _s_eff(manifest: dict, train: SplitReader, sample_rows: int = 4096) -> float:
    """S_eff = Σl²/Σl of the training segments: from the manifest when ``data prepare`` recorded it, else
    from the first ``sample_rows`` rows (a random sample: sequences are shuffled before packing)."""
    recorded = manifest["splits"]["train"].get("s_eff")
    if recorded:
        return float(recorded)
    return effective_context(train.rows(np.arange(min(train.n_rows, sample_rows)))[1])


def _session():
    """``ray.train`` in a worker group; ``ray.tune`` when Train's local mode (``num_workers=0``) runs
    this loop inside a Tune trial, where Ray 2.60 refuses the ``ray.train`` session calls."""
    import ray.train
    import ray.tune

    try:
        ray.train.get_context()
        return ray.train
    except DeprecationWarning:
        return ray.tune


def _has_split(manifest: dict, split: str) -> bool:
    info = manifest.get("splits", {}).get(split, {})
    rows = info.get("rows", sum(int(s["rows"]) for s in info.get("shards", [])))
    return int(rows) > 0


def _peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return peak_flops(torch.cuda.get_device_name(device))


def _await_registration(session) -> None:
    """Return once Train's controller has collected this worker's last report. Ray Train 2.60 hands a
    report to the controller only at its next poll of the workers (every 2 s); a worker group that fails
    before then (a node lost just after a checkpoint) restarts from the checkpoint *before* it, and
    retrains the steps between. Found by ``tests/test_elastic_live.py``: a shrink resumed 5 steps back."""
    if session.__name__ != "ray.train":
        return
    from ray.train.v2._internal.execution.context import get_train_context

    try:
        reports = get_train_context().execution_context.result_queue
    except RuntimeError:                # Train's local mode: no controller, nothing to wait for
        return
    reports.join()                      # the controller's poll takes the report and marks it done


def _progress(cfg, step, steps, train_loss, eval_losses, tokens, tokens_per_s) -> None:
    evals = " ".join(f"{k} {v:.4f}" for k, v in eval_losses.items())
    print(f"[{cfg.name}] step {step}/{steps} train_loss {train_loss:.4f} {evals} "
          f"tokens {tokens:,} ({tokens_per_s:,.0f} tok/s)", flush=True)
