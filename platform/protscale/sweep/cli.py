"""``protscale sweep``: Ray Tune over a search space (``protscale demo`` is in ``demo.py``)."""

from __future__ import annotations

import argparse

from ..model.sizes import PEAK_FLOPS

DEFAULT_MFU = 0.40             # a conservative figure for a plain PyTorch bf16 step (BioNeMo reports ~43-59%)
DEFAULT_PEAK_TFLOPS = PEAK_FLOPS["H100"] / 1e12    # H100 SXM dense bf16


def add_commands(sub) -> None:
    p = sub.add_parser("sweep", help="run every trial of a search space with Ray Tune",
                       description="Run a sweep: every trial of SPACE (a search_spaces/*.py file) as a "
                       "Ray Train trial scheduled by Ray Tune, one MLflow child run per trial.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("space", help="search-space file, e.g. search_spaces/demo_cpu.py")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--storage", default="runs", help="Ray storage path (checkpoints, Tune state)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the trials with N, D, C and each one's memory plan and GPU-hours; run nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON array of trials instead of a table")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="memory of one GPU the trials must fit (default: the space's, 80; 40 for A100-40GB, "
                   "141 for H200)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed model FLOPs utilisation for GPU-hours")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="dense bf16 peak of one GPU for GPU-hours (H100: 989, A100: 312)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are skipped")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    p.add_argument("--max-failures", type=int, default=1, metavar="N",
                   help="times Ray Tune restarts a trial that died (a lost node or worker) from its checkpoint")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's output (Tune's tables, trial and worker logs) here instead of in the sweep's "
                   "log file (<storage>/<sweep>/sweep.log), with one progress line per finished trial")
    p.set_defaults(func=run_sweep_cmd)

    from .demo import add_command as add_demo

    add_demo(sub)


def _load(path: str, data_override: str | None = None, gpu_memory: float | None = None):
    from ..errors import UserError
    from ..data.shards import read_manifest
    from .space import load, validate

    try:
        space = load(path)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if data_override:
        space.data = data_override
    if gpu_memory:
        space.gpu_memory_gb = gpu_memory
    try:
        manifest = read_manifest(space.data)
    except FileNotFoundError:
        manifest = None
    errors = validate(space, manifest)
    if errors:
        raise UserError(f"{path}: {len(errors)} problem(s) in the search space:\n  " + "\n  ".join(errors))
    return space, manifest


def dry_run_rows(space, mfu: float = DEFAULT_MFU, peak_tflops: float = DEFAULT_PEAK_TFLOPS) -> list[dict]:
    """One dict per trial: its size, budget and the plan its workers will build (``space.plan``).

    GPU-hours = training FLOPs / (MFU × peak): FLOPs per token 6·N + 12·L·d·S (``train_flops_per_token``
    with S = seq_len, an upper bound on the packed S_eff), times 4/3 on the 6·N part when activation
    checkpointing recomputes the forward, times the trial's tokens. The world size does not change it."""
    from ..model.sizes import get_size, train_flops_per_token
    from .space import plan, seq_len

    rows = []
    length = seq_len(space)
    for t in space.trials:
        size = get_size(t.size)
        p = plan(space, t, length)
        tokens = p.steps * p.batch_tokens
        per_token = train_flops_per_token(size, length)
        if p.activation_checkpointing:
            per_token += 2.0 * size.n_params_non_embedding       # one more forward: 2·N per token
        gpu_hours = tokens * per_token / (mfu * peak_tflops * 1e12) / 3600 if space.gpus_per_trial else None
        rows.append({
            "trial": t.name, "objective": t.objective, "size": t.size,
            "n_params_non_embedding": size.n_params_non_embedding, "budget_flops": t.budget_flops,
            "tokens": tokens, "global_rows": p.global_rows, "workers": p.world, "zero_stage": p.zero_stage,
            "micro_batch_rows": p.micro_rows, "accumulation": p.accumulation,
            "activation_checkpointing": p.activation_checkpointing,
            "memory_gb_per_gpu": round(p.memory_gb_per_gpu, 2), "gpu_hours": gpu_hours,
        })
    return rows


