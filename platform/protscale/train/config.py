"""``TrialConfig``: the one typed config of a trial, shared by the ``protscale train`` flags (generated
from its fields by ``cli.py``), search spaces (``sweep/space.py``: per-trial overrides and the space's
``defaults`` are these fields) and the Ray Train workers (it travels to them as ``to_dict()``).

Each field's metadata says how it shows on the command line (``help``, ``flag``, ``choices``; ``cli=False``
hides it) and whether it is part of the trial's **identity** (``identity=True``): a field that changes
what the trial computes. ``trial_hash`` is a content hash of those fields (with the batch and peak LR
resolved by the paper's rule, the data manifest's hash and sequence length, the transfer parent's own
hash and the recipe's constants): a finished run is reused only when its ``trial_hash`` param matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from ..model.sizes import ModelSize, get_size, tokens_for_budget
from . import recipe

HASH_CHARS = 16           # hex characters of ``trial_hash`` (64 bits: no collision in any real sweep)


def _f(default=dataclasses.MISSING, *, help: str, identity: bool = False, cli: bool = True, **meta):
    """A field with its command-line metadata (``flag``, ``choices``, ``metavar``, ``cli_default``)."""
    kw = {} if default is dataclasses.MISSING else (
        {"default_factory": default} if callable(default) else {"default": default})
    return field(metadata={"help": help, "identity": identity, "cli": cli, **meta}, **kw)


@dataclass
class TrialConfig:
    objective: str = _f(help="training objective: causal (clm) or masked (mlm) language modelling",
                        identity=True, choices=("clm", "mlm"), metavar="{clm,mlm}")
    size: str = _f(help="model size name (tiny-1..tiny-5, 3M..10B, esm2-650M)", identity=True, metavar="SIZE")
    budget_flops: float = _f(help="compute budget C in FLOPs; the trial trains D = C / (6·N) tokens",
                             identity=True, metavar="C")
    data: str = _f(help="prepared dataset: a directory or a URI such as s3://bucket/ds (protscale data "
                   "prepare); its manifest hash and sequence length are part of the trial's identity",
                   metavar="DIR|URI")
    tracking_uri: str = _f(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)",
                           cli_default=None, metavar="URI")
    experiment: str = _f(help="MLflow experiment", cli_default="protscale", metavar="NAME")
    name: str = _f("", help="trial name: MLflow run name and Ray Train run name (default: "
                   "objective-size-budget-seed, plus the LR and batch when given)", metavar="NAME")
    run_id: str = _f("", help="MLflow run, created by the driver before training", cli=False)
    seed: int = _f(0, help="seed of the model initialisation, data order and masks", identity=True)
    batch_tokens: int = _f(0, help="tokens per optimizer step (0: the paper's rule by size)", identity=True)
    lr_max: float = _f(0.0, help="peak learning rate (0: the paper's rule by size)", identity=True, metavar="LR")
    eval_every: int = _f(0, help="steps between evaluations and checkpoints (0: about 5 per trial)",
                         metavar="STEPS")
    eval_rows: int = _f(64, help="rows of each of val/test evaluated (all of them if fewer)", identity=True,
                        metavar="ROWS")
    # Memory plan (train/plan.py). Auto fields: the planner's choice on GPUs; on CPUs the whole
    # per-worker batch in one forward, no checkpointing, ZeRO 0. Same result, other memory and speed.
    micro_batch_rows: int = _f(0, help="rows per forward pass per worker (0: the memory plan's)", metavar="ROWS")
    activation_checkpointing: bool | None = _f(
        None, help="recompute each block in backward (default: the memory plan's)")
    zero_stage: int | str = _f("auto", help="DeepSpeed ZeRO stage (auto: the memory plan's on GPUs, 0 on CPUs)",
                               choices=("auto", "0", "1", "2", "3"))
    gpu_memory_gb: float = _f(0.0, help="with --gpu: memory of one GPU the memory plan fits (40 for "
                              "A100-40GB, 141 for H200); 0 = CPU trial", flag="--gpu-memory", metavar="GB",
                              cli_default=80.0)
    precision: str = _f("auto", help="auto (bf16 on GPUs, fp32 on CPUs), bf16 or fp32", identity=True,
                        choices=("auto", "bf16", "fp32"))
    attention: str = _f("auto", help="attention kernel (auto: FlexAttention on GPUs, SDPA with the document "
                        "mask on CPUs); the same numbers either way", choices=("auto", "sdpa", "flex", "flash"))
    compile: bool = _f(False, help="torch.compile the model (pays on GPUs; benchmarks/throughput.py measures it)")
    init_from: str = _f("", help="MLflow run id of a completed CLM trial: start this (MLM) trial from its "
                        "weights (the parent's identity becomes part of this trial's)", metavar="RUN_ID",
                        identity=True)
    init_budget_flops: float = _f(0.0, help="the parent's compute budget (D_F = C_F / 6N)", cli=False)
    peak_flops: float = _f(0.0, help="peak FLOP/s of one device, for MFU (0: the known GPU table, none on CPU)",
                           metavar="FLOP/S")
    trial_hash: str = _f("", help="identity hash, filled in by the driver (``identity_hash``)", cli=False)
    checkpoint_dir: str = _f("", help="where the trial's checkpoints live (<storage>/<name>-<hash>), filled in "
                             "by ``trial.trainer``", cli=False)
    tags: dict = _f(dict, help="extra MLflow tags of the trial's run", cli=False)

    def __post_init__(self):
        if self.objective not in ("clm", "mlm"):
            raise ValueError(f"objective must be 'clm' or 'mlm', not {self.objective!r}")
        get_size(self.size)             # raises with the list of known sizes
        if isinstance(self.zero_stage, str) and self.zero_stage.isdigit():
            self.zero_stage = int(self.zero_stage)
        if self.zero_stage not in ("auto", 0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2, 3 or 'auto', not {self.zero_stage!r}")
        for name in ("budget_flops", "lr_max", "gpu_memory_gb", "peak_flops"):
            value = float(getattr(self, name))
            if not value >= 0 or value == float("inf"):     # NaN, negative or infinite
                raise ValueError(f"{name} must be a finite number >= 0, not {getattr(self, name)!r}")
        for name in ("batch_tokens", "eval_every", "eval_rows", "micro_batch_rows", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")

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

    def identity(self, manifest: dict, parent_hash: str = "") -> dict:
        """Everything that changes what this trial computes, resolved (a batch or LR left to the paper's
        rule is the value the rule gives; ``auto`` precision is what the trial will use)."""
        seq_len = int(manifest["seq_len"])
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("identity")}
        out.update(
            budget_flops=float(self.budget_flops),
            batch_tokens=max(1, round(self.resolved_batch_tokens(seq_len) / seq_len)) * seq_len,
            lr_max=float(self.resolved_lr_max()),
            precision=self.precision if self.precision != "auto" else ("bf16" if self.gpu_memory_gb else "fp32"),
            init_from=parent_hash or self.init_from,
            seq_len=seq_len, data_manifest_hash=manifest.get("hash", ""), recipe=recipe_constants())
        return out

    def identity_hash(self, manifest: dict, parent_hash: str = "") -> str:
        """``trial_hash``: sha256 of :meth:`identity` as canonical JSON, first ``HASH_CHARS`` hex digits."""
        text = json.dumps(self.identity(manifest, parent_hash), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrialConfig":
        return cls(**d)


def recipe_constants() -> dict:
    """The recipe's fixed constants (``recipe.py``, MLM masking): a code change to them changes every
    trial's identity, so no stale result is reused."""
    from .batches import MASK_RATIO

    return {"adam_betas": list(recipe.ADAM_BETAS), "adam_eps": recipe.ADAM_EPS,
            "weight_decay": recipe.WEIGHT_DECAY, "warmup_fraction": recipe.WARMUP_FRACTION,
            "final_lr_fraction": recipe.FINAL_LR_FRACTION, "grad_clip": recipe.GRAD_CLIP,
            "mask_ratio": MASK_RATIO}


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrialConfig)}


def trial_name(objective: str, size: str, budget_flops: float, seed: int = 0, lr_max: float = 0.0,
               batch_tokens: int = 0, parent: str = "") -> str:
    """A readable, unique name: objective-size-budget-seed, then the LR and batch where a trial sets
    them (an LR or batch sweep), then the transfer parent."""
    budget = f"{budget_flops:.3g}" if isinstance(budget_flops, (int, float)) else str(budget_flops)
    name = f"{objective}-{size}-{budget}-s{seed}".replace("+", "")
    if lr_max:
        name += f"-lr{lr_max:g}"
    if batch_tokens:
        name += f"-b{batch_tokens}"
    return f"{name}-from-{parent}" if parent else name
