"""``train_loop_per_worker``: one trial on one Ray Train worker (all ranks run this).

The model and optimizer are a DeepSpeed engine over the process group Ray Train created (gloo on CPU,
NCCL on GPU). Every ``eval_every`` steps: evaluation on IID validation and OOD test, metrics to MLflow
(rank 0), a checkpoint through ``ray.train.report``. A restarted worker group resumes from the latest
checkpoint and re-attaches to the same MLflow run.
"""

from __future__ import annotations

import math
import os
import shutil
import time

import numpy as np
import torch

from ..data.shards import SPLITS, read_manifest, read_split
from ..model.sizes import FLOPS_CONVENTION, effective_context, train_flops_per_token
from ..tracking import contract as c
from ..tracking.runs import MetricsLogger
from . import checkpoint, recipe
from .batches import Batches
from .config import TrialConfig
from .engine import build_engine, init_process_group
from .plan import Plan

RESUMED_FROM_STEP = "resumed_from_step"     # MLflow tag: the step of the checkpoint of the last restart

# Dense bf16 peak FLOP/s per device, for MFU (vendor figures).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def train_loop_per_worker(config: dict) -> None:
    session = _session()
    cfg = TrialConfig.from_dict(config)
    ctx = session.get_context()
    rank, world = (ctx.get_world_rank(), ctx.get_world_size()) if session.__name__ == "ray.train" else (0, 1)
    local_rank = ctx.get_local_rank() if session.__name__ == "ray.train" else 0
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    init_process_group(world, device)
    torch.manual_seed(cfg.seed)

    train = Batches(read_split(cfg.data, "train"), cfg.objective, cfg.seed)
    evals = {key: Batches(read_split(cfg.data, split), cfg.objective, cfg.seed + 1)
             for key, split in ((c.VAL_LOSS, "val"), (c.TEST_LOSS, "test")) if _has_split(cfg.data, split)}
    plan = Plan(cfg, train.rows.seq_len, world)

    ckpt = session.get_checkpoint()
    saved_world = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved_world = checkpoint.read_state(d)["world_size"]
    universal = saved_world is not None and saved_world != world and cfg.zero_stage > 0

    # Transfer weights go into the model *before* DeepSpeed wraps it: with bf16 or ZeRO the optimizer
    # keeps fp32 master copies made at initialisation, which would overwrite weights loaded later.
    initial = checkpoint.load_weights(cfg.tracking_uri, cfg.init_from) if cfg.init_from and ckpt is None else None
    engine = build_engine(cfg, plan, device, universal, initial)
    state = {"step": 0, "tokens": 0, "world_size": world}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = checkpoint.restore(engine, d, universal, rank)
        if rank == 0:
            print(f"[{cfg.name}] resumed at step {state['step']} (written by {state['world_size']} "
                  f"worker(s), now {world})", flush=True)
        state["world_size"] = world

    logger = MetricsLogger(cfg.tracking_uri, cfg.run_id) if rank == 0 else None
    if logger and state["step"]:       # visible in the UI: this trial was restarted from a checkpoint
        logger.client.set_tag(cfg.run_id, RESUMED_FROM_STEP, str(state["step"]))
    s_eff = effective_context(train.rows.seq_lens)
    flops_per_token = train_flops_per_token(cfg.model_size, s_eff)
    peak = cfg.peak_flops or _peak_flops(device)

    interval_start, interval_tokens, step_losses = time.perf_counter(), state["tokens"], []
    for step in range(state["step"] + 1, plan.steps + 1):
        rows = train.schedule(step, plan.global_rows)
        mine = rows[rank::world]
        for m in range(plan.accumulation):
            batch = train.make(mine[m * plan.micro_rows:(m + 1) * plan.micro_rows], (cfg.seed, step, rank, m), device)
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            step_losses.append(loss.detach())
        state["step"], state["tokens"] = step, state["tokens"] + int(train.row_tokens[rows].sum())
        _maybe_inject_failure(cfg, step)

        if step % plan.eval_every and step != plan.steps:
            continue
        # --- evaluation, metrics, checkpoint (the only host synchronisation of the loop) --------------
        elapsed = time.perf_counter() - interval_start
        train_losses = _mean_across_ranks(torch.stack(step_losses).view(-1, plan.accumulation).mean(1))
        first = step - len(train_losses) + 1
        eval_losses = {key: _evaluate(engine, b, cfg, rank, world, device) for key, b in evals.items()}
        tokens_per_s = (state["tokens"] - interval_tokens) / max(elapsed, 1e-9)
        diverged = not all(math.isfinite(x) for x in [*train_losses, *eval_losses.values()])
        if logger:
            tokens = state["tokens"]
            for i, value in enumerate(train_losses):
                s = first + i
                logger.log(s, {c.TRAIN_LOSS: value, c.LR: recipe.lr_at(s, plan.steps, plan.lr_max)})
            logger.log(step, {**eval_losses, c.TOKENS: tokens, c.FLOPS: 6.0 * cfg.model_size.n_params_non_embedding * tokens,
                              c.TOKENS_PER_S: tokens_per_s,
                              c.MFU: tokens_per_s * flops_per_token / (peak * world) if peak else None})
            logger.flush()
            _progress(cfg, step, plan.steps, train_losses[-1], eval_losses, state["tokens"], tokens_per_s)
        final = step == plan.steps or diverged
        path = checkpoint.save(engine, dict(state), rank, final=final)
        report = {"step": step, "tokens": state["tokens"], c.TRAIN_LOSS: train_losses[-1], **eval_losses,
                  "diverged": diverged}
        if final and logger:
            logger.client.log_artifact(cfg.run_id, os.path.join(path, checkpoint.WEIGHTS), "model")
        session.report(report, checkpoint=session.Checkpoint.from_directory(path))
        shutil.rmtree(path, ignore_errors=True)
        if diverged:
            if logger:
                logger.client.set_tag(cfg.run_id, c.STATUS, c.STATUS_DIVERGED)
            break
        interval_start, interval_tokens, step_losses = time.perf_counter(), state["tokens"], []


