"""Adaptive IsoFLOP placement replayed on the paper's released CLM curves.

"Training" a trial means revealing the final point of its logged curve. The replay reads the export
folder with the importer's parser (``tracking.tb_plan.scan``), keeps the points ``protscale fit`` would
keep for the IsoFLOP fit (data checks, final points at planned budgets, runs that reached their budget:
``checks.run_checks`` + ``checks.final_points``), and then:

1. fits the **full grid** (every such point) with ``isoflop.fit_isoflop``;
2. starts from a **coarse pass**: ``--coarse`` sizes per budget, evenly spread in log N over the sizes logged
   at that budget;
3. iterates ``placement.place`` (candidates = the sizes logged at each budget) and reveals what it asks
   for, until it says done.

It prints, for both, the trials and compute (Σ budget_flops = Σ 6·N·D) and the N_opt exponent with its 95%
interval, and the adaptive/full ratios.

    .venv/bin/python benchmarks/adaptive_replay.py              # one replay, wave by wave
    .venv/bin/python benchmarks/adaptive_replay.py --seeds 10   # 10 bootstrap seeds and the median
    .venv/bin/python benchmarks/adaptive_replay.py --logs ../shared/data/reference-logs/gpt_valid --target-width 0.1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from protscale.analysis import isoflop, placement
from protscale.analysis.checks import final_points, run_checks
from protscale.analysis.data import make_runs
from protscale.analysis.stats import single_thread_blas
from protscale.tracking import contract as c
from protscale.tracking.tb_plan import scan

DEFAULT_LOGS = Path(__file__).resolve().parents[1].parent / "shared/data/reference-logs/gpt_valid"


def logged_points(root: Path, objective: str = "clm") -> pd.DataFrame:
    """IsoFLOP points (run_id, n_params, loss, budget) the analyzer would fit from the logs under ``root``."""
    plan = scan(root)
    runs, curves = [], []
    for i, r in enumerate(plan.runs):
        if r.metric != c.VAL_LOSS or r.objective != objective or r.init_objective is not None:
            continue
        rid = f"r{i}"
        runs.append({"run_id": rid, "run_name": r.run_name, "objective": r.objective, "n_params": r.n,
                     "budget_flops": r.budget, "budget_source": r.budget_source, "status": "completed",
                     "kind": "trial", "source": "imported"})
        curves.append(pd.DataFrame({"run_id": rid, "step": np.arange(1, r.value.size + 1), "tokens": r.tokens,
                                    "flops": r.flops, "loss": r.value}))
    runs_df, curves_df = make_runs(pd.DataFrame(runs)), pd.concat(curves, ignore_index=True)
    clean_runs, clean_curves, _ = run_checks(runs_df, curves_df)
    fp = final_points(clean_runs, clean_curves)
    fp = fp[fp["reached"] & (fp["budget_source"] == "planned")]
    return fp.rename(columns={"final_loss": "loss"})[["run_id", "n_params", "loss", "budget"]].reset_index(drop=True)


def coarse_pass(avail: dict[float, dict[float, float]], k: int) -> dict[float, list[float]]:
    """k sizes per budget, evenly spread in log N over the sizes available there (nearest available)."""
    out = {}
    for b, sizes in avail.items():
        ns = np.array(sorted(sizes))
        if ns.size <= k:
            out[b] = list(ns)
            continue
        want = np.linspace(np.log10(ns[0]), np.log10(ns[-1]), k)
        pick: list[float] = []
        for w in want:
            left = [n for n in ns if n not in pick]
            pick.append(float(min(left, key=lambda n: abs(np.log10(n) - w))))
        out[b] = sorted(pick)
    return out


def _fmt(exp) -> str:
    return "not fittable" if exp is None else f"{exp[0]:.3f} [{exp[1]:.3f}, {exp[2]:.3f}] (width {exp[2] - exp[1]:.3f})"


def replay(pts: pd.DataFrame, args, seed: int, verbose: bool) -> dict:
    """One replay with bootstrap seed ``seed``: the full grid's fit, then coarse pass and placement waves."""
    avail: dict[float, dict[float, float]] = {}
    for b, n, loss in pts[["budget", "n_params", "loss"]].itertuples(index=False):
        avail.setdefault(float(b), {}).setdefault(float(n), float(loss))   # a repeated size: its first run
    full = isoflop.fit_isoflop(pts, n_boot=placement.N_BOOT, seed=seed).result
    full_exp = (full["n_exponent"], *full["n_exponent_ci95"])
    full_trials = sum(len(v) for v in avail.values())
    full_compute = sum(b * len(v) for b, v in avail.items())
    target = args.target_width if args.target_width is not None else args.comparable * (full_exp[2] - full_exp[1])

    revealed = {b: list(v) for b, v in coarse_pass(avail, args.coarse).items()}
    cands = {b: sorted(v) for b, v in avail.items()}
    if verbose:
        print(f"full grid: {full_trials} trials at {len(avail)} budgets; coarse pass: "
              f"{sum(len(v) for v in revealed.values())} trials; target width {target:.3f}")
    res = None
    for wave in range(1, args.max_waves + 1):
        points = [(b, n, avail[b][n]) for b, ns in revealed.items() for n in ns]
        res = placement.place(points, cands, per_budget=args.per_budget, target_width=target, seed=seed)
        used = sum(b * len(ns) for b, ns in revealed.items()) / full_compute
        if verbose:
            print(f"wave {wave}: {len(points)} trials, {used:.0%} of the compute, exponent {_fmt(res.exponent)}; "
                  + ("done: " if res.done else "next: ")
                  + (res.reason if res.done else
                     ", ".join(f"{b:.0e}: {', '.join(f'{n:.3g}' for n in ns)}" for b, ns in res.next_sizes.items())))
        if res.done:
            break
        for b, ns in res.next_sizes.items():
            bad = [n for n in ns if n not in avail[b] or n in revealed[b]]
            assert not bad, f"place() proposed sizes not available or already trained at {b:.3g}: {bad}"
            revealed[b].extend(ns)
    trials = sum(len(v) for v in revealed.values())
    compute = sum(b * len(v) for b, v in revealed.items())
    return {"seed": seed, "full": full_exp, "full_trials": full_trials, "full_compute": full_compute,
            "adaptive": res.exponent, "trials": trials, "compute": compute}


