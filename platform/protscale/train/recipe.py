"""The paper's training recipe: peak LR and batch by model size, the LR schedule, the trial length.

AdamW (β1 0.9, β2 0.95, ε 1e-8, weight decay 0.01); linear warm-up over 2.5% of the steps; cosine decay
to 0.1× peak at the trial's own last step; D = C / (6·N) tokens.
"""

from __future__ import annotations

import math

from ..model.sizes import ModelSize

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.025
FINAL_LR_FRACTION = 0.1
GRAD_CLIP = 1.0

# (upper bound on non-embedding N, peak LR), from the paper's runs (reference-logs README).
_LR_BY_SIZE = ((20e6, 1e-3), (50e6, 6e-4), (100e6, 5.5e-4), (250e6, 5e-4), (500e6, 4e-4),
               (1e9, 3.5e-4), (math.inf, 3e-4))
_TINY_LR = 5e-3            # CPU-sized models (< 2M) get off the unigram plateau sooner (measured)


def peak_lr(size: ModelSize) -> float:
    n = size.n_params_non_embedding
    if n < 3e6 and size.name.startswith(("tiny", "micro", "nano")):
        return _TINY_LR
    return next(lr for bound, lr in _LR_BY_SIZE if n < bound)


def batch_tokens(size: ModelSize, seq_len: int = 1024) -> int:
    """0.5M tokens per step below 1B parameters, 1M above (512 / 1024 sequences of 1024)."""
    rows = 1024 if size.n_params_non_embedding >= 1e9 else 512
    return rows * seq_len


def total_steps(tokens_target: int, batch_tokens_: int) -> int:
    return max(1, math.ceil(tokens_target / batch_tokens_))


def lr_at(step: int, steps: int, lr_max: float) -> float:
    """LR of optimizer step ``step`` (1-based): linear warm-up, then cosine to FINAL_LR_FRACTION·lr_max."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step <= warmup:
        return lr_max * step / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    floor = FINAL_LR_FRACTION * lr_max
    return floor + 0.5 * (lr_max - floor) * (1 + math.cos(math.pi * progress))
