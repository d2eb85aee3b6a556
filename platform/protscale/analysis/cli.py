"""Sub-commands of the analysis stage: ``protscale fit`` and ``protscale plan``.

Heavy imports (numpy, scipy, pandas, mlflow, matplotlib) happen inside the handlers.
"""

from __future__ import annotations

import argparse


def _unique(text: str) -> tuple[str, float]:
    name, sep, val = text.partition("=")
    try:
        tokens = float(val)
    except ValueError:
        tokens = float("nan")
    if not (sep and name and tokens > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=TOKENS with TOKENS > 0, e.g. ur50=15.2e9")
    return name, tokens


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 5 comma-separated numbers E,A,B,alpha,beta, got {text!r}")
    if len(vals) != 5:
        raise argparse.ArgumentTypeError(f"expected 5 numbers E,A,B,alpha,beta, got {len(vals)}")
    if min(vals[:3]) <= 0:
        raise argparse.ArgumentTypeError(f"E, A and B of an initial point must be positive, got {text!r}")
    return vals


def add_commands(sub) -> None:
    fit = sub.add_parser(
        "fit", help="fit scaling and transfer laws (with bootstrap intervals) to the runs of experiments",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read every run of the experiments from the tracking store, check the data (duplicated "
        "curves, a FLOPs axis inconsistent with 6·N·tokens, NaN/diverged runs, budgets with too few sizes: "
        "reported, never fitted blindly), then per objective fit the loss envelope L(C), IsoFLOP profiles -> "
        "N_opt(C) and D_opt(C), the parametric law L(N, D) = E + A/N^alpha + B/D^beta (Huber on log-sum-exp "
        "residuals, L-BFGS from a full grid, every basin near the optimum) and the transfer law "
        "D_t = k·D_F^a·N^b, each with run-level and budget-blocked bootstrap intervals. Writes results.json "
        "(schema: protscale/analysis/SCHEMA.md), report.md/.html and PNG plots, and logs them to an MLflow run "
        "tagged kind=analysis in the first experiment.",
        epilog="example:\n  protscale fit --experiment paper-clm --out fit-clm\n"
        "  protscale fit --experiment paper-clm --parametric-init 2.718,148.4,22026,0.5,0.5")
    fit.add_argument("--experiment", action="append", required=True, metavar="NAME",
                     help="MLflow experiment to read (repeat for several)")
    fit.add_argument("--tracking-uri", metavar="URI",
                     help="MLflow tracking URI or SQLite file (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    fit.add_argument("--out", default="fit", metavar="DIR", help="output folder (default: ./fit)")
    fit.add_argument("--metric", default="val_loss", help="loss metric to fit (default: val_loss)")
    fit.add_argument("--bootstrap", type=int, default=1000, metavar="B",
                     help="bootstrap replicates per scheme for IsoFLOP, envelope and transfer (default 1000)")
    fit.add_argument("--bootstrap-parametric", type=int, default=200, metavar="B",
                     help="bootstrap replicates per scheme for the parametric law (default 200)")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    fit.add_argument("--parametric-points", choices=("isoflop", "all"), default="isoflop",
                     help="points of the parametric fit: the final points of the IsoFLOP runs (default) or of "
                     "every clean run")
    fit.add_argument("--parametric-grid", choices=("full", "coarse"), default="full",
                     help="initialisation grid of the parametric fit: full (Chinchilla's 4,500 starts, default) "
                     "or coarse (243 starts, for quick looks)")
    fit.add_argument("--parametric-init", type=_floats, metavar="E,A,B,ALPHA,BETA",
                     help="also fit from this initial point (e.g. a paper's) and report where it lands")
    fit.add_argument("--unigram-baseline", type=float, metavar="NATS",
                     help="loss of predicting residues from their frequencies alone; fitted losses not 3%% below it "
                     "are flagged (default 2.888: entropy of the UniProtKB/Swiss-Prot amino-acid composition)")
    fit.add_argument("--unique-tokens", type=_unique, action="append", metavar="NAME=TOKENS",
                     help="unique tokens of a repeated training set named NAME by its runs' `data` tag (e.g. "
                     "ur50=15.2e9): the repetition law then reads R* from runs on NAME against runs that saw "
                     "their data once (repeatable)")
    fit.add_argument("--no-log", action="store_true", help="do not log an MLflow analysis run")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    fit.set_defaults(func=_fit)

    pl = sub.add_parser(
        "plan", help="compute-optimal model size and tokens for a budget, from a fitted results.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Answer with N and D (and, for 'both', the split of compute between CLM pre-training and "
        "MLM training) with 95% intervals, from the laws in a results.json written by `protscale fit`.\n"
        "Each answer carries the warnings of its law: not identifiable (near-equal basins that disagree, α or β\n"
        "whose interval reaches 0), extrapolation beyond the budgets fitted (by how far), fitted losses near\n"
        "the unigram baseline, an N interval wider than a factor 100. Answers resting on an unusable law are\n"
        "marked UNUSABLE.",
        epilog="exit status:\n  0  the answer rests on at least one usable law\n"
        "  2  bad input (no such file, objective not fitted, ...)\n"
        "  3  answer printed, but every law it rests on is unusable (see its warnings)")
    pl.add_argument("--budget-flops", type=float, required=True, metavar="C", help="total compute budget in FLOPs")
    pl.add_argument("--objective", choices=("clm", "mlm", "both"), required=True)
    pl.add_argument("--results", default="fit/results.json", metavar="FILE",
                    help="results.json of `protscale fit` (default: fit/results.json)")
    pl.add_argument("--data", metavar="DIR", help="prepared dataset to train on: warn when the answer would repeat "
                    "its unique tokens (manifest.json splits.train.tokens) beyond what repeated data is worth")
    pl.add_argument("--json", action="store_true", help="print the answer as JSON")
    pl.set_defaults(func=_plan)


def _fit(args) -> int:
    from pathlib import Path

    from protscale.errors import UserError
    from protscale.tracking import contract

    from .pipeline import Config
    from .run import run_fit

    if args.bootstrap < 20 or args.bootstrap_parametric < 20:
        raise UserError("--bootstrap and --bootstrap-parametric need at least 20 replicates")
    if args.unigram_baseline is not None and not args.unigram_baseline > 0:
        raise UserError(f"--unigram-baseline must be a positive loss in nats, got {args.unigram_baseline}")
    uri = contract.resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else contract.default_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise UserError(f"{db}: no such tracking store (give --tracking-uri)")
    from protscale.tracking.auth import check_tracking_access

    check_tracking_access(uri)
    cfg = Config(n_boot=args.bootstrap, n_boot_parametric=args.bootstrap_parametric, seed=args.seed,
                 parametric_points=args.parametric_points, parametric_init=args.parametric_init,
                 parametric_grid=args.parametric_grid, unigram_baseline=args.unigram_baseline,
                 metric=args.metric, unique_tokens=dict(args.unique_tokens or []), progress=not args.quiet)
    out = Path(args.out)
    res = run_fit(uri, list(dict.fromkeys(args.experiment)), out, cfg, log=not args.no_log)
    r = res["results"]
    for obj, o in r["objectives"].items():
        iso, par = o.get("isoflop") or {}, o.get("parametric") or {}
        if "n_exponent" in iso:
            lo, hi = iso["n_exponent_ci95"] or (float("nan"), float("nan"))
            print(f"{obj}: N_opt ∝ C^{iso['n_exponent']:.3f} [{lo:.3f}, {hi:.3f}]  "
                  f"D_opt ∝ C^{iso['d_exponent']:.3f}")
            for w in iso.get("warnings") or []:
                print(f"{obj}: IsoFLOP warning: {w}")
        else:
            print(f"{obj}: IsoFLOP not fitted: {iso.get('reason')}")
        if "best" in par:
            b = par["best"]
            ae = par.get("allocation_exponent")
            print(f"{obj}: L = {_num(b['E'], '.4g')} + {_num(b['A'], '.4g')}/N^{_num(b['alpha'], '.4f')} + "
                  f"{_num(b['B'], '.4g')}/D^{_num(b['beta'], '.4f')}; beta/(alpha+beta) = {_num(ae, '.3f')}; "
                  f"{len(par['basins'])} basin(s)")
            for w in ([par.get("degenerate_reason")] if par.get("degenerate") else []) + (par.get("warnings") or []):
                print(f"{obj}: parametric warning: {w}")
        elif par.get("reason"):
            print(f"{obj}: parametric law not fitted: {par['reason']}")
        rep = o.get("repetition") or {}
        if rep.get("r_star") is not None:
            lo, hi = rep["r_star_ci95"] or (float("nan"), float("nan"))
            print(f"{obj}: repeated {rep['dataset']}: R* = {rep['r_star']:.3g} [{lo:.3g}, {hi:.3g}], "
                  f"U = {rep['unique_tokens']:.3g} tokens")
        elif rep:
            print(f"{obj}: repeated {rep['dataset']}: R* not identified: {rep['reason']}")
    print(f"wrote {len(res['files'])} file(s) to {out}/ in {res['seconds']:.0f}s"
          + (f"; MLflow analysis run {res['run_id']}" if res["run_id"] else ""))
    return 0


def _num(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _plan(args) -> int:
    import json

    from .plan import format_plan, plan
    from .results import clean_json, load_results
    from .trust import EXIT_UNUSABLE

    import math

    from protscale.errors import UserError

    if not (math.isfinite(args.budget_flops) and args.budget_flops > 0):
        raise UserError(f"--budget-flops {args.budget_flops:g}: must be a finite number > 0")
    res = load_results(args.results)
    p = plan(res, args.budget_flops, args.objective, data=args.data)
    print(json.dumps(clean_json(p), indent=1) if args.json else format_plan(p))
    return 0 if p["usable"] else EXIT_UNUSABLE
