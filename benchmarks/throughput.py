"""Training throughput of one GPU: tokens/s on unpadded tokens and MFU, against ``transformers``.

    python benchmarks/throughput.py                                   # GPU: esm2-650M, 85M, esm2-3B
    python benchmarks/throughput.py --device cpu --sizes tiny-3 --steps 2 --warmup 1   # CPU dry path

For each model shape, MLM at sequence 1024 on rows packed from the bundled UniProt proteins (real protein
lengths, several proteins a row), two training steps loops are timed in the same process on the same
batches:

* **protscale**: the trial's own DeepSpeed engine (``train.engine.build_engine``: bf16 on a GPU, fused
  AdamW, document-masked attention — FlexAttention on CUDA), optionally with ``torch.compile``;
* **transformers**: ``EsmForMaskedLM`` of the same shape (random init, AdamW fused, bf16 autocast as the
  Hugging Face Trainer does, SDPA attention). It attends across the proteins of a packed row (it has no
  document mask), so it does the dense-attention work with no masking overhead.

Warm-up steps first (compilation, allocator), then timed steps between CUDA events. Tokens/s counts
unpadded tokens; MFU counts ``train_flops_per_token`` of ``model/sizes.py`` (the convention is printed)
against the dense bf16 peak of the GPU's datasheet, and also against a bf16 matmul measured in the same
run. Peak memory (``torch.cuda.max_memory_allocated``) is printed beside the memory plan's estimate, and
``--memory-check 85M`` runs the paper trial of a size with the micro-batch its memory plan chooses and
compares. Everything goes to a JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform as host
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from protscale.model.sizes import peak_flops  # noqa: E402

SEQ_LEN = 1024
# Rows of 1024 tokens per step on one GPU: large enough to fill an H100/H200, small enough that the
# transformers baseline (fp32 weights + autocast) fits beside its optimizer states. Halved once on OOM.
DEFAULT_ROWS = {"85M": 32, "esm2-650M": 16, "esm2-3B": 8}


def packed_rows(n_rows: int):
    """(tokens uint8 (n, 1024), seq_lens) packed from the bundled proteins, cycled if needed."""
    from protscale.data import MAIN
    from protscale.data.fasta import read_fasta
    from protscale.data.shards import pack
    from protscale.data.tokenizer import encode

    rows = pack((encode(r.seq.decode()) for r in read_fasta(MAIN)), SEQ_LEN)
    full = [i for i in range(len(rows)) if int(rows.seq_lens[i].sum()) == SEQ_LEN]
    pick = [full[i % len(full)] for i in range(n_rows)]     # every row full of real proteins
    return rows.tokens[pick], [rows.seq_lens[i] for i in pick]


def make_batches(tokens, seq_lens, rows: int, steps: int, device):
    """One MLM batch per step, built before timing (the trial loop builds them on another thread)."""
    from protscale.data.tokenizer import PAD
    from protscale.train.batches import mlm_inputs, segment_ids

    doc, pos = segment_ids(seq_lens, SEQ_LEN)
    out = []
    for s in range(steps):
        idx = slice(s * rows, (s + 1) * rows)
        inputs, labels = mlm_inputs(tokens[idx], np.random.default_rng(s))
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        out.append({"tokens": t(inputs), "labels": t(labels), "doc_ids": t(doc[idx]), "pos_ids": t(pos[idx]),
                    "attention_mask": t(tokens[idx] != PAD).long(),
                    "unpadded": int(sum(int(x.sum()) for x in seq_lens[idx]))})
    return out


def trial_engine(cfg, device):
    """The trial's plan and DeepSpeed engine, exactly as ``train/loop.py`` builds them."""
    from protscale.train.engine import build_engine, init_process_group
    from protscale.train.plan import Plan

    init_process_group(1, device)
    plan = Plan(cfg, SEQ_LEN, 1)
    return plan, build_engine(cfg, plan, device, universal=False)


