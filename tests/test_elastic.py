"""Elastic resume at the engine level: a checkpoint written by W ranks resumes on W' ≠ W ranks with the
recipe intact — weights bit-identical, fp32 master weights and Adam moments equal to the saved ones
(consolidated), step and LR schedule unchanged, training continuing like the run that was not resized.

Real DeepSpeed engines (``train/engine.py::build_engine``) on CPU ranks over gloo, run as
``torch.multiprocessing`` processes; real proteins from the bundled UniProt sample. Three process
groups run one after the other, each over every case (a process start with DeepSpeed costs seconds):

    A  world 2: train steps 1-2, checkpoint, then step 3-4 (the non-resized continuation)
    B  world 1: restore A's checkpoints (2 → 1), steps 3-4; checkpoint ZeRO-3 after step 4; restore
       A's ZeRO-1 checkpoint into a ZeRO-2 engine (a resize may change the plan's stage)
    C  world 2: each rank restores B's checkpoint from its *own* copy (1 → 2, as with remote storage
       on two nodes); then both ranks convert one shared copy at once (two ranks on one node)
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from protscale.data import MAIN
from protscale.train import checkpoint

pytestmark = pytest.mark.slow

SEQ, ROWS, MICRO = 32, 4, 2           # a global batch of 4 protein rows, 2 rows per forward pass
CASES = [(0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (0, "fp32")]   # fp32 ZeRO-0: plain AdamW
RESAVED = [(3, "bf16")]              # written again at world 1, restored at world 2 from separate copies


def _name(stage, precision):
    return f"z{stage}-{precision}"


# --- what runs in each rank --------------------------------------------------------------------------

def _rank(rank, world, port, job, batches, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    root = Path(root)
    for stage, precision in CASES:
        name = _name(stage, precision)
        if job == "save":
            engine = _engine(stage, precision, world)
            _steps(engine, batches, rank, world, (1, 2))
            _save(engine, rank, root / "A" / name)
            _record(engine, rank, root / "A" / f"{name}-saved.pt")
            _record(engine, rank, root / "A" / f"{name}-cont.pt", losses=_steps(engine, batches, rank, world, (3, 4)))
        elif job == "shrink":
            engine = _engine(stage, precision, world)
            state = checkpoint.restore(engine, root / "A" / name)
            _record(engine, rank, root / "B" / f"{name}-restored.pt", trial_state=state)
            losses = _steps(engine, batches, rank, world, (3, 4))
            _record(engine, rank, root / "B" / f"{name}-cont.pt", losses=losses)
            if (stage, precision) in RESAVED:
                _save(engine, rank, root / "B" / name)
                _record(engine, rank, root / "B" / f"{name}-saved.pt")
        elif job == "grow" and (stage, precision) in RESAVED:
            engine = _engine(stage, precision, world)
            copy = root / "C" / f"{name}-copy{rank}"           # this rank's own local copy
            state = checkpoint.restore(engine, copy)
            torch.distributed.barrier()
            converted = [(root / "C" / f"{name}-copy{r}" / checkpoint.UNIVERSAL).is_dir() for r in range(world)]
            _record(engine, rank, root / "C" / f"{name}-restored.pt", trial_state=state, converted=converted)
    if job == "shrink":                                       # ... and at another ZeRO stage (1 → 2)
        engine = _engine(2, "bf16", world)
        state = checkpoint.restore(engine, root / "A" / _name(1, "bf16"))
        _record(engine, rank, root / "B" / "z1-to-z2-restored.pt", trial_state=state)
    if job == "grow":                                         # two ranks, one copy, converting at once
        shared = root / "C" / "shared"
        torch.distributed.barrier()
        converted = torch.tensor([int(checkpoint.to_universal(shared))])
        torch.distributed.all_reduce(converted)
        if rank == 0:
            (root / "C" / "shared-conversions").write_text(str(int(converted)))
    torch.distributed.destroy_process_group()


def _engine(stage, precision, world):
    from protscale.train.config import TrialConfig
    from protscale.train.engine import build_engine
    from protscale.train.plan import Plan

    cfg = TrialConfig(objective="clm", size="tiny-1", budget_flops=6 * 24576 * ROWS * SEQ * 20, data="",
                      tracking_uri="", experiment="elastic", batch_tokens=ROWS * SEQ, micro_batch_rows=MICRO,
                      lr_max=3e-3, zero_stage=stage, precision=precision, attention="sdpa")
    plan = Plan(cfg, SEQ, world)
    assert (plan.global_rows, plan.micro_rows) == (ROWS, MICRO)
    torch.manual_seed(0)
    return build_engine(cfg, plan, torch.device("cpu"), False)


def _steps(engine, batches, rank, world, steps):
    """Optimizer steps; micro-batch k of a step is the same rows at any world size (rank r takes
    micro-batches r, r + world, ...), so a resized run computes the same gradient. Returns the global
    mean loss of each step."""
    losses = []
    for step in steps:
        micro = batches[step - 1]
        total = torch.zeros(1, dtype=torch.float64)
        for k in range(rank, len(micro), world):
            loss = engine(**micro[k])
            engine.backward(loss)
            engine.step()
            total += loss.detach().double()
        torch.distributed.all_reduce(total)
        losses.append(float(total) / len(micro))
    return losses


def _save(engine, rank, dest):
    """``checkpoint.save`` by every rank, then the rank folders merged into one, as Ray does."""
    path = checkpoint.save(engine, {"step": int(engine.global_steps), "tokens": 0}, rank)
    torch.distributed.barrier()
    for r in range(torch.distributed.get_world_size()):
        if r == rank:
            shutil.copytree(path, dest, dirs_exist_ok=True)
        torch.distributed.barrier()
    shutil.rmtree(path)


def _record(engine, rank, dest, **extra):
    full = _full_state(engine)                 # collective under ZeRO-3: every rank gathers
    if rank == 0:
        torch.save({"state": full, "lr": engine.get_lr(), "global_steps": int(engine.global_steps),
                    "scheduler": engine.lr_scheduler.last_epoch, "adam_steps": _adam_steps(engine), **extra}, dest)


def _adam_steps(engine) -> list[float]:
    """AdamW's own step counts (its bias correction), over every state it keeps."""
    adam = getattr(engine.optimizer, "optimizer", engine.optimizer)    # DeepSpeed's wrapper, or AdamW itself
    return sorted({float(s["step"]) for s in adam.state.values() if "step" in s})


