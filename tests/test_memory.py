"""The memory plan: the estimate against the measured peak of real CPU training steps, the planner's
choices on the paper's grid, and the global batch at any world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protscale.model.sizes import ModelSize, get_size
from protscale.train import memory
from protscale.train.config import TrialConfig
from protscale.train.plan import Plan

REPO = Path(__file__).resolve().parents[1]

# A plain torch AdamW step on CPU in fp32, measured as the rise of peak RSS (VmHWM, reset through
# /proc/self/clear_refs) in a fresh process. glibc is told to mmap every allocation above 64 KiB so that
# freed tensors leave the RSS at once (otherwise its heap keeps them and the peak is meaningless). A
# first step on one row creates AdamW's states, so the measured step runs with them, as in a trial.
_PEAK = r"""
import gc, json, sys
import torch
from protscale.model.transformer import ModelConfig, ProteinLM

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

def batch(rows, seq_len):
    tokens = torch.randint(4, 24, (rows, seq_len))
    doc_ids = (torch.arange(seq_len) // (seq_len // 4)).repeat(rows, 1)      # 4 proteins a row
    return tokens, torch.arange(seq_len).repeat(rows, 1), doc_ids, tokens.clone()

def step(model, opt, b):
    model(*b).backward(); opt.step(); opt.zero_grad(set_to_none=True)

def peak(layers, d_model, heads, rows, seq_len, ckpt):
    gc.collect()
    main, first = batch(rows, seq_len), batch(1, seq_len)
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS:")
    model = ProteinLM(ModelConfig(layers, d_model, heads, causal=True, attention="sdpa",
                                  activation_checkpointing=ckpt))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    step(model, opt, first)
    step(model, opt, main)
    return status("VmHWM:") - base

torch.manual_seed(0)
for ckpt in (False, True):     # thread pools and the code of both paths paged in: not measured
    warm = ProteinLM(ModelConfig(1, 32, 2, causal=True, attention="sdpa", activation_checkpointing=ckpt))
    step(warm, torch.optim.AdamW(warm.parameters(), foreach=False), batch(2, 32))
    del warm
print(json.dumps([peak(*shape) for shape in json.loads(sys.argv[1])]))
"""

SHAPES = [  # (layers, d_model, heads, rows, seq_len): two sizes, each with and without checkpointing
    (3, 256, 4, 4, 256),
    (2, 384, 6, 2, 512),
]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_estimate_matches_the_measured_peak_of_cpu_training_steps():
    runs = [(*shape, ckpt) for shape in SHAPES for ckpt in (False, True)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(runs)], env=env, capture_output=True,
                         text=True, timeout=600, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    table = []
    for (layers, d, heads, rows, seq_len, ckpt), peak in zip(runs, measured):
        est = memory.estimate(ModelSize("t", layers, d, heads), "clm", seq_len, rows, checkpointing=ckpt,
                              dtype="fp32", attention="sdpa").tensors
        table.append(f"L={layers} d={d} rows={rows}x{seq_len} ckpt={ckpt}: estimate {est / 2**20:.1f} MiB, "
                     f"measured {peak / 2**20:.1f} MiB ({est / peak - 1:+.1%})")
        assert abs(est / peak - 1) <= 0.15, "\n".join(table)
    print("\n".join(table))
    # Checkpointing must show up in the measurement, not only in the estimate.
    assert measured[1] < 0.8 * measured[0] and measured[3] < 0.8 * measured[2]


def test_activation_term_is_measured_from_the_model_and_scales_with_it():
    small = memory.activation_profile(256, 4, 256, True, "sdpa", "fp32")
    wide = memory.activation_profile(512, 8, 256, True, "sdpa", "fp32")
    bf16 = memory.activation_profile(256, 4, 256, True, "sdpa", "bf16")
    assert small.block_input == 256 * 256 * 4                 # one (S, d) fp32 hidden state per row
    assert 1.9 < wide.per_layer / small.per_layer < 2.1       # linear in d at fixed head size and S
    assert 0.45 < bf16.per_layer / small.per_layer < 0.6      # half the bytes (the loss stays fp32)
    # FlexAttention keeps no dense mask: less than SDPA's per-layer (S, S) mask copy.
    assert memory.activation_profile(256, 4, 256, True, "flex", "bf16").per_layer < bf16.per_layer
    # The width scaling read off two small measurements equals a direct measurement at the real width.
    for d, heads, attention in ((768, 12, "flex"), (1088, 17, "sdpa")):
        assert memory.activation_profile(d, heads, 1024, True, attention) == \
            memory.measure_activations(d, heads, 1024, True, attention)


def _cfg(size="85M", **kw):
    return TrialConfig(objective=kw.pop("objective", "clm"), size=size, budget_flops=1e19, data="unused",
                       tracking_uri="", experiment="x", **kw)


def test_planner_picks_the_fastest_plan_that_fits_and_respects_fixed_fields():
    p80 = Plan(_cfg(gpu_memory_gb=80), 1024, 1)
    assert (p80.global_rows, p80.zero_stage, p80.activation_checkpointing) == (512, 0, False)
    assert 1 < p80.accumulation < 512 and p80.micro_rows * p80.accumulation >= 512
    assert p80.memory_gb_per_gpu <= 0.9 * 80
    # One accumulation step fewer would not fit: the largest micro-batch was chosen.
    fewer = -(-512 // (p80.accumulation - 1))
    assert not memory.fits(memory.estimate(get_size("85M"), "clm", 1024, fewer, attention=p80.attention), 80)
    p40 = Plan(_cfg(gpu_memory_gb=40), 1024, 1)
    assert p40.micro_rows < p80.micro_rows and p40.memory_gb_per_gpu <= 0.9 * 40
    fixed = Plan(_cfg(gpu_memory_gb=80, micro_batch_rows=16, activation_checkpointing=True, zero_stage=2), 1024, 2)
    assert (fixed.micro_rows, fixed.accumulation, fixed.activation_checkpointing, fixed.zero_stage) == (16, 16, True, 2)
    # CPU trials (no GPU memory given) keep the config's behaviour: the whole per-rank batch, ZeRO 0.
    cpu = Plan(_cfg("tiny-3", batch_tokens=16 * 128), 128, 2)
    assert (cpu.micro_rows, cpu.accumulation, cpu.zero_stage, cpu.activation_checkpointing) == (8, 1, 0, False)


def test_large_models_get_more_gpus_and_zero_and_the_order_is_stable():
    plan = Plan.for_gpus(_cfg("10B", gpu_memory_gb=80), 1024, 8)
    assert plan.world > 1 and plan.zero_stage >= 1 and plan.memory_gb_per_gpu <= 72
    again = Plan(_cfg("10B", gpu_memory_gb=80), 1024, plan.world)        # what each worker builds
    assert (again.micro_rows, again.accumulation, again.zero_stage, again.activation_checkpointing) == (
        plan.micro_rows, plan.accumulation, plan.zero_stage, plan.activation_checkpointing)


def test_a_trial_that_cannot_fit_names_itself_and_what_to_change():
    with pytest.raises(memory.DoesNotFit) as err:
        Plan.for_gpus(_cfg("10B", gpu_memory_gb=16, name="clm-10B-big"), 1024, 1)
    message = str(err.value)
    assert message.startswith("trial clm-10B-big: does not fit a 16 GB GPU")
    assert "--gpu-memory" in message and "max_workers" in message and "\n" not in message


@pytest.mark.parametrize("size,gpu,worlds", [("tiny-3", 0, (1, 2, 3, 4)), ("85M", 80, (1, 2, 3, 4)),
                                              ("3.4B", 80, (1, 2, 3, 4)), ("10B", 80, (4, 5, 6, 8))])
def test_global_batch_and_schedule_do_not_depend_on_the_world_size(size, gpu, worlds):
    plans = [Plan(_cfg(size, gpu_memory_gb=gpu), 1024, world) for world in worlds]
    assert len({(p.global_rows, p.batch_tokens, p.steps, p.lr_max) for p in plans}) == 1
    for world, p in zip(worlds, plans):
        per_rank = -(-p.global_rows // world)
        assert p.micro_rows * p.accumulation >= per_rank            # every row of the step is trained
        assert p.micro_rows * (p.accumulation - 1) < per_rank       # and no micro-step is empty on rank 0