def bench_config(size: str, rows: int, compile_model: bool, attention: str, **fields):
    """A trial config for one fixed micro-batch of ``rows`` rows (no memory planner, no accumulation)."""
    from protscale.train.config import TrialConfig

    from protscale.model.sizes import get_size

    fields = {"micro_batch_rows": rows, "batch_tokens": rows * SEQ_LEN, "activation_checkpointing": False,
              "zero_stage": 0, **fields}
    budget = 6.0 * get_size(size).n_params_non_embedding * 1000 * (rows or 512) * SEQ_LEN   # 1000 steps
    return TrialConfig(objective="mlm", size=size, budget_flops=budget, data="", tracking_uri="", experiment="",
                       attention=attention, compile=compile_model, **fields)


def protscale_step(size: str, rows: int, device, compile_model: bool, attention: str):
    """The trial's engine and one optimizer step of it."""
    plan, engine = trial_engine(bench_config(size, rows, compile_model, attention), device)

    def step(batch):
        loss = engine(tokens=batch["tokens"], pos_ids=batch["pos_ids"], doc_ids=batch["doc_ids"],
                      labels=batch["labels"])
        engine.backward(loss)
        engine.step()
        return loss.detach()
    return engine, step


def transformers_step(size: str, device):
    """``EsmForMaskedLM`` of the same shape: AdamW (fused on CUDA), bf16 autocast on CUDA."""
    from transformers import EsmConfig, EsmForMaskedLM

    from protscale.data.tokenizer import EOS, MASK, PAD, VOCAB_SIZE
    from protscale.model.sizes import get_size
    from protscale.train import recipe

    shape = get_size(size)
    config = EsmConfig(vocab_size=VOCAB_SIZE, mask_token_id=MASK, pad_token_id=PAD, eos_token_id=EOS,
                       hidden_size=shape.d_model, num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, intermediate_size=4 * shape.d_model,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       position_embedding_type="rotary", layer_norm_eps=1e-5, emb_layer_norm_before=False,
                       token_dropout=False, max_position_embeddings=SEQ_LEN + 2)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = EsmForMaskedLM(config)
    model.train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=recipe.ADAM_BETAS, eps=recipe.ADAM_EPS,
                            weight_decay=recipe.WEIGHT_DECAY, fused=cuda)

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=batch["tokens"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return model, step


def timed(step, batches, warmup: int, device) -> tuple[float, list[float]]:
    """Seconds per step over the timed batches (after ``warmup`` of them), and the losses."""
    losses = [step(b) for b in batches[:warmup]]
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        losses += [step(b) for b in batches[warmup:]]
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        losses += [step(b) for b in batches[warmup:]]
        seconds = time.perf_counter() - t0
    return seconds / max(1, len(batches) - warmup), [float(x) for x in losses]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        left = torch.cuda.memory_allocated(device) / 1e9
        if left > 1:
            print(f"  ({left:.1f} GB still allocated after freeing the last model)")


def matmul_peak(device) -> float | None:
    """bf16 FLOP/s of an 8192³ matmul: the practical ceiling of this GPU, measured in this run."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * 8192 ** 3 / (start.elapsed_time(end) / 1e3)


def block_mask_cost(device, rows: int = 16) -> dict:
    """Milliseconds to build one forward's BlockMask from ``doc_ids`` (``document_block_mask``, once per
    forward, shared by all layers) against torch's ``create_block_mask``, which evaluates the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    from protscale.model.transformer import document_block_mask
    from protscale.train.batches import segment_ids

    _, seq_lens = packed_rows(rows)
    doc = ids = torch.from_numpy(segment_ids(seq_lens, SEQ_LEN)[0]).to(device)

    def mask_mod(b, h, q, kv):
        return ids[b, q] == ids[b, kv]

    def ms(fn, n=20):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return 1e3 * (time.perf_counter() - t0) / n
    out = {"rows": rows, "document_block_mask_ms": ms(lambda: document_block_mask(doc, causal=False)),
           "create_block_mask_ms": ms(lambda: create_block_mask(mask_mod, rows, None, SEQ_LEN, SEQ_LEN,
                                                                  device=device), n=5)}
    print(f"block mask per forward ({rows} rows x {SEQ_LEN}): document_block_mask "
          f"{out['document_block_mask_ms']:.2f} ms, torch create_block_mask {out['create_block_mask_ms']:.2f} ms")
    return out


