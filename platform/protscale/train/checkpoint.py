"""Checkpoints of a trial: DeepSpeed engine state reported through ``ray.train.report``.

Layout of one checkpoint directory (Ray merges the ranks' folders into one):

    ckpt/                 DeepSpeed's own files (model + optimizer + scheduler; ZeRO shards per rank)
    trial_state.json      step, cumulative tokens, and the layout it was written with: world size,
                          ZeRO stage, bf16

The final weights are not part of a checkpoint: they go from the engine straight to the run's MLflow
model (``loop.log_final_model``).

Elastic resume. What a checkpoint holds depends on the layout it was written with:

* ZeRO-0 keeps the whole optimizer state in rank 0's file — in fp32 the torch AdamW state, in bf16
  DeepSpeed's mixed-precision wrapper with full fp32 master weights on every rank. It loads as it is at
  any world size.
* ZeRO-1/2/3 partition the fp32 master weights and Adam moments across ranks; those shards load only at
  the world size that wrote them. At another world size (or another ZeRO stage ≥ 1, or precision) the
  checkpoint is first converted to DeepSpeed's *universal* form (one file per parameter and state,
  independent of the partitioning), which any layout loads.

Where checkpoints are kept. A worker group reports each checkpoint through ``ray.train.report`` and Ray
Train keeps the latest ``KEEP`` under ``<storage>/<trial>-<hash>/``. Train's local mode (a CPU
trial inside a Tune trial, ``num_workers=0``) reports to Tune, which would keep *every* checkpoint of the
trial until the sweep ends: pruning them safely would need to know which one Tune's last experiment
snapshot names. So there the trial keeps its own (:class:`TrialStore`), in the same place, the same way,
and Tune gets metrics only; a Tune trial restarted after a crash or a ``--resume`` finds it there.

With remote storage each node (or each rank) restores from its own local copy of the checkpoint, so
every rank makes sure *its* copy is converted: the conversion is idempotent, serialised by a file lock
among ranks that share a copy, and published by an atomic rename, so no rank ever waits on a
conversion it cannot see.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UserError

KEEP = 2                            # checkpoints kept per trial: the latest, and the one before
TAG = "ckpt"
UNIVERSAL = TAG + "_universal"      # the universal conversion, beside TAG in the same checkpoint copy
STATE = "trial_state.json"


class CheckpointLayoutError(UserError):
    """A checkpoint whose optimizer state cannot be carried into this trial's engine."""


class CheckpointStorageError(UserError):
    """The trial's checkpoint storage refused a write (full, read-only, gone): the trial cannot go on
    without losing what a restart would need, so it fails instead of being retried."""