def _full_state(engine) -> dict:
    """Consolidated state by parameter name: model weight, fp32 master, Adam moments and step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights = checkpoint.consolidated_state_dict(engine) or {}     # ZeRO-3 gathers to rank 0 only
    named = list(engine.module.named_parameters())
    out = {}
    if engine.zero_optimization_stage() > 0:
        opt = engine.optimizer
        if engine.zero_optimization_stage() < 3:
            # DeepSpeed links each parameter to its Adam state lazily, at the first step, and misses
            # every param group but the first (decay / no-decay here): link them all before reading.
            from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

            for lp, hp in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
                lazy_init_hp_params_optimizer_state(lp, hp, opt.optimizer.state)
        for name, p in named:
            out[name] = {"weight": weights.get(name), "fp32": safe_get_full_fp32_param(p).cpu(),
                         **{k: safe_get_full_optimizer_state(p, k).cpu() for k in ("exp_avg", "exp_avg_sq")}}
    elif engine.bfloat16_enabled():              # bf16 ZeRO-0: full fp32 master copies on every rank
        opt = engine.optimizer
        for group, masters in zip(opt.fp16_groups, opt.fp32_groups):
            for p, master in zip(group, masters):
                name = next(n for n, q in named if q is p)
                adam = opt.optimizer.state[master]
                out[name] = {"weight": weights.get(name), "fp32": master.detach().clone(),
                             "exp_avg": adam["exp_avg"].clone(), "exp_avg_sq": adam["exp_avg_sq"].clone()}
    else:                                        # fp32 ZeRO-0: the torch AdamW itself
        for name, p in named:
            adam = engine.optimizer.state[p]
            out[name] = {"weight": weights.get(name), "fp32": p.detach().clone(),
                         "exp_avg": adam["exp_avg"].clone(), "exp_avg_sq": adam["exp_avg_sq"].clone()}
    return out


# --- the parent: data, process groups, assertions -----------------------------------------------------

def _protein_batches(steps=4):
    """``steps`` global batches of real proteins, one protein (cut to SEQ tokens) per row, as lists of
    micro-batches ready for the model (CLM: next-token labels)."""
    from protscale.data.tokenizer import encode

    seqs, cur = [], []
    with gzip.open(MAIN, "rt") as f:
        for line in f:
            if line.startswith(">"):
                if len("".join(cur)) >= SEQ - 2:
                    seqs.append("".join(cur))
                cur = []
                if len(seqs) == steps * ROWS:
                    break
            else:
                cur.append(line.strip())
    tokens = torch.stack([torch.from_numpy(encode(s[:SEQ - 2]).astype("int64")) for s in seqs])
    assert tokens.shape == (steps * ROWS, SEQ)
    labels = torch.cat([tokens[:, 1:], torch.full((len(tokens), 1), -100)], dim=1)
    batch = lambda rows: {"tokens": tokens[rows], "labels": labels[rows], "doc_ids": torch.zeros_like(tokens[rows]),  # noqa: E731
                          "pos_ids": torch.arange(SEQ).expand(len(rows), SEQ).contiguous()}
    return [[batch(torch.arange(s * ROWS, (s + 1) * ROWS)[k::ROWS // MICRO]) for k in range(ROWS // MICRO)]
            for s in range(steps)]


def _spawn(world, job, batches, root):
    """``world`` ranks forked from a fork server that has imported DeepSpeed once (seconds per rank
    saved). Not forked from pytest itself: by now it may hold a Ray driver's threads, which a fork
    would copy mid-flight."""
    import multiprocessing.forkserver

    multiprocessing.forkserver.set_forkserver_preload(["deepspeed", "protscale.train.engine"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_rank, args=(world, port, job, batches, str(root)), nprocs=world,
                                          start_method="forkserver")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    for d in "ABC":
        (root / d).mkdir()
    batches = _protein_batches()
    _spawn(2, "save", batches, root)
    _spawn(1, "shrink", batches, root)
    for stage, precision in RESAVED:                           # one local copy per rank, as on two nodes
        name = _name(stage, precision)
        for r in range(2):
            shutil.copytree(root / "B" / name, root / "C" / f"{name}-copy{r}")
    shutil.copytree(root / "A" / _name(1, "bf16"), root / "C" / "shared",
                    ignore=shutil.ignore_patterns(checkpoint.UNIVERSAL + "*", ".*"))   # as first written
    _spawn(2, "grow", batches, root)
    return root


def _load(path):
    return torch.load(path, weights_only=False)


def _assert_same_state(saved, restored):
    assert saved["state"].keys() == restored["state"].keys()
    for name, s in saved["state"].items():
        r = restored["state"][name]
        assert torch.equal(s["weight"], r["weight"]), f"{name}: weights differ from the saved ones"
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[key], r[key]), f"{name}: optimizer {key} differs from the saved one"
    assert restored["global_steps"] == saved["global_steps"]
    assert restored["scheduler"] == saved["scheduler"]            # LR schedule position
    assert restored["lr"] == saved["lr"]
    assert restored["adam_steps"] == saved["adam_steps"]        # its bias correction


@pytest.mark.parametrize("stage,precision", CASES)
def test_two_ranks_resume_on_one_with_the_recipe_intact(runs, stage, precision):
    name = _name(stage, precision)
    saved, restored = _load(runs / "A" / f"{name}-saved.pt"), _load(runs / "B" / f"{name}-restored.pt")
    layout = json.loads((runs / "A" / name / checkpoint.STATE).read_text())
    assert layout == {"step": 2, "tokens": 0, "world_size": 2, "zero_stage": stage, "bf16": precision == "bf16"}
    assert restored["trial_state"]["step"] == 2
    _assert_same_state(saved, restored)
    # Sharded optimizer state went through the universal form; ZeRO-0 loaded as it was.
    assert (runs / "A" / name / checkpoint.UNIVERSAL).is_dir() == (stage > 0)

    # Training continues like the run that was not resized: same batches, same gradient, same update.
    resized, kept = _load(runs / "B" / f"{name}-cont.pt"), _load(runs / "A" / f"{name}-cont.pt")
    assert resized["adam_steps"] == kept["adam_steps"]           # bias correction stays on schedule
    resized, kept = resized["losses"], kept["losses"]
    assert all(math.isfinite(x) for x in resized)
    assert resized[0] == pytest.approx(kept[0], abs=1e-5)        # step 3 sees the restored weights
    assert resized[1] == pytest.approx(kept[1], abs=2e-3)        # step 4 sees the restored optimizer's update


def test_two_ranks_at_zero1_resume_on_one_at_zero2(runs):
    """A resize may change the memory plan's ZeRO stage; within ZeRO-1/2 the universal form carries it."""
    saved, restored = _load(runs / "A" / "z1-bf16-saved.pt"), _load(runs / "B" / "z1-to-z2-restored.pt")
    assert restored["trial_state"]["zero_stage"] == 1
    _assert_same_state(saved, restored)


