"""``protscale train``: one trial (Ray Train TorchTrainer + DeepSpeed), tracked in MLflow."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train", help="train one CLM or MLM trial at a compute budget",
        description="Train one trial: a Ray Train TorchTrainer whose workers run a DeepSpeed engine, "
        "for D = C / (6·N) tokens, logging to one MLflow run. Example: protscale train --objective clm "
        "--size tiny-3 --budget-flops 1e12 --data .demo/data",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--objective", choices=("clm", "mlm"), required=True)
    p.add_argument("--size", required=True, help="model size name (tiny-1..tiny-5, 3M..10B, esm2-650M)")
    p.add_argument("--budget-flops", type=float, required=True, help="compute budget C in FLOPs")
    p.add_argument("--data", required=True,
                   help="prepared dataset: a directory or a URI such as s3://bucket/ds (protscale data prepare)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment", default="protscale", help="MLflow experiment")
    p.add_argument("--name", default="", help="trial name (default: objective-size-budget-seed)")
    p.add_argument("--workers", default="1", help="Ray Train workers: N, or MIN:MAX for an elastic trial")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--zero-stage", default="auto", choices=("auto", "0", "1", "2", "3"),
                   help="DeepSpeed ZeRO stage (auto: the memory plan's on GPUs, 0 on CPUs)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB",
                   help="with --gpu: memory of one GPU the memory plan fits (40 for A100-40GB, 141 for H200)")
    p.add_argument("--attention", default="auto", choices=("auto", "sdpa", "flex", "flash"),
                   help="attention kernel (auto: FlexAttention on GPUs, SDPA with the document mask on CPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays on GPUs; "
                   "benchmarks/throughput.py measures it)")
    p.add_argument("--batch-tokens", type=int, default=0, help="tokens per step (0: paper rule by size)")
    p.add_argument("--lr-max", type=float, default=0.0, help="peak LR (0: paper rule by size)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evals/checkpoints (0: ~5 per trial)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default="", metavar="RUN_ID",
                   help="MLflow run id of a completed CLM trial: start this (MLM) trial from its weights")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    p.add_argument("--storage", default="runs", help="Ray Train storage path (checkpoints)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    p.set_defaults(func=run)


def parse_workers(text: str) -> tuple[int, int]:
    from ..cli import UserError

    try:
        lo, _, hi = text.partition(":")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise UserError(f"--workers {text!r}: expected N or MIN:MAX, e.g. 2 or 1:4") from None
    if not 0 <= lo <= hi:
        raise UserError(f"--workers {text!r}: need 0 <= MIN <= MAX")
    return lo, hi


def run(args) -> int:
    from pathlib import Path

    from ..cli import UserError
    from ..tracking.contract import default_tracking_uri, resolve_tracking_uri

    from ..data.shards import read_manifest

    read_manifest(args.data)        # a dataset without its manifest is refused here, in one line
    data = args.data if "://" in args.data else str(Path(args.data).resolve())
    workers = parse_workers(args.workers)

    from .config import TrialConfig
    from .trial import connect_ray, run_trial  # noqa: F401

    try:
        cfg = TrialConfig(objective=args.objective, size=args.size, budget_flops=args.budget_flops,
                          data=data, attention=args.attention, compile=args.compile,
                          tracking_uri=resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else default_tracking_uri(),
                          experiment=args.experiment, name=args.name, seed=args.seed,
                          batch_tokens=args.batch_tokens, lr_max=args.lr_max, eval_every=args.eval_every,
                          zero_stage=args.zero_stage if args.zero_stage == "auto" else int(args.zero_stage),
                          gpu_memory_gb=args.gpu_memory if args.gpu else 0.0, init_from=args.init_from)
    except (KeyError, ValueError) as exc:
        raise UserError(str(exc).strip("'\"")) from None
    if cfg.tokens_target < 1:
        raise UserError(f"--budget-flops {args.budget_flops:g} buys no token at size {args.size}")
    if cfg.gpu_memory_gb:     # the memory plan the workers will build, checked before anything starts
        from ..data.shards import read_manifest
        from .plan import Plan

        Plan(cfg, read_manifest(cfg.data)["seq_len"], max(1, workers[0]))   # raises DoesNotFit (a UserError)
    from mlflow.exceptions import MlflowException

    from ..tracking.auth import check_tracking_access
    from .trial import prepare_run

    check_tracking_access(cfg.tracking_uri)       # a refused login fails here, in one line
    try:
        prepare_run(cfg)        # the MLflow run (found again if this trial ran before) and init_from checks
    except (ValueError, MlflowException) as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    connect_ray(args.ray_address)
    result = run_trial(cfg, workers=workers, storage=args.storage, max_failures=args.max_failures,
                       use_gpu=args.gpu)
    print(result.summary(cfg.name))
    return 0 if result.status == "completed" else 1
