"""How much GPU memory a trial needs, and the planner that makes every trial fit its GPUs.

The estimate for one GPU (one data-parallel rank) is a sum of named terms:

* **model states**, by ZeRO stage over ``world`` ranks (Rajbhandari et al., 2020): weights (2 bytes a
  parameter in bf16, sharded at stage 3), gradients (same dtype, sharded from stage 2) and AdamW's
  states (the fp32 master copy when the weights are not fp32, plus two fp32 moments: sharded from
  stage 1). In fp32 (the CPU tests) there is no master copy: 4 + 4 + 8 bytes a parameter, exactly a
  plain ``torch.optim.AdamW``.
* **activations**: the bytes autograd saves for backward, *measured* from ``ProteinLM`` itself (see
  ``activation_profile``), times the rows of one micro-batch. With activation checkpointing a layer
  keeps only its block input, and backward recomputes one block at a time, so the cost is every
  layer's input plus one block's full activations.
* **communication buffers**: DeepSpeed's gradient bucket (its default ``reduce_bucket_size`` of 5e8
  elements, or the whole model if smaller) when there is more than one rank, and at ZeRO-3 the weights
  of the block being computed and the one being prefetched.
* a **fixed overhead** (CUDA context, cuBLAS and NCCL workspaces) and **allocator fragmentation**,
  stated below; the planner keeps ``HEADROOM`` of the GPU free on top of that.

The planner (``choose``) walks the plans from fastest to slowest — no activation checkpointing before
checkpointing, fewer GPUs before more, lower ZeRO stages before higher, the largest micro-batch that
fits — and returns the first that fits with headroom.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

from ..errors import UserError

GB = 1e9                          # GPU memory is sold in GB (80 GB H100 ≈ 79.6 GiB usable: see HEADROOM)

# Stated assumptions (not measured here: they depend on the driver, CUDA and NCCL builds).
FIXED_OVERHEAD_BYTES = 2.0 * GB   # CUDA context (~0.5-1 GB), cuBLAS/cuDNN workspaces, NCCL buffers
FRAGMENTATION = 1.10              # PyTorch's caching allocator: reserved / allocated at steady state
HEADROOM = 0.10                   # fraction of the GPU the plan leaves free (kernel scratch, spikes)
ZERO_BUCKET_ELEMENTS = 500_000_000   # DeepSpeed's default reduce_bucket_size (elements)
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


class DoesNotFit(UserError, ValueError):
    """No plan fits the trial on the GPUs it may use (the message names the trial and what to change)."""


# --- the activation term, measured from the model -------------------------------------------------

@dataclass(frozen=True)
class ActivationProfile:
    """Bytes saved for backward, per row of ``seq_len`` tokens, measured at one shape."""
    per_layer: int        # by one transformer block
    block_input: int      # one block's input: all a layer keeps under activation checkpointing
    other: int            # outside the blocks: embedding, final norm, logits, loss, shared masks

    def bytes_per_row(self, layers: int, checkpointing: bool) -> int:
        kept = layers * self.block_input + self.per_layer if checkpointing else layers * self.per_layer
        return kept + self.other


def measured_attention(attention: str, gpu: bool) -> str:
    """The attention path to measure for a trial: what it will run (``auto`` is FlexAttention on a GPU
    when the model has it, dense-mask SDPA on a CPU). flash-attn cannot run on a CPU; it saves what
    FlexAttention saves (q, k, v, output, log-sum-exp), so flex stands in for it."""
    from ..model import transformer

    known = getattr(transformer, "ATTENTION", ("auto", "sdpa", "flash"))
    if attention == "auto":
        attention = "flex" if gpu else "sdpa"
    if attention == "flash":
        attention = "flex"
    return attention if attention in known else "sdpa"


def activation_profile(d_model: int, heads: int, seq_len: int, causal: bool, attention: str = "sdpa",
                       dtype: str = "bf16") -> ActivationProfile:
    """What ``ProteinLM`` saves for backward at this shape, derived from two measurements.

    At a fixed head size, sequence length, attention path and dtype every saved tensor is either
    proportional to the width (hidden states, the fused qkv, the MLP's 4·d, the per-head log-sum-exp)
    or independent of it (rotary tables, masks, the vocabulary-sized logits): the bytes are a straight
    line in d_model. It is measured at 2 and 4 heads of this head size and read off at ``heads``, so a
    whole grid of widths costs two measurements (``test_memory`` checks the line against a direct
    measurement at the real width).
    """
    head = d_model // heads
    if heads <= 4 or head * heads != d_model:
        return measure_activations(d_model, heads, seq_len, causal, attention, dtype)
    low = measure_activations(2 * head, 2, seq_len, causal, attention, dtype)
    high = measure_activations(4 * head, 4, seq_len, causal, attention, dtype)

    def line(a: int, b: int) -> int:
        return a + (b - a) * (heads - 2) // 2

    return ActivationProfile(*(line(x, y) for x, y in zip(
        (low.per_layer, low.block_input, low.other), (high.per_layer, high.block_input, high.other))))


@functools.lru_cache(maxsize=None)
def measure_activations(d_model: int, heads: int, seq_len: int, causal: bool, attention: str = "sdpa",
                        dtype: str = "bf16") -> ActivationProfile:
    """Measure what ``ProteinLM`` saves for backward at this shape.

    A 2-layer model runs under ``FakeTensorMode`` (shapes, dtypes and storages, no data and no FLOPs:
    the 10B shape costs nothing) with ``saved_tensors_hooks`` counting every distinct storage autograd
    keeps, parameters excluded (they are model states). Views of one buffer count once (v is a view of
    the fused qkv output and keeps all of it alive, as on the GPU). A storage first saved inside the
    second block belongs to one layer; what that block reuses from the first (masks built once per
    forward) is shared, counted once with the embedding, loss and logits in ``other``. Falls back to
    SDPA when the requested path cannot run here.
    """
    try:
        total, second_block, block_input = _saved_bytes(d_model, heads, seq_len, causal, attention, dtype)
    except Exception:
        if attention == "sdpa":
            raise
        return measure_activations(d_model, heads, seq_len, causal, "sdpa", dtype)
    return ActivationProfile(per_layer=second_block // _ROWS, block_input=block_input // _ROWS,
                             other=(total - 2 * second_block) // _ROWS)


_ROWS = 2     # rows of the measured batch (everything saved scales with the rows; 2 shows it)


def _saved_bytes(d_model, heads, seq_len, causal, attention, dtype) -> tuple[int, int, int]:
    """(all saved bytes, bytes first saved inside block 2, bytes of block 2's input) of a 2-layer model."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..model.transformer import ModelConfig, ProteinLM

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    saved, owner, keep = {}, {}, []
    where = {"block": None, "input": 0}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in saved:
            saved[storage._cdata] = storage.nbytes()
            owner[storage._cdata] = where["block"]
        keep.append(t)
        return t

    def enter(index):
        def hook(_module, args):
            where["block"] = index
            where["input"] = args[0].untyped_storage().nbytes()
        return hook

    previous = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True), _flex_backward_on_cpu(attention):
        torch.set_default_dtype(torch_dtype)   # parameters are created in the trial's dtype
        try:
            model = ProteinLM(ModelConfig(2, d_model, heads, causal=causal, attention=attention))
        finally:
            torch.set_default_dtype(previous)
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        for index, block in enumerate(model.blocks):
            block.register_forward_pre_hook(enter(index))
            block.register_forward_hook(lambda *_: where.update(block=None))
        tokens = torch.randint(4, 24, (_ROWS, seq_len))
        pos_ids = torch.arange(seq_len).repeat(_ROWS, 1)
        doc_ids = (torch.arange(seq_len) // max(1, seq_len // 4)).repeat(_ROWS, 1)   # 4 proteins a row
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, pos_ids, doc_ids, labels=tokens)
    total = sum(n for key, n in saved.items() if key not in params)
    second = sum(n for key, n in saved.items() if key not in params and owner[key] == 1)
    return total, second, where["input"]


@contextlib.contextmanager
def _flex_backward_on_cpu(attention: str):
    """FlexAttention refuses CPU inputs that need gradients (it has no CPU backward kernel). Under
    ``FakeTensorMode`` nothing runs, and its autograd function saves on a CPU what it saves on a GPU
    (q, k, v, output, log-sum-exp), so the device check is lifted for the measurement only."""
    if attention != "flex":
        yield
        return
    from torch.nn.attention import flex_attention as module

    check = module._validate_device
    module._validate_device = lambda *args, **kwargs: None
    try:
        yield
    finally:
        module._validate_device = check


# --- the estimate -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU, by term (see the module docstring)."""
    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float

    @property
    def tensors(self) -> float:
        """Everything PyTorch allocates: what a CPU peak-RSS measurement compares against."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers

    @property
    def total(self) -> float:
        """What the GPU must hold: tensors with fragmentation, plus the fixed overhead."""
        return self.tensors * FRAGMENTATION + FIXED_OVERHEAD_BYTES

    @property
    def gb(self) -> float:
        return self.total / GB


def estimate(size, objective: str, seq_len: int, micro_rows: int, *, world: int = 1, zero_stage: int = 0,
             checkpointing: bool = False, dtype: str = "bf16", attention: str = "sdpa") -> MemoryEstimate:
    """Memory of one rank training ``size`` (a ``ModelSize``) with ``micro_rows`` rows per forward."""
    from ..data.tokenizer import VOCAB_SIZE

    n = size.n_params(VOCAB_SIZE, objective)
    elem = DTYPE_BYTES[dtype]
    weights = n * elem / (world if zero_stage >= 3 else 1)
    gradients = n * elem / (world if zero_stage >= 2 else 1)
    optimizer = n * ((4 if elem < 4 else 0) + 8) / (world if zero_stage >= 1 else 1)
    profile = activation_profile(size.d_model, size.heads, seq_len, objective == "clm", attention, dtype)
    activations = micro_rows * profile.bytes_per_row(size.layers, checkpointing)
    buffers = 0.0
    if world > 1:
        buffers += min(n, ZERO_BUCKET_ELEMENTS) * elem
    if zero_stage >= 3:
        buffers += 2 * 12 * size.d_model ** 2 * elem      # the gathered block and the prefetched one
    return MemoryEstimate(weights, gradients, optimizer, activations, buffers)


# --- the planner --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    workers: int
    zero_stage: int
    micro_rows: int
    accumulation: int
    activation_checkpointing: bool
    estimate: MemoryEstimate


def fits(est: MemoryEstimate, gpu_memory_gb: float) -> bool:
    return est.total <= (1 - HEADROOM) * gpu_memory_gb * GB


def choose(size, objective: str, seq_len: int, global_rows: int, gpu_memory_gb: float, *,
           worlds=(1,), zero_stage=None, checkpointing=None, micro_rows: int = 0, dtype: str = "bf16",
           attention: str = "sdpa", trial: str = "") -> MemoryPlan:
    """The fastest plan that fits: the first of (checkpointing off, then on) × ``worlds`` in order ×
    ZeRO stages (0 only on one GPU, else 1, 2, 3) × micro-batch rows from the whole per-rank batch
    down to 1. ``zero_stage``, ``checkpointing`` and ``micro_rows`` (when not None / 0) are fixed by
    the user and not searched. Raises ``DoesNotFit`` naming the trial and what to change."""
    ckpts = (False, True) if checkpointing is None else (checkpointing,)
    best = None
    for ckpt in ckpts:
        for world in worlds:
            stages = (zero_stage,) if zero_stage is not None else ((0,) if world == 1 else (1, 2, 3))
            per_rank = math.ceil(global_rows / world)
            for stage in stages:
                def est(rows, stage=stage, world=world):
                    return estimate(size, objective, seq_len, rows, world=world, zero_stage=stage,
                                    checkpointing=ckpt, dtype=dtype, attention=attention)
                rows = _largest_fitting(est, min(micro_rows or per_rank, per_rank), gpu_memory_gb)
                if rows:
                    accumulation = math.ceil(per_rank / rows)
                    rows = math.ceil(per_rank / accumulation)      # the same rows in every micro-step
                    return MemoryPlan(world, stage, rows, accumulation, ckpt, est(rows))
                smallest = est(1)
                if best is None or smallest.total < best[0].total:
                    best = (smallest, world, stage, ckpt)
    est_, world, stage, ckpt = best
    raise DoesNotFit(
        f"trial {trial or size.name}: does not fit a {gpu_memory_gb:g} GB GPU — the smallest plan "
        f"({world} GPU(s), ZeRO-{stage}, 1 row per micro-batch, activation checkpointing "
        f"{'on' if ckpt else 'off'}) needs {est_.gb:.1f} GB of {(1 - HEADROOM) * gpu_memory_gb:.0f} usable; "
        f"allow more GPUs per trial (max_workers in the search space, --workers for protscale train), "
        f"use larger GPUs (--gpu-memory) or a smaller model")


def _largest_fitting(est, upper: int, gpu_memory_gb: float) -> int:
    """Largest micro-batch rows in [1, upper] that fit (memory grows with rows: bisect); 0 if none."""
    if not fits(est(1), gpu_memory_gb):
        return 0
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(est(mid), gpu_memory_gb) else (lo, mid - 1)
    return lo