@pytest.mark.parametrize("stage,precision", RESAVED)
def test_one_rank_resumes_on_two_each_from_its_own_copy(runs, stage, precision):
    name = _name(stage, precision)
    saved, restored = _load(runs / "B" / f"{name}-saved.pt"), _load(runs / "C" / f"{name}-restored.pt")
    assert restored["trial_state"]["step"] == 4 and restored["trial_state"]["world_size"] == 1
    _assert_same_state(saved, restored)
    assert restored["converted"] == [True, True]                 # every copy converted, by its own rank


def test_ranks_sharing_one_copy_convert_it_once(runs):
    assert (runs / "C" / "shared-conversions").read_text() == "1"
    assert (runs / "C" / "shared" / checkpoint.UNIVERSAL).is_dir()
    assert not [p for p in (runs / "C" / "shared").iterdir() if p.name.startswith(f".{checkpoint.UNIVERSAL}-")]


def test_layout_changes_without_a_loader_are_refused_in_one_line():
    saved = {"step": 7, "world_size": 2, "zero_stage": 0, "bf16": True}
    with pytest.raises(checkpoint.CheckpointLayoutError, match="ZeRO-0 bf16 .* ZeRO-2 bf16"):
        checkpoint.needs_universal(saved, 2, 2, True)
    assert not checkpoint.needs_universal(saved, 4, 0, True)              # ZeRO-0: any world size
    assert checkpoint.needs_universal({**saved, "zero_stage": 1}, 4, 1, True)
    assert checkpoint.needs_universal({**saved, "zero_stage": 1}, 2, 2, True)   # another stage, 1-2
    with pytest.raises(checkpoint.CheckpointLayoutError, match="zero_stage=2 and precision=fp32"):
        checkpoint.needs_universal({**saved, "zero_stage": 2, "bf16": False}, 2, 3, False)
    assert not checkpoint.needs_universal({**saved, "zero_stage": 2}, 2, 2, True)
    assert checkpoint.needs_universal({"step": 7, "world_size": 2}, 1, 2, False)  # written before the layout was recorded
