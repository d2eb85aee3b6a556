"""``Plan``: how a trial runs at a given world size — rows per optimizer step, micro-batch, gradient
accumulation, ZeRO stage, activation checkpointing, the memory it needs, steps and LR.

One code path: the trial's workers build ``Plan(cfg, seq_len, world)``, and the sweep (``workers``,
``sweep --dry-run``) builds the same object, so what the dry run prints is what the trial does.

* ``global_rows`` is the paper's batch (``recipe.batch_tokens`` / seq_len) at **any** world size: rank r
  takes ``rows[r::world]`` (some ranks one row fewer) in ``accumulation`` micro-batches of at most
  ``micro_rows``, so ``micro_rows · accumulation · world >= global_rows``; steps and the LR schedule
  never depend on the world size, and an elastic resize keeps the recipe.
* On GPUs (``cfg.gpu_memory_gb > 0``) the memory planner (``memory.choose``) fills in every field left
  at auto: the fastest micro-batch, checkpointing and ZeRO stage that fit ``cfg.gpu_memory_gb``.
* On CPUs (``gpu_memory_gb == 0``: tests, the demo) a micro-batch is ``cfg.micro_batch_rows`` or the
  whole per-rank batch, checkpointing is off and the ZeRO stage is 0, unless the config says otherwise.
"""

from __future__ import annotations

import math

from . import memory, recipe
from .config import TrialConfig


class Plan:
    """How a trial runs at world size ``world`` (see the module docstring)."""

    def __init__(self, cfg: TrialConfig, seq_len: int, world: int):
        self.world = world
        self.seq_len = seq_len
        self.global_rows = max(1, round(cfg.resolved_batch_tokens(seq_len) / seq_len))
        self.batch_tokens = self.global_rows * seq_len
        self.steps = recipe.total_steps(cfg.tokens_target, self.batch_tokens)
        self.eval_every = cfg.eval_every or max(1, self.steps // 5)
        self.lr_max = cfg.resolved_lr_max()
        per_rank = math.ceil(self.global_rows / world)
        fixed_stage = None if cfg.zero_stage == "auto" else int(cfg.zero_stage)
        self.gpu = cfg.gpu_memory_gb > 0
        self.dtype = cfg.precision if cfg.precision != "auto" else ("bf16" if self.gpu else "fp32")
        self.attention = memory.measured_attention(cfg.attention, self.gpu)
        self._cfg = cfg
        self._estimate = None
        if self.gpu:
            chosen = memory.choose(
                cfg.model_size, cfg.objective, seq_len, self.global_rows, cfg.gpu_memory_gb, worlds=(world,),
                zero_stage=fixed_stage, checkpointing=cfg.activation_checkpointing,
                micro_rows=cfg.micro_batch_rows, dtype=self.dtype, attention=self.attention,
                trial=cfg.name or cfg.size)
            self.micro_rows, self.accumulation = chosen.micro_rows, chosen.accumulation
            self.zero_stage, self.activation_checkpointing = chosen.zero_stage, chosen.activation_checkpointing
            self._estimate = chosen.estimate
        else:
            micro = min(cfg.micro_batch_rows or per_rank, per_rank)
            self.accumulation = math.ceil(per_rank / micro)
            self.micro_rows = math.ceil(per_rank / self.accumulation)     # balanced micro-batches
            self.zero_stage = fixed_stage or 0
            self.activation_checkpointing = bool(cfg.activation_checkpointing)

    @classmethod
    def for_gpus(cls, cfg: TrialConfig, seq_len: int, max_workers: int) -> "Plan":
        """The fastest plan on 1 … ``max_workers`` GPUs (``memory.choose``'s order); its ``world`` is the
        worker count the trial asks for. Raises ``memory.DoesNotFit`` when none fits."""
        fixed_stage = None if cfg.zero_stage == "auto" else int(cfg.zero_stage)
        dtype = cfg.precision if cfg.precision != "auto" else "bf16"
        rows = max(1, round(cfg.resolved_batch_tokens(seq_len) / seq_len))
        chosen = memory.choose(
            cfg.model_size, cfg.objective, seq_len, rows, cfg.gpu_memory_gb,
            worlds=range(1, max(1, max_workers) + 1), zero_stage=fixed_stage,
            checkpointing=cfg.activation_checkpointing, micro_rows=cfg.micro_batch_rows, dtype=dtype,
            attention=memory.measured_attention(cfg.attention, True), trial=cfg.name or cfg.size)
        return cls(cfg, seq_len, chosen.workers)

    @property
    def memory(self) -> memory.MemoryEstimate:
        """The memory estimate of one rank (computed on first use on CPUs: it costs a fake forward)."""
        if self._estimate is None:
            self._estimate = memory.estimate(
                self._cfg.model_size, self._cfg.objective, self.seq_len, self.micro_rows, world=self.world,
                zero_stage=self.zero_stage, checkpointing=self.activation_checkpointing, dtype=self.dtype,
                attention=self.attention)
        return self._estimate

    @property
    def memory_gb_per_gpu(self) -> float:
        """GB one GPU must hold (with the fixed overhead and fragmentation); on CPUs, the tensors only."""
        return self.memory.gb if self.gpu else self.memory.tensors / memory.GB

    def __repr__(self) -> str:
        return (f"Plan(world={self.world}, global_rows={self.global_rows}, micro_rows={self.micro_rows}, "
                f"accumulation={self.accumulation}, zero_stage={self.zero_stage}, "
                f"activation_checkpointing={self.activation_checkpointing}, steps={self.steps})")