def memory_check(size: str, gpu_memory_gb: float, args, device) -> dict:
    """The memory plan of the paper's trial of ``size`` (its batch, ``gpu_memory_gb``) against the bytes
    PyTorch allocates: two optimizer steps of the planned engine, ``max_memory_allocated`` against the
    plan's estimate (``train/memory.py``: ``tensors``, and ``total`` with overhead and fragmentation)."""
    cfg = bench_config(size, 0, False, args.attention, batch_tokens=0, activation_checkpointing=None,
                       zero_stage="auto", gpu_memory_gb=gpu_memory_gb)
    free(device)
    try:
        if device.type != "cuda":      # CPU dry path: the plan only (its micro-batch is sized for a GPU)
            from protscale.train.plan import Plan

            plan, engine = Plan(cfg, SEQ_LEN, 1), None
        else:
            plan, engine = trial_engine(cfg, device)
    except Exception as exc:           # memory.DoesNotFit names the trial and what to change
        print(f"memory plan {size} @ {gpu_memory_gb:g} GB: {type(exc).__name__}: {exc}")
        return {"size": size, "gpu_memory_gb": gpu_memory_gb, "error": f"{type(exc).__name__}: {exc}"}
    measured, error = None, None
    if engine is not None:
        # Two optimizer steps as the loop runs them: the second step's forward is where AdamW's states,
        # gradients and activations are all alive at once.
        micro = 2 * plan.accumulation
        tokens, seq_lens = packed_rows(micro * plan.micro_rows)
        batches = make_batches(tokens, seq_lens, plan.micro_rows, micro, device)
        try:
            for b in batches:
                loss = engine(tokens=b["tokens"], pos_ids=b["pos_ids"], doc_ids=b["doc_ids"], labels=b["labels"])
                engine.backward(loss)
                engine.step()
            sync(device)
            measured = torch.cuda.max_memory_allocated(device) / 1e9
        except torch.OutOfMemoryError:
            error = "out of memory: the plan does not fit"
        del engine, batches
    est = plan.memory
    free(device)
    out = {"size": size, "gpu_memory_gb": gpu_memory_gb, "global_rows": plan.global_rows,
           "micro_rows": plan.micro_rows, "accumulation": plan.accumulation, "zero_stage": plan.zero_stage,
           "activation_checkpointing": plan.activation_checkpointing, "estimate_tensors_gb": est.tensors / 1e9,
           "estimate_total_gb": est.total / 1e9, "max_memory_allocated_gb": measured,
           "measured_over_estimate": measured / (est.tensors / 1e9) if measured else None}
    if error:
        out["error"] = error
    ratio = f"measured/estimate {out['measured_over_estimate']:.2f}" if measured else (error or "no CUDA: not measured")
    print(f"memory plan {size} @ {gpu_memory_gb:g} GB: {plan.micro_rows} rows x {plan.accumulation}, ZeRO-"
          f"{plan.zero_stage}, checkpointing {'on' if plan.activation_checkpointing else 'off'}; estimate "
          f"{est.tensors / 1e9:.1f} GB allocated ({est.total / 1e9:.1f} GB with overhead); "
          f"max_memory_allocated {measured if measured is None else round(measured, 1)} GB; {ratio}", flush=True)
    return out


