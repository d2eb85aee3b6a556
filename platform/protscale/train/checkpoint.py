"""Checkpoints of a trial: DeepSpeed engine state reported through ``ray.train.report``.

Layout of one checkpoint directory (Ray merges the ranks' folders into one):

    ckpt/                 DeepSpeed's own files (model + optimizer + scheduler; ZeRO shards per rank)
    trial_state.json      step, cumulative tokens, world size and ZeRO stage it was written with
    weights.pt            consolidated model weights (final checkpoint only): CLM→MLM transfer, export

ZeRO-1/2/3 optimizer shards do not load at another world size. When an elastic restart changes the
number of workers, the engine is restored from DeepSpeed's *universal* checkpoint, converted once from
the sharded one; ZeRO-0 checkpoints (full optimizer state on rank 0) load at any world size as they are.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TAG = "ckpt"
STATE = "trial_state.json"
WEIGHTS = "weights.pt"


def save(engine, state: dict, rank: int, final: bool) -> str:
    """Every rank writes its part into a fresh local directory; returns it (report it, then delete it)."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    path = tempfile.mkdtemp(prefix="protscale-ckpt-")
    # Pure data parallelism: the universal converter needs no parameter patterns, only its version key.
    info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    engine.save_checkpoint(path, tag=TAG, client_state={"trial_state": state, UNIVERSAL_CHECKPOINT_INFO: info})
    if final:
        weights = consolidated_state_dict(engine)
        if rank == 0:
            torch.save(weights, Path(path) / WEIGHTS)
    if rank == 0:
        (Path(path) / STATE).write_text(json.dumps(state))
    return path


def read_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / STATE).read_text())


def restore(engine, path: str | os.PathLike, universal: bool, rank: int) -> dict:
    """Load engine state from a checkpoint directory; returns the trial state saved with it.

    ``universal``: the checkpoint was written at another world size with ZeRO ≥ 1; rank 0 converts it
    (once) and every rank loads the universal form (the engine was built with ``load_universal``)."""
    if universal:
        if rank == 0:
            to_universal(Path(path))
        torch.distributed.barrier()
    engine.load_checkpoint(str(path), tag=TAG + "_universal" if universal else TAG, load_module_strict=True)
    return read_state(path)


def to_universal(path: Path) -> Path:
    """Convert a sharded ZeRO checkpoint to DeepSpeed's universal format (once per directory)."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = path / (TAG + "_universal")
    if not out.exists():
        tmp = Path(tempfile.mkdtemp(prefix="protscale-universal-"))
        ds_to_universal(Namespace(input_folder=str(path / TAG), output_folder=str(tmp / out.name),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=False))
        shutil.move(str(tmp / out.name), str(out))
    return out


def consolidated_state_dict(engine) -> dict:
    """Full model weights on every rank (gathers ZeRO-3 partitions)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


MODEL_ARTIFACT = "model/" + WEIGHTS     # the final weights, as an artifact of the trial's MLflow run


def load_weights(tracking_uri: str, run_id: str) -> dict:
    """Final model weights of a finished trial, from its MLflow run (for CLM→MLM transfer)."""
    import mlflow.artifacts

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MODEL_ARTIFACT,
                                               tracking_uri=tracking_uri)
    return torch.load(path, map_location="cpu", weights_only=True)
