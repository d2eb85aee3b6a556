"""The GPU step, on CUDA only (skipped elsewhere; ``benchmarks/gpu_check.sh`` runs these on a GPU machine).

* the local-mode process group is NCCL, and collectives run on CUDA tensors;
* a bf16 DeepSpeed training step through ``build_engine`` (the trial's engine): bf16 weights, fused AdamW,
  FlexAttention, a loss that goes down;
* compiled FlexAttention equals the dense-mask SDPA path in bf16, forward and gradients, CLM and MLM;
* a FlexAttention forward + backward on new packings neither synchronises with the host nor recompiles;
* ``compile=True`` trains to the same losses as eager.

Imports only torch, numpy, pyarrow and DeepSpeed (no Ray, no MLflow): the GPU machine carries no more.
"""

import itertools

import numpy as np
import pytest
import torch

from protscale.data import MAIN
from protscale.data.fasta import read_fasta
from protscale.data.shards import pack
from protscale.data.tokenizer import encode
from protscale.model.transformer import ModelConfig, ProteinLM
from protscale.train.batches import clm_labels, mlm_inputs, segment_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEQ_LEN = 512
DEVICE = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def rows():
    """Bundled UniProt proteins packed into rows of 512 tokens (the last row padded)."""
    packed = pack((encode(r.seq.decode()) for r in itertools.islice(read_fasta(MAIN), 400)), SEQ_LEN)
    doc, pos = segment_ids(packed.seq_lens, SEQ_LEN)
    return packed, doc, pos


def batch(rows, objective: str, idx, seed: int = 0) -> dict:
    packed, doc, pos = rows
    tokens = packed.tokens[idx]
    if objective == "clm":
        inputs, labels = tokens.astype(np.int64), clm_labels(tokens, doc[idx])
    else:
        inputs, labels = mlm_inputs(tokens, np.random.default_rng(seed))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)  # noqa: E731
    return {"tokens": t(inputs), "labels": t(labels), "doc_ids": t(doc[idx]), "pos_ids": t(pos[idx])}


@pytest.fixture(scope="module")
def process_group():
    from protscale.train.engine import init_process_group

    init_process_group(1, DEVICE)
    return torch.distributed


def engine_for(size: str, objective: str, compile_model: bool = False, seed: int = 0):
    """The trial's engine for 100 steps of 8 rows (warm-up: 2 steps), from the trial's own Plan."""
    from protscale.model.sizes import get_size
    from protscale.train.config import TrialConfig
    from protscale.train.engine import build_engine
    from protscale.train.plan import Plan

    budget = 6.0 * get_size(size).n_params_non_embedding * 100 * 8 * SEQ_LEN
    cfg = TrialConfig(objective=objective, size=size, budget_flops=budget, data="", tracking_uri="",
                      experiment="", micro_batch_rows=8, batch_tokens=8 * SEQ_LEN, lr_max=1e-3,
                      compile=compile_model)
    plan = Plan(cfg, SEQ_LEN, 1)
    assert (plan.micro_rows, plan.accumulation, plan.zero_stage) == (8, 1, 0)
    torch.manual_seed(seed)
    return build_engine(cfg, plan, DEVICE, universal=False)


def train(engine, rows, objective, steps):
    losses = []
    for s in range(steps):
        loss = engine(**batch(rows, objective, np.arange(8), seed=0))     # the same rows: loss must fall
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return [float(x) for x in losses]


def test_local_mode_process_group_is_nccl(process_group):
    assert process_group.get_backend() == "nccl"
    x = torch.ones(4, device=DEVICE)
    process_group.all_reduce(x)
    assert x.device.type == "cuda" and x.sum().item() == 4


def test_bf16_deepspeed_step_through_build_engine(rows, process_group):
    engine = engine_for("tiny-6", "mlm")
    params = list(engine.module.parameters())
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in params)
    inner = engine.optimizer
    while not isinstance(inner, torch.optim.AdamW):          # DeepSpeed's bf16 wrapper holds torch's AdamW
        inner = inner.optimizer
    assert inner.defaults["fused"] is True
    losses = train(engine, rows, "mlm", 8)
    assert all(np.isfinite(losses)) and min(losses[-3:]) < losses[0] - 0.1


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_compiled_flex_equals_dense_sdpa_in_bf16(rows, objective):
    b = batch(rows, objective, [0, 1, 2, len(rows[0]) - 1])                 # the last row is padded
    torch.manual_seed(0)
    model = ProteinLM(ModelConfig(layers=2, d_model=256, heads=4, causal=objective == "clm")).to(DEVICE)
    model = model.to(torch.bfloat16)
    results = {}
    for impl in ("sdpa", "flex"):
        model.cfg.attention = impl
        model.zero_grad()
        with torch.no_grad():
            logits = model(b["tokens"], b["pos_ids"], b["doc_ids"]).float()
        model(**b).backward()
        results[impl] = logits, {n: p.grad.float().clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], rtol=3e-2, atol=3e-2)
    for name, g in results["sdpa"][1].items():
        rel = (results["flex"][1][name] - g).norm() / g.norm()
        assert rel < 3e-2, (name, float(rel))


def test_flex_step_has_no_host_sync_and_no_recompile(rows):
    import torch._dynamo.utils as dynamo_utils

    torch.manual_seed(0)
    model = ProteinLM(ModelConfig(layers=2, d_model=256, heads=4, causal=False)).to(DEVICE).to(torch.bfloat16)
    model(**batch(rows, "mlm", np.arange(8))).backward()                    # compiles the kernel
    batches = [batch(rows, "mlm", np.arange(start, start + 8)) for start in (8, 16)]   # other packings
    frames = dict(dynamo_utils.counters["frames"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches:
            model(**b).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert dict(dynamo_utils.counters["frames"]) == frames


def test_compiled_engine_trains_like_eager(rows, process_group):
    eager = train(engine_for("tiny-5", "clm", seed=1), rows, "clm", 4)
    compiled = train(engine_for("tiny-5", "clm", compile_model=True, seed=1), rows, "clm", 4)
    np.testing.assert_allclose(compiled, eager, rtol=2e-2)
