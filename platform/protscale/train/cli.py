"""``protscale train``: one trial (Ray Train TorchTrainer + DeepSpeed), tracked in MLflow.

The trial's flags are generated from ``TrialConfig``'s fields (type, default, help and choices from the
field metadata, ``--budget-flops`` for ``budget_flops``); only the flags about *where* it runs (workers,
GPUs, storage, Ray address, restarts) are written here.
"""

from __future__ import annotations

import argparse
import dataclasses


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train", help="train one CLM or MLM trial at a compute budget",
        description="Train one trial: a Ray Train TorchTrainer whose workers run a DeepSpeed engine, "
        "for D = C / (6·N) tokens, logging to one MLflow run. Running the same trial again (same "
        "identity: every setting that changes its result, see `trial_hash`) resumes or reuses its run; "
        "changing any of them trains a new run. Example: protscale train --objective clm "
        "--size tiny-3 --budget-flops 1e12 --data .demo/data",
        formatter_class=_DefaultsShown)
    trial = p.add_argument_group("trial (TrialConfig fields)")
    add_config_flags(trial)
    where = p.add_argument_group("where it runs")
    where.add_argument("--workers", default="1", help="Ray Train workers: N, or MIN:MAX for an elastic trial")
    where.add_argument("--gpu", action="store_true", help="one GPU per worker")
    where.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    where.add_argument("--storage", default="runs", help="Ray Train storage path (checkpoints)")
    where.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    p.set_defaults(func=run)


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where there is one worth reading (not None, "", False)."""

    def _get_help_string(self, action):
        if action.default in (None, "", False) or action.required:
            return action.help
        return super()._get_help_string(action)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


_METAVARS = {"int": "N", "float": "X", "str": "TEXT"}


def add_config_flags(parser) -> None:
    """One flag per ``TrialConfig`` field shown on the command line (metadata ``cli``)."""
    from .config import TrialConfig

    for f in dataclasses.fields(TrialConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        kw: dict = {"dest": f.name, "help": meta["help"]}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = meta.get("cli_default", None if required else f.default)
        if "cli_default" in meta:
            required = False
        typ = str(f.type)
        if typ == "bool":
            kw.update(action="store_true")
        elif typ == "bool | None":
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kw.update(type={"int": int, "float": float}.get(typ, str), required=required)
            if not required:
                kw["default"] = default
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            if meta.get("metavar") or not meta.get("choices"):
                kw["metavar"] = meta.get("metavar") or _METAVARS.get(typ, "VALUE")
        parser.add_argument(_flag(f), **kw)


def config_from_args(args, **fields):
    """The ``TrialConfig`` of parsed flags (``fields`` override them); a bad value is a ``UserError``
    naming its flag."""
    from ..errors import UserError
    from .config import TrialConfig

    values = {}
    for f in dataclasses.fields(TrialConfig):
        if f.metadata.get("cli", True) and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    values.update(fields)
    flags = {f.name: _flag(f) for f in dataclasses.fields(TrialConfig)}
    try:
        return TrialConfig(**values)
    except (KeyError, ValueError) as exc:
        msg = str(exc).strip("'\"")
        name = next((n for n in flags if msg.startswith(n + " ")), None)
        if name:
            msg = flags[name] + msg[len(name):]
        elif msg.startswith("objective "):
            msg = "--objective" + msg[len("objective"):]
        raise UserError(msg) from None


def parse_workers(text: str) -> tuple[int, int]:
    from ..errors import UserError

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

    from ..errors import UserError
    from ..tracking.contract import default_tracking_uri, resolve_tracking_uri

    from ..data.shards import read_manifest

    if args.max_failures < 0:
        raise UserError(f"--max-failures {args.max_failures}: must be >= 0")
    workers = parse_workers(args.workers)
    cfg = config_from_args(           # flag values first: a bad flag is named before the data is read
        args, data=args.data if "://" in args.data else str(Path(args.data).resolve()),
        tracking_uri=resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else default_tracking_uri(),
        gpu_memory_gb=args.gpu_memory_gb if args.gpu else 0.0)
    manifest = read_manifest(cfg.data)      # a dataset without its manifest is refused here, in one line
    if not isinstance(manifest.get("seq_len"), int) or not (manifest.get("splits") or {}).get("train"):
        raise UserError(f"--data {args.data}: its manifest.json has no seq_len or no train split; prepare the "
                        "dataset again (protscale data prepare --help)")

    from .trial import connect_ray, run_trial  # noqa: F401

    if cfg.tokens_target < 1:
        raise UserError(f"--budget-flops {args.budget_flops:g} buys no token at size {args.size}")
    if cfg.gpu_memory_gb:     # the memory plan the workers will build, checked before anything starts
        from .plan import Plan

        Plan(cfg, manifest["seq_len"], max(1, workers[0]))   # raises DoesNotFit (a UserError)
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