def memory_estimate_gb(size: str, rows: int, attention: str, device) -> float | None:
    """The memory plan's estimate (``train/memory.py``) of the bytes a fixed-``rows`` run allocates."""
    from protscale.model.sizes import get_size
    from protscale.train import memory

    gpu = device.type == "cuda"
    try:
        est = memory.estimate(get_size(size), "mlm", SEQ_LEN, rows, world=1, zero_stage=0, checkpointing=False,
                              dtype="bf16" if gpu else "fp32", attention=memory.measured_attention(attention, gpu))
    except Exception as exc:     # another module's estimate: report it, keep the throughput figures
        print(f"  (memory plan estimate failed: {type(exc).__name__}: {exc})")
        return None
    return est.tensors / 1e9


def run_one(impl: str, size: str, rows: int, args, device, tokens, seq_lens, compile_model=False) -> dict:
    from protscale.model.sizes import effective_context, get_size, train_flops_per_token
    from protscale.model.transformer import resolve_attention

    batches = make_batches(tokens, seq_lens, rows, args.warmup + args.steps, device)
    free(device)
    model = step = None
    try:
        if impl == "protscale":
            model, step = protscale_step(size, rows, device, compile_model, args.attention)
        else:
            model, step = transformers_step(size, device)
        seconds, losses = timed(step, batches, args.warmup, device)
        prof = profile_table(step, batches[:2], device) if args.profile and impl == "protscale" else None
        estimate_gb = memory_estimate_gb(size, rows, args.attention, device) if impl == "protscale" else None
        oom = False
    except torch.OutOfMemoryError:
        oom = True
    if oom:             # outside the handler: its traceback would keep the failed model's memory alive
        model = step = batches = None
        free(device)
        if rows > 1:
            print(f"  {impl} {size}: out of memory at {rows} rows; retrying with {rows // 2}")
            return run_one(impl, size, rows // 2, args, device, tokens, seq_lens, compile_model)
        return {"impl": impl, "size": size, "rows": rows, "error": "out of memory"}
    peak_mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    del model, step
    free(device)

    shape = get_size(size)
    timed_batches = batches[args.warmup:]
    unpadded = sum(b["unpadded"] for b in timed_batches) / len(timed_batches)
    s_eff = effective_context(seq_lens[:rows * len(batches)])
    flops_per_token = train_flops_per_token(shape, s_eff)
    tokens_per_s = unpadded / seconds
    out = {"impl": impl, "size": size, "layers": shape.layers, "d_model": shape.d_model, "heads": shape.heads,
           "rows": rows, "compile": compile_model,
           "attention": resolve_attention(args.attention, device) if impl == "protscale" else "sdpa, no document mask",
           "unpadded_tokens_per_step": unpadded, "padded_tokens_per_step": rows * SEQ_LEN, "s_eff": s_eff,
           "flops_per_token": flops_per_token, "step_s": seconds, "tokens_per_s": tokens_per_s,
           "mfu": tokens_per_s * flops_per_token / args.peak if args.peak else None,
           "mfu_vs_matmul": tokens_per_s * flops_per_token / args.matmul if args.matmul else None,
           "max_memory_gb": peak_mem, "losses": losses}
    if impl == "protscale":
        out["memory_estimate_gb"] = estimate_gb
    if prof:
        out["profile"] = prof
    return out


def profile_table(step, batches, device) -> str:
    """The top kernels of two steps (torch.profiler), sorted by device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as p:
        for b in batches:
            step(b)
        sync(device)
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for key in keys:                     # the device-time key was renamed across torch versions
        try:
            table = p.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=70)
            break
        except Exception:
            table = "(profile table unavailable)"
    print(table)
    return table


def describe(r: dict) -> str:
    if "error" in r:
        return f"{r['size']:>10}  {r['impl']:<13} {r['error']}"
    variant = f"{r['attention']}, compile {'on' if r['compile'] else 'off'}" if r["impl"] == "protscale" else r["attention"]
    mfu = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "MFU n/a (no peak for this device)"
    mem = f"  peak {r['max_memory_gb']:.1f} GB" if r["max_memory_gb"] is not None else ""
    if r.get("memory_estimate_gb"):
        mem += f" (plan estimates {r['memory_estimate_gb']:.2f} GB)"
    return (f"{r['size']:>10}  {r['impl']:<13} ({variant}) rows {r['rows']:>3}  "
            f"{r['tokens_per_s']:>12,.0f} tokens/s/GPU  {mfu}  step {1e3 * r['step_s']:.1f} ms{mem}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="esm2-650M,85M,esm2-3B", help="names from protscale.model.sizes")
    ap.add_argument("--rows", type=int, default=0, help="rows of 1024 tokens per step (0: per-size default)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attention", default="auto", help="protscale attention: auto, flex, sdpa, flash")
    ap.add_argument("--compile-sizes", default="", help="sizes also timed with torch.compile ('all' for every size)")
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers' EsmForMaskedLM")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak per GPU (default: datasheet)")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of two protscale steps")
    ap.add_argument("--memory-check", default="", help="sizes whose paper trial's memory plan is checked")
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GB of the GPU the memory plan fits")
    ap.add_argument("--out", default="", help="JSON file (default: benchmarks/results/throughput-<gpu>-<date>.json)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = "cpu"
    args.peak = args.peak_tflops * 1e12 or peak_flops(gpu)
    args.matmul = matmul_peak(device)
    sizes = [s for s in args.sizes.split(",") if s]
    compiled = set(sizes) if args.compile_sizes == "all" else set(filter(None, args.compile_sizes.split(",")))

    from protscale.model.sizes import FLOPS_CONVENTION

    print(f"device {gpu}; torch {torch.__version__}; MLM, seq {SEQ_LEN}, rows packed from bundled UniProt proteins")
    print(f"FLOPs per token: {FLOPS_CONVENTION}")
    print(f"peak: {args.peak / 1e12:.0f} TFLOP/s dense bf16 (datasheet)" if args.peak else "peak: none (MFU not computed)")
    if args.matmul:
        print(f"measured bf16 matmul 8192^3: {args.matmul / 1e12:.0f} TFLOP/s")

    mask_cost = block_mask_cost(device, rows=16 if device.type == "cuda" else 2)
    rows_for = {s: args.rows or DEFAULT_ROWS.get(s, 1 if device.type == "cpu" else 16) for s in sizes}
    n_rows = max(rows_for.values()) * (args.warmup + args.steps)
    tokens, seq_lens = packed_rows(n_rows)
    results, ratios = [], {}
    for size in sizes:
        runs = [("transformers", False)] * (not args.no_baseline) + [("protscale", False)]
        runs += [("protscale", True)] * (size in compiled)
        mine = []
        for impl, comp in runs:
            r = run_one(impl, size, rows_for[size], args, device, tokens, seq_lens, comp)
            print(describe(r), flush=True)
            results.append(r)
            mine.append(r)
        base = next((r for r in mine if r["impl"] == "transformers" and "error" not in r), None)
        for r in mine:
            if r["impl"] == "protscale" and base and "error" not in r:
                key = f"{size} compile={'on' if r['compile'] else 'off'}"
                ratios[key] = r["tokens_per_s"] / base["tokens_per_s"]
                print(f"{'':>10}  ratio protscale/transformers ({key}): {ratios[key]:.2f}x")

    checks = [memory_check(size, args.gpu_memory, args, device)
              for size in filter(None, args.memory_check.split(","))]

    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None
    report = {
        "benchmark": "throughput", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu, "python": host.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "deepspeed": version("deepspeed"), "transformers": version("transformers"),
        "objective": "mlm", "seq_len": SEQ_LEN, "flops_convention": FLOPS_CONVENTION,
        "peak_flops": args.peak, "matmul_flops_measured": args.matmul, "steps": args.steps, "warmup": args.warmup,
        "block_mask": mask_cost, "results": results, "ratios": ratios, "memory_checks": checks,
    }
    out = Path(args.out or Path(__file__).parent / "results" /
               f"throughput-{gpu.replace(' ', '-')}-{dt.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in results + checks) else 1


if __name__ == "__main__":
    sys.exit(main())