def save(engine, state: dict, rank: int) -> str:
    """Every rank writes its part into a fresh local directory; returns it (report it, then delete it).

    The layout the engine trains with is recorded in ``trial_state.json`` beside ``state``, so that a
    restart decides how to restore from the checkpoint alone (:func:`needs_universal`)."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    path = tempfile.mkdtemp(prefix="protscale-ckpt-")
    state = {**state, **layout(engine)}
    # Pure data parallelism: the universal converter needs no parameter patterns, only its version key.
    info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    engine.save_checkpoint(path, tag=TAG, client_state={"trial_state": state, UNIVERSAL_CHECKPOINT_INFO: info})
    if rank == 0:
        (Path(path) / STATE).write_text(json.dumps(state))
    return path


class TrialStore:
    """A trial's checkpoints at ``root`` (a local path or a URI), for Train's local mode inside Tune.

    ``checkpoint_<step>`` directories; one is complete once both its ``trial_state.json`` and its
    ``.complete`` marker exist. The marker is written after every other file is checked in place, so a
    checkpoint cut off by a crash or a full disk is never resumed from. Only the trial itself writes and
    reads here: after a new checkpoint is complete it deletes all but the latest ``keep``, so the storage
    a trial holds is bounded by ``keep`` checkpoints however long it runs."""

    MARKER = ".complete"

    def __init__(self, root: str, keep: int = KEEP):
        from ..data.storage import locate

        self.root, self.keep = locate(root), keep

    def _complete(self) -> list[tuple[int, str]]:
        steps = []
        for name in self.root.listdir():
            if name.startswith("checkpoint_") and name[len("checkpoint_"):].isdigit() and \
                    self.root.join(name, self.MARKER).exists() and self.root.join(name, STATE).exists():
                steps.append((int(name[len("checkpoint_"):]), name))
        return sorted(steps)

    def latest(self):
        """The newest complete checkpoint as a ``ray.train.Checkpoint`` (``as_directory()`` gives a local
        copy of a remote one), or None."""
        import ray.train

        done = self._complete()
        if not done:
            return None
        where = self.root.join(done[-1][1])
        return ray.train.Checkpoint(where.path, filesystem=where.fs)

    def persist(self, local_dir: str, step: int) -> None:
        """Copy the checkpoint written to ``local_dir`` into the store as step ``step``, mark it complete,
        then delete what it supersedes (older complete ones beyond ``keep``, and unfinished ones)."""
        import pyarrow.fs as pafs

        target = self.root.join(f"checkpoint_{step:09d}")
        target.remove()                          # a leftover of a crash at this same step
        target.mkdir()
        pafs.copy_files(local_dir, target.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=target.fs)
        # The marker only after every file is there at its size: on a full disk the chaos suite once got a
        # checkpoint folder holding nothing but a marker written after the copy (a 0-byte file needs no
        # space), and every restart of the trial then failed to read its state.
        want = {str(p.relative_to(local_dir)): p.stat().st_size for p in Path(local_dir).rglob("*") if p.is_file()}
        got = {i.path[len(target.path.rstrip("/")) + 1:]: i.size
               for i in target.fs.get_file_info(pafs.FileSelector(target.path, recursive=True))
               if i.type == pafs.FileType.File}
        missing = sorted(k for k, size in want.items() if got.get(k) != size)
        if missing:
            try:                                 # nothing half-written stays (on a full disk, its space too)
                target.remove()
            except OSError:
                pass
            raise OSError(f"{len(missing)} of {len(want)} checkpoint file(s) missing or short in {target} "
                          f"after the copy (first: {missing[0]})")
        target.join(self.MARKER).write_bytes(b"")
        done = self._complete()
        keep = {name for _, name in done[-self.keep:]}
        for name in self.root.listdir():
            if name.startswith("checkpoint_") and name not in keep:
                self.root.join(name).remove()


def discard(root: str) -> None:
    """Delete the checkpoints under a trial's ``root`` (Train's ``checkpoint_*`` folders, or a
    :class:`TrialStore`'s), leaving whatever else is there."""
    from ..data.storage import locate

    where = locate(root)
    for name in where.listdir():
        if name.startswith("checkpoint_"):
            where.join(name).remove()


def layout(engine) -> dict:
    """How the engine partitions its state: what decides whether a checkpoint loads as it is."""
    return {"world_size": engine.dp_world_size, "zero_stage": engine.zero_optimization_stage(),
            "bf16": engine.bfloat16_enabled()}


def read_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / STATE).read_text())


def needs_universal(saved: dict, world: int, zero_stage: int, bf16: bool) -> bool:
    """Whether a checkpoint written with layout ``saved`` (its ``trial_state.json``) must go through the
    universal form to load into an engine of ``world`` ranks, ``zero_stage`` and ``bf16``.

    Checkpoints written before the stage and precision were recorded are taken to match the engine.
    Raises :class:`CheckpointLayoutError` where no DeepSpeed loader carries the optimizer state across:
    between ZeRO-0 and ZeRO ≥ 1, between ZeRO-1/2 and ZeRO-3 (their universal forms differ), and a
    change of precision at ZeRO-0."""
    was_stage, was_bf16 = saved.get("zero_stage", zero_stage), saved.get("bf16", bf16)
    family = lambda stage: min(stage, 1) + (stage == 3)       # noqa: E731  0 | 1-2 | 3
    if family(was_stage) != family(zero_stage) or (zero_stage == 0 and was_bf16 != bf16):
        raise CheckpointLayoutError(
            f"the checkpoint was written with {_describe(was_stage, was_bf16)} and this trial runs "
            f"{_describe(zero_stage, bf16)}: resume it with zero_stage={was_stage} and precision="
            f"{'bf16' if was_bf16 else 'fp32'}, or start the trial over under a new name")
    if zero_stage == 0:
        return False                  # the whole optimizer state is in rank 0's file: any world size
    return saved["world_size"] != world or was_stage != zero_stage or was_bf16 != bf16