def trial_params(cfg: TrialConfig, seq_len: int) -> dict:
    """The contract's params of a trial (logged once, when its MLflow run is created)."""
    size = cfg.model_size
    plan = Plan(cfg, seq_len, 1)
    manifest = read_manifest(cfg.data)
    from ..data.tokenizer import VOCAB_SIZE

    return {
        c.OBJECTIVE: cfg.objective, c.SIZE: size.name, c.LAYERS: size.layers, c.D_MODEL: size.d_model,
        c.HEADS: size.heads, c.N_PARAMS: size.n_params(VOCAB_SIZE),
        c.N_PARAMS_NON_EMBEDDING: size.n_params_non_embedding, c.BUDGET_FLOPS: cfg.budget_flops,
        c.TOKENS_TARGET: cfg.tokens_target, c.LR_MAX: plan.lr_max, c.BATCH_TOKENS: plan.batch_tokens,
        c.SEQ_LEN: seq_len, c.MASK_RATIO: 0.15 if cfg.objective == "mlm" else 0.0, c.SEED: cfg.seed,
        c.DATA_MANIFEST_HASH: manifest.get("hash", ""), c.INIT_FROM: cfg.init_from,
        c.FLOPS_CONVENTION: FLOPS_CONVENTION,
        **({c.INIT_OBJECTIVE: "clm", c.INIT_BUDGET_FLOPS: cfg.init_budget_flops} if cfg.init_from else {}),
    }


# --- pieces of the loop -----------------------------------------------------------------------------

@torch.no_grad()
def _evaluate(engine, batches: Batches, cfg: TrialConfig, rank: int, world: int, device) -> float:
    """Token-weighted mean loss over the first ``eval_rows`` rows, split across ranks."""
    engine.eval()
    rows = np.arange(min(len(batches), cfg.eval_rows))[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    step = max(1, cfg.micro_batch_rows or 16)
    for i in range(0, rows.size, step):
        batch = batches.make(rows[i:i + step], (cfg.seed, 0, int(rows[i])), device)   # fixed MLM masks
        n = (batch["labels"] != -100).sum()
        total += torch.stack([engine(**batch).double() * n, n.double()])
    engine.train()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _mean_across_ranks(losses: torch.Tensor) -> list[float]:
    losses = losses.double()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(losses)
        losses /= torch.distributed.get_world_size()
    return losses.cpu().tolist()


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


def _has_split(data: str, split: str) -> bool:
    from pathlib import Path

    return split in SPLITS and any((Path(data) / split).glob("part-*.parquet"))


def _peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


def _maybe_inject_failure(cfg: TrialConfig, step: int) -> None:
    """Fault injection for recovery tests: the worker process dies once at ``fail_at_step``."""
    if cfg.fail_at_step and step == cfg.fail_at_step and cfg.fail_marker and not os.path.exists(cfg.fail_marker):
        open(cfg.fail_marker, "w").close()
        os._exit(1)


def _progress(cfg, step, steps, train_loss, eval_losses, tokens, tokens_per_s) -> None:
    evals = " ".join(f"{k} {v:.4f}" for k, v in eval_losses.items())
    print(f"[{cfg.name}] step {step}/{steps} train_loss {train_loss:.4f} {evals} "
          f"tokens {tokens:,} ({tokens_per_s:,.0f} tok/s)", flush=True)
