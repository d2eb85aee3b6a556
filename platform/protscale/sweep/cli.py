"""``protscale sweep`` (Ray Tune over a search space) and ``protscale demo`` (the main job)."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    p = sub.add_parser("sweep", help="run every trial of a search space with Ray Tune",
                       description="Run a sweep: every trial of SPACE (a search_spaces/*.py file) as a "
                       "Ray Train trial scheduled by Ray Tune, one MLflow child run per trial.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("space", help="search-space file, e.g. search_spaces/demo_cpu.py")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--storage", default="runs", help="Ray storage path (checkpoints, Tune state)")
    p.add_argument("--dry-run", action="store_true", help="list the trials with N, D, C and resources; run nothing")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are skipped")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    p.set_defaults(func=run_sweep_cmd)

    d = sub.add_parser("demo", help="the main job: prepare the bundled proteins, run the demo sweep, fit the laws",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--dir", default=".demo", help="where the data, MLflow store, checkpoints and report go")
    d.add_argument("--space", default=None, help="search-space file (default: search_spaces/demo_cpu.py)")
    d.set_defaults(func=run_demo)


def _load(path: str, data_override: str | None = None):
    from ..cli import UserError
    from ..data.shards import read_manifest
    from .space import load, validate

    try:
        space = load(path)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if data_override:
        space.data = data_override
    try:
        manifest = read_manifest(space.data)
    except FileNotFoundError:
        manifest = None
    errors = validate(space, manifest)
    if errors:
        raise UserError(f"{path}: {len(errors)} problem(s) in the search space:\n  " + "\n  ".join(errors))
    return space, manifest


def _dry_run(space) -> None:
    from ..model.sizes import get_size, tokens_for_budget
    from .space import resources

    print(f"{space.name}: {len(space.trials)} trials on {space.data}")
    print(f"{'trial':42} {'N':>14} {'D (tokens)':>16} {'C (FLOPs)':>10}  resources")
    for t in space.trials:
        size = get_size(t.size)
        print(f"{t.name:42} {size.n_params_non_embedding:>14,} {tokens_for_budget(size, t.budget_flops):>16,} "
              f"{t.budget_flops:>10.2g}  {resources(space, t)}")


def run_sweep_cmd(args) -> int:
    from ..cli import UserError
    from ..tracking.contract import default_tracking_uri, resolve_tracking_uri

    space, manifest = _load(args.space)
    if args.dry_run:
        _dry_run(space)
        return 0
    if manifest is None:
        raise UserError(f"{args.space}: data {space.data} is not prepared; run `protscale data prepare --help`")
    from ..train.trial import connect_ray
    from .tune import run_sweep

    from ..tracking.auth import check_tracking_access

    uri = resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else default_tracking_uri()
    check_tracking_access(uri)      # before Ray starts: not once per trial, inside every trial
    connect_ray(args.ray_address)
    statuses = run_sweep(space, uri, args.storage, resume=args.resume)
    failed = [n for n, s in statuses.items() if s != "completed"]
    print(f"sweep {space.name}: {len(statuses) - len(failed)}/{len(statuses)} trials completed"
          + (f"; not completed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def run_demo(args) -> int:
    import time
    from pathlib import Path

    from ..data import MAIN, OOD
    from ..data.prepare import prepare
    from ..train.trial import connect_ray
    from .tune import run_sweep

    start = time.perf_counter()
    root = Path(args.dir).resolve()
    data = root / "data"
    if not (data / "manifest.json").is_file():
        print(f"[demo] preparing the bundled proteins -> {data}")
        prepare([MAIN], data, ood=OOD, seq_len=128, val_fraction=0.05, progress=False)
    space_file = args.space or str(Path(__file__).resolve().parents[3] / "search_spaces" / "demo_cpu.py")
    space, _ = _load(space_file, data_override=str(data))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    print(f"[demo] sweep {space.name}: {len(space.trials)} trials (Ray Tune + Ray Train/DeepSpeed) -> {uri}")
    connect_ray(None)
    statuses = run_sweep(space, uri, str(root / "runs"), resume=True)
    done = sum(s == "completed" for s in statuses.values())
    print(f"[demo] {done}/{len(statuses)} trials completed in {time.perf_counter() - start:.0f} s")
    report = root / "report"
    from ..cli import main

    print(f"[demo] fitting scaling laws from the tracking store -> {report}")
    if main(["fit", "--experiment", space.name, "--tracking-uri", uri, "--out", str(report),
             "--bootstrap", "400", "--bootstrap-parametric", "40", "--parametric-grid", "coarse"]) == 0:
        print(f"[demo] report: {report / 'report.html'} (also report.md, results.json, *.png)")
        print(f"[demo] plan a budget: protscale plan --budget-flops 1e12 --objective clm "
              f"--results {report / 'results.json'}")
    print(f"[demo] done in {time.perf_counter() - start:.0f} s. Browse the runs: "
          f"mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
    return 0 if done == len(statuses) else 1