def restore(engine, path: str | os.PathLike) -> dict:
    """Load engine state from (a local copy of) a checkpoint; returns the trial state saved with it.

    Decides from the checkpoint's recorded layout and the engine's own whether the sharded or the
    universal form loads, converts this copy if needed, and loads. No collective beyond DeepSpeed's own
    loading: every rank calls it with whatever copy it sees."""
    path = Path(path)
    state = read_state(path)
    try:
        universal = needs_universal(state, engine.dp_world_size, engine.zero_optimization_stage(),
                                    engine.bfloat16_enabled())
    except CheckpointLayoutError as e:
        raise CheckpointLayoutError(f"checkpoint {path} (step {state.get('step')}): {e}") from None
    # DeepSpeed reads this flag only when loading, so the engine need not be built knowing it.
    engine._config.load_universal_checkpoint = universal
    if universal:
        with _universal_copy(path) as (root, tag):
            engine.load_checkpoint(str(root), tag=tag, load_module_strict=True)
        _unshare_adam_steps(engine)
    else:
        engine.load_checkpoint(str(path), tag=TAG, load_module_strict=True)
    return state


def _unshare_adam_steps(engine) -> None:
    """DeepSpeed's universal loader for ZeRO-3 (0.19.8) gives every parameter group one shared ``step``
    tensor, which AdamW then advances once per group per step: the bias correction would run ahead of
    the schedule after a resize. Give each group its own copy."""
    adam = getattr(engine.optimizer, "optimizer", None)
    for state in getattr(adam, "state", {}).values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def to_universal(path: str | os.PathLike, out: Path | None = None) -> bool:
    """Convert the sharded checkpoint in ``path`` to the universal form at ``out`` (default
    ``path/ckpt_universal``) unless it is there already; returns whether this call converted it.

    Safe when several processes convert the same copy at once: a lock file serialises them (the others
    then find the result), and the result appears only by an atomic rename of a finished conversion,
    so a reader never sees a half-written one even where locks do not hold (some network filesystems)."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    path = Path(path)
    out = out or path / UNIVERSAL
    if out.is_dir():
        return False
    with _locked(out.parent / f".{out.name}.lock"):
        if out.is_dir():
            return False
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            with contextlib.redirect_stdout(None):      # the converter prints a progress line per stage
                ds_to_universal(Namespace(input_folder=str(path / TAG), output_folder=str(tmp / out.name),
                                          num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                          strict=True, inject_missing_state=False))
            try:
                os.rename(tmp / out.name, out)
            except OSError:
                if not out.is_dir():                    # lost a race where the lock did not hold: fine
                    raise
                return False
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _universal_copy(path: Path):
    """(load_dir, tag) of the universal form of the checkpoint copy at ``path``: converted in place
    when the copy is writable, else into a private temporary directory removed afterwards."""
    if os.access(path, os.W_OK):
        to_universal(path)
        yield path, UNIVERSAL
        return
    side = Path(tempfile.mkdtemp(prefix="protscale-universal-"))
    try:
        to_universal(path, side / UNIVERSAL)
        yield side, UNIVERSAL
    finally:
        shutil.rmtree(side, ignore_errors=True)


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _describe(zero_stage: int, bf16: bool) -> str:
    return f"ZeRO-{zero_stage} {'bf16' if bf16 else 'fp32'}"


def consolidated_state_dict(engine, rank: int = 0) -> dict:
    """The full model weights, in the dtype the model trains in (bf16 on GPUs), on the CPU of ``rank``
    0; other ranks get {}. Every rank must call it: under ZeRO-3 it gathers the partitions (a
    collective). One copy on one host: 21 GB for the paper's 10.7B model in bf16."""
    if engine.zero_optimization_stage() == 3:
        weights = engine._zero3_consolidated_16bit_state_dict()      # gathered on rank 0 only
        return weights if rank == 0 else {}
    if rank != 0:
        return {}
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def load_weights(tracking_uri: str, run_id: str) -> dict:
    """Final model weights of a finished trial, from the MLflow model of its run (for CLM→MLM transfer;
    ``tracking/models.py`` logs it when the trial finishes)."""
    from ..tracking.models import load_model

    return load_model(tracking_uri, run_id).state_dict()