def _print_one(r: dict) -> None:
    full_exp, exp = r["full"], r["adaptive"]
    overlap = exp is not None and exp[1] <= full_exp[2] and full_exp[1] <= exp[2]
    print()
    print(f"{'':10s} {'trials':>6s} {'compute (FLOPs)':>16s}  N_opt exponent, 95% interval")
    print(f"{'full grid':10s} {r['full_trials']:6d} {r['full_compute']:16.3e}  {_fmt(full_exp)}")
    print(f"{'adaptive':10s} {r['trials']:6d} {r['compute']:16.3e}  {_fmt(exp)}")
    print(f"ratio adaptive/full: trials {r['trials'] / r['full_trials']:.2f}, compute "
          f"{r['compute'] / r['full_compute']:.2f}; intervals overlap: {'yes' if overlap else 'NO'}"
          + (f"; width ratio {(exp[2] - exp[1]) / (full_exp[2] - full_exp[1]):.2f}" if exp else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--logs", type=Path, default=DEFAULT_LOGS, help="folder of TensorBoard CSV exports (gpt_valid)")
    ap.add_argument("--coarse", type=int, default=3, help="sizes per budget in the first pass (default 3)")
    ap.add_argument("--per-budget", type=int, default=1,
                    help="sizes per budget and wave (default 1: one trial of the costliest budget at a time)")
    ap.add_argument("--target-width", type=float, default=None,
                    help="stop when the exponent's 95%% interval is this wide (default: --comparable × the full "
                         "grid's width)")
    ap.add_argument("--comparable", type=float, default=1.05,
                    help="default target width as a multiple of the full grid's (default 1.05)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed of a single replay, printed wave by wave")
    ap.add_argument("--seeds", type=int, default=0, metavar="K",
                    help="replay with bootstrap seeds 0..K-1 and print each and the median (the decisions to "
                         "stop depend on the bootstrap's Monte Carlo noise)")
    ap.add_argument("--max-waves", type=int, default=50)
    args = ap.parse_args(argv)
    if not args.logs.is_dir():
        print(f"{args.logs}: not a directory (the paper's gpt_valid exports)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with single_thread_blas():
        pts = logged_points(args.logs)
        if not args.seeds:
            _print_one(replay(pts, args, args.seed, verbose=True))
        else:
            rows = [replay(pts, args, s, verbose=False) for s in range(args.seeds)]
            print(f"{'seed':>4s} {'trials':>6s} {'compute':>8s} {'width ratio':>11s}  adaptive exponent")
            for r in rows:
                w = (r["adaptive"][2] - r["adaptive"][1]) / (r["full"][2] - r["full"][1])
                print(f"{r['seed']:4d} {r['trials'] / r['full_trials']:6.2f} {r['compute'] / r['full_compute']:8.2f} "
                      f"{w:11.2f}  {_fmt(r['adaptive'])}")
            print(f"median: trials {np.median([r['trials'] / r['full_trials'] for r in rows]):.2f}, compute "
                  f"{np.median([r['compute'] / r['full_compute'] for r in rows]):.2f} of the full grid "
                  f"({rows[0]['full_trials']} trials, {rows[0]['full_compute']:.3e} FLOPs)")
    print(f"({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
