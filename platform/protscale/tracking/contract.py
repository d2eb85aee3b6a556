"""Names shared by training, the importers and the analyzer. One name per concept, everywhere.

An MLflow experiment holds one sweep: a parent run per sweep and a child run per trial
(``mlflow.parentRunId`` tag). Metrics are logged with ``step`` = optimizer step (1-based).
"""

from __future__ import annotations

import os
from pathlib import Path

# --- params of a trial run -------------------------------------------------------------------
OBJECTIVE = "objective"                    # "clm" | "mlm"
SIZE = "size"                              # size label from the grid, e.g. "85M" or "tiny-2"
LAYERS = "layers"
D_MODEL = "d_model"
HEADS = "heads"
N_PARAMS = "n_params"                      # all trainable parameters, embeddings included
N_PARAMS_NON_EMBEDDING = "n_params_non_embedding"   # 12·L·d² (Kaplan convention: block matrices)
BUDGET_FLOPS = "budget_flops"              # C: the trial's compute budget
TOKENS_TARGET = "tokens_target"            # D = C / (6·N)
LR_MAX = "lr_max"
BATCH_TOKENS = "batch_tokens"              # tokens per optimizer step (all workers)
SEQ_LEN = "seq_len"
MASK_RATIO = "mask_ratio"                  # 0 for CLM
SEED = "seed"
DATA_MANIFEST_HASH = "data_manifest_hash"
INIT_FROM = "init_from"                    # run id of the CLM trial a transfer MLM starts from ("" if none)
FLOPS_CONVENTION = "flops_convention"      # how the "flops" metric was counted (see model.sizes)
INIT_OBJECTIVE = "init_objective"          # transfer trials: objective of the run they start from
INIT_BUDGET_FLOPS = "init_budget_flops"    # transfer trials: compute budget of that run (D_F = C_F / 6N)
TRIAL_HASH = "trial_hash"                  # identity: hash of every setting that changes the result
                                           # (train/config.py, TrialConfig.identity); resume and
                                           # skip-if-done reuse a run only when it matches

TRIAL_PARAMS = (
    OBJECTIVE, SIZE, LAYERS, D_MODEL, HEADS, N_PARAMS, N_PARAMS_NON_EMBEDDING, BUDGET_FLOPS,
    TOKENS_TARGET, LR_MAX, BATCH_TOKENS, SEQ_LEN, MASK_RATIO, SEED, DATA_MANIFEST_HASH, INIT_FROM,
    FLOPS_CONVENTION, TRIAL_HASH,
)

# --- metrics, by optimizer step -----------------------------------------------------------------
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"              # IID validation (random held-out sequences)
TEST_LOSS = "test_loss"            # OOD test (separate source or held-out identity clusters)
TOKENS = "tokens"                  # cumulative training tokens (unpadded)
FLOPS = "flops"                    # cumulative training FLOPs, 6·N·tokens (non-embedding N)
TOKENS_PER_S = "tokens_per_s"
MFU = "mfu"
LR = "lr"                          # the learning rate the optimizer applied at this step
WORLD_SIZE = "world_size"          # workers (data-parallel ranks) that ran this step: changes on an elastic resize

TRIAL_METRICS = (TRAIN_LOSS, VAL_LOSS, TEST_LOSS, TOKENS, FLOPS, TOKENS_PER_S, MFU, LR, WORLD_SIZE)

# --- tags -----------------------------------------------------------------------------------------
SWEEP = "sweep"
STATUS = "status"                  # see STATUSES
SOURCE = "source"                  # "trained" | "imported"
TRIAL = "trial"                    # deterministic trial name within the sweep
KIND = "kind"                      # "trial" | "sweep" | "analysis"
PARENT_RUN_ID = "mlflow.parentRunId"
BUDGET_SOURCE = "budget_source"    # importer: where budget_flops came from: name | tokens_target | curve_end
DEFECTS = "defects"                # comma-separated data defects found by an importer ("" = none)
SUPERSEDED_BY = "superseded_by"    # on an older run of a trial name: the run of the trial's current identity
FAILURE_REASON = "failure_reason"  # on a failed trial: why, in one line (the error that ended it)

STATUS_RUNNING, STATUS_COMPLETED, STATUS_DIVERGED, STATUS_FAILED = "running", "completed", "diverged", "failed"
STATUSES = (STATUS_RUNNING, STATUS_COMPLETED, STATUS_DIVERGED, STATUS_FAILED)
SOURCE_TRAINED, SOURCE_IMPORTED = "trained", "imported"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or an absolute SQLite file in the current directory.

    Absolute, because Ray workers run in their own directories (a relative ``sqlite:///mlflow.db``
    would open a different file in every worker).
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or resolve_tracking_uri("mlflow.db")


def resolve_tracking_uri(uri: str) -> str:
    """Make SQLite URIs and bare file paths absolute; leave server URIs alone."""
    if "://" not in uri:
        return f"sqlite:///{Path(uri).resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri
