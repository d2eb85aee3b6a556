"""``Plan``: the batch geometry of a trial at a given world size (rows per step, micro-batch,
accumulation, steps, LR). The trial's workers build it; ``sweep --dry-run`` prints it."""

from __future__ import annotations

import math

from . import recipe
from .config import TrialConfig


class Plan:
    """Batch geometry and schedule lengths of a trial at a given world size."""

    def __init__(self, cfg: TrialConfig, seq_len: int, world: int):
        rows = max(1, round(cfg.resolved_batch_tokens(seq_len) / seq_len))
        self.global_rows = math.ceil(rows / world) * world
        per_rank = self.global_rows // world
        self.micro_rows = min(cfg.micro_batch_rows or per_rank, per_rank)
        while per_rank % self.micro_rows:
            self.micro_rows -= 1
        self.accumulation = per_rank // self.micro_rows
        self.batch_tokens = self.global_rows * seq_len
        self.steps = recipe.total_steps(cfg.tokens_target, self.batch_tokens)
        self.eval_every = cfg.eval_every or max(1, self.steps // 5)
        self.lr_max = cfg.resolved_lr_max()
