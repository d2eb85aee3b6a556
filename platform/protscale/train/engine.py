"""The DeepSpeed engine of a trial and the process group it runs over.

Kept apart from the training loop (and free of Ray and MLflow imports) so that benchmarks and GPU checks
build exactly the engine a trial trains with.
"""

from __future__ import annotations

import os
import sys

import torch

from ..model.transformer import ModelConfig, ProteinLM
from . import recipe
from .config import TrialConfig


def build_engine(cfg: TrialConfig, plan, device: torch.device, universal: bool, initial: dict | None = None):
    """The trial's model and AdamW optimizer (the paper's recipe) as a DeepSpeed engine."""
    import deepspeed

    _skip_shm_op()

    # Built directly on a GPU: initialising billions of parameters on the host first takes minutes.
    with torch.device(device if device.type == "cuda" else "cpu"):
        model = ProteinLM(ModelConfig.from_size(cfg.model_size, cfg.objective, cfg.attention,
                                                plan.activation_checkpointing))
    if initial is not None:
        model.load_transfer(initial)
    model = model.to(device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=plan.lr_max, betas=recipe.ADAM_BETAS, eps=recipe.ADAM_EPS,
        fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: recipe.lr_at(i + 1, plan.steps, plan.lr_max) / plan.lr_max)
    ds_config = {
        # No "train_batch_size": DeepSpeed would require it to equal micro × accumulation × world, but the
        # global batch (plan.global_rows) is split unevenly when the world size does not divide it (loop.py).
        "train_micro_batch_size_per_gpu": plan.micro_rows,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": recipe.GRAD_CLIP,
        "zero_optimization": {"stage": plan.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "checkpoint": {"load_universal": universal},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config)
    if cfg.compile:
        # torch.compile of the module in place (Module.compile): parameter names and checkpoints are
        # unchanged. Pays on GPUs (fused norms, GELU, rotary; benchmarks/throughput.py measures it); on a
        # CPU the compile time outweighs any gain for trial-sized runs, hence off by default.
        engine.compile()
    return engine


def _skip_shm_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce op when it sets up communication.
    Trials all-reduce through ``torch.distributed`` and never use it, and the build (torch's JIT C++
    extension) runs under a lock file in ``~/.cache/torch_extensions``: a worker killed while holding it
    (a lost node, an OOM kill; found by tests/test_chaos.py) leaves the lock behind, and every later
    trial on that machine then waits for it forever."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_process_group(world: int, device: torch.device) -> None:
    """Ray Train's local mode (num_workers=0) creates no process group; DeepSpeed needs one: NCCL on a
    GPU (no gloo over CUDA tensors), gloo on CPU."""
    if torch.distributed.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    # A process that ran an earlier trial (local mode) may hold DeepSpeed's cached subgroups of a default
    # group that has since been destroyed; the next engine would fail on them ("group not registered").
    release = getattr(sys.modules.get("deepspeed.utils.groups"), "_release_process_group_references", None)
    if release is not None:
        release()