def _dry_run(space, as_json: bool = False, mfu: float = DEFAULT_MFU,
             peak_tflops: float = DEFAULT_PEAK_TFLOPS) -> None:
    import json

    from ..model.sizes import get_size, tokens_for_budget
    from .space import gpu_memory_gb

    rows = dry_run_rows(space, mfu, peak_tflops)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    gpu = bool(space.gpus_per_trial)
    where = (f"GPUs of {space.gpu_memory_gb:g} GB" + (f" (a {space.gpus_per_trial:g} share each)"
                                                      if space.gpus_per_trial < 1 else "")) if gpu else "CPUs"
    print(f"{space.name}: {len(rows)} trials on {space.data}, {where}")
    print(f"{'trial':34} {'N':>14} {'D (tokens)':>16} {'C':>7} {'GPUs' if gpu else 'wrk':>4} {'ZeRO':>4} "
          f"{'micro x accum':>13} {'ckpt':>4} {'GB/GPU' if gpu else 'GB':>6} {'GPU-h':>9}")
    for t, r in zip(space.trials, rows):
        size = get_size(t.size)
        hours = f"{r['gpu_hours']:9.1f}" if r["gpu_hours"] is not None else f"{'-':>9}"
        print(f"{t.name:34} {size.n_params_non_embedding:>14,} {tokens_for_budget(size, t.budget_flops):>16,} "
              f"{t.budget_flops:>7.2g} {r['workers']:>4} {r['zero_stage']:>4} "
              f"{str(r['micro_batch_rows']) + ' x ' + str(r['accumulation']):>13} "
              f"{'on' if r['activation_checkpointing'] else 'off':>4} {r['memory_gb_per_gpu']:>6.1f} {hours}")
    peak = max((r["memory_gb_per_gpu"] for r in rows), default=0.0)
    if gpu:
        total = sum(r["gpu_hours"] for r in rows)
        print(f"total: {len(rows)} trials, {total:,.1f} GPU-hours, peak {peak:.1f} GB per GPU "
              f"(of {gpu_memory_gb(space):g}); GPU-hours assume MFU {mfu:.0%} of {peak_tflops:g} TFLOP/s"
              f"{' (H100 bf16 dense)' if peak_tflops == DEFAULT_PEAK_TFLOPS else ''} on 6N+12·L·d·S FLOPs "
              "per token, S = seq_len, +2N under checkpointing")
    else:
        print(f"total: {len(rows)} trials, peak {peak:.2f} GB per worker (CPU, fp32)")
    a = space.adaptive
    if a is not None:
        extra = len(a.grid()) - len([t for t in a.grid() if t in space.trials])
        print(f"then adaptive waves ({'/'.join(a.objectives)}): up to {a.limit()} IsoFLOP trials per objective "
              f"of the {len(a.grid()) // max(1, len(a.objectives))}-trial candidate grid ({extra} not listed above), "
              f"until the N_opt exponent's 95% interval is <= {a.target_width:g} wide; candidates per budget: "
              + "; ".join(f"{b:.3g}: {', '.join(a.candidates(b))}" for b in a.budgets))


def run_sweep_cmd(args) -> int:
    from ..errors import UserError
    from ..tracking.contract import default_tracking_uri, resolve_tracking_uri

    for flag, value, ok in (("--gpu-memory", args.gpu_memory, args.gpu_memory is None or args.gpu_memory > 0),
                            ("--mfu", args.mfu, 0 < args.mfu <= 1), ("--peak-tflops", args.peak_tflops, args.peak_tflops > 0),
                            ("--max-failures", args.max_failures, args.max_failures >= 0)):
        if not ok:
            raise UserError(f"{flag} {value:g}: out of range (GPU memory and peak > 0, MFU in (0, 1], max failures >= 0)")
    space, manifest = _load(args.space, gpu_memory=args.gpu_memory)
    if args.dry_run:
        _dry_run(space, args.json, args.mfu, args.peak_tflops)
        return 0
    if manifest is None:
        raise UserError(f"{args.space}: data {space.data} is not prepared; run `protscale data prepare --help`")
    from ..train.trial import connect_ray
    from .tune import run_sweep

    from ..tracking.auth import check_tracking_access

    uri = resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else default_tracking_uri()
    check_tracking_access(uri)      # before Ray starts: not once per trial, inside every trial
    connect_ray(args.ray_address)
    statuses = run_sweep(space, uri, args.storage, resume=args.resume, max_failures=args.max_failures,
                         verbose=args.verbose)
    failed = [n for n, s in statuses.items() if s != "completed"]
    from ..tracking.provenance import experiment_hint

    print(f"sweep {space.name}: {len(statuses) - len(failed)}/{len(statuses)} trials completed"
          + (f"; not completed: {', '.join(failed)}" if failed else "") + f"\n{experiment_hint(uri, space.name)}")
    return 1 if failed else 0
