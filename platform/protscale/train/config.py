"""``TrialConfig``: the one small config object that flows from the CLI / sweep to every worker."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..model.sizes import ModelSize, get_size, tokens_for_budget
from . import recipe


@dataclass
class TrialConfig:
    objective: str                      # "clm" | "mlm"
    size: str                           # a name from protscale.model.sizes.SIZES
    budget_flops: float                 # C; the trial trains D = C / (6·N) tokens
    data: str                           # prepared dataset directory (protscale data prepare)
    tracking_uri: str
    experiment: str
    name: str = ""                      # trial name: MLflow run name and Ray Train run name
    run_id: str = ""                    # MLflow run, created by the driver before training
    seed: int = 0
    batch_tokens: int = 0               # tokens per optimizer step; 0 = the paper's rule by size
    lr_max: float = 0.0                 # 0 = the paper's rule by size
    eval_every: int = 0                 # steps between evaluations + checkpoints; 0 = about 5 per trial
    eval_rows: int = 64                 # rows of each of val/test evaluated (all of them if fewer)
    # Memory plan (train/plan.py). Auto fields: the planner's choice on GPUs; on CPUs the whole
    # per-worker batch in one forward, no checkpointing, ZeRO 0.
    micro_batch_rows: int = 0           # rows per forward pass per worker; 0 = auto
    activation_checkpointing: bool | None = None   # recompute each block in backward; None = auto
    zero_stage: int | str = "auto"      # 0-3 or "auto"
    gpu_memory_gb: float = 0.0          # memory of one GPU the plan fits (80 on H100); 0 = CPU trial, no plan
    precision: str = "auto"             # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32"
    attention: str = "auto"             # "auto" (flex on CUDA, sdpa on CPU) | "sdpa" | "flex" | "flash"
    compile: bool = False               # torch.compile the model (GPU; benchmarks/throughput.py measures it)
    init_from: str = ""                 # MLflow run id of a finished CLM trial (CLM→MLM transfer)
    init_budget_flops: float = 0.0      # ... its compute budget (D_F = C_F / 6N for transfer laws)
    peak_flops: float = 0.0             # per device, for MFU; 0 = known GPU table, none on CPU
    fail_at_step: int = 0               # fault injection: the worker dies once at this step (tests)
    fail_marker: str = ""               # file whose existence means the fault was already injected
    tags: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.objective not in ("clm", "mlm"):
            raise ValueError(f"objective must be 'clm' or 'mlm', not {self.objective!r}")
        get_size(self.size)             # raises with the list of known sizes
        if self.zero_stage not in ("auto", 0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2, 3 or 'auto', not {self.zero_stage!r}")

    # --- derived ------------------------------------------------------------------------------------
    @property
    def model_size(self) -> ModelSize:
        return get_size(self.size)

    @property
    def tokens_target(self) -> int:
        return tokens_for_budget(self.model_size, self.budget_flops)

    def resolved_batch_tokens(self, seq_len: int) -> int:
        return self.batch_tokens or recipe.batch_tokens(self.model_size, seq_len)

    def resolved_lr_max(self) -> float:
        return self.lr_max or recipe.peak_lr(self.model_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrialConfig":
        return cls(**d)
