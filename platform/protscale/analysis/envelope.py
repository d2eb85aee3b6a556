"""Compute envelope: the lowest loss reached by any run at each compute → L(C) = a·C^b.

Every clean scratch run's curve is interpolated (loss linear in log C) onto a common log-spaced grid of
``n_grid`` compute values between the smallest and the largest compute at which a run *ends* (below the
smallest run end, the envelope would be made of warm-up points only). The envelope at C is the minimum
over the runs that cover C. The power law is a least-squares line in (log C, log L) over the grid.

Bootstrap (95% percentile): run-level (runs resampled with replacement; the envelope is a minimum, so a
replicate is the envelope of the distinct runs it drew) and budget-blocked (whole budgets resampled).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from protscale.errors import UserError

from .stats import block_counts, hull, percentile_ci, simple_counts, weighted_line


def interpolate_runs(curves: pd.DataFrame, grid: np.ndarray) -> tuple[np.ndarray, list]:
    """(R, G) matrix of each run's loss at the grid compute values (inf where the run does not cover C)."""
    lg = np.log(grid)
    rows, ids = [], []
    for rid, g in curves.groupby("run_id", sort=True):
        f = g["flops"].to_numpy(float)
        L = g["loss"].to_numpy(float)
        ok = np.isfinite(f) & np.isfinite(L) & (f > 0)
        f, L = f[ok], L[ok]
        if f.size < 2:
            continue
        o = np.argsort(f, kind="stable")
        lf, L = np.log(f[o]), L[o]
        v = np.interp(lg, lf, L, left=np.inf, right=np.inf)
        rows.append(v)
        ids.append(rid)
    return (np.array(rows) if rows else np.zeros((0, grid.size))), ids


def fit_envelope(curves: pd.DataFrame, run_blocks: dict, *, n_grid: int = 40, n_boot: int = 1000,
                 seed: int = 0, objective: str = "") -> dict:
    """``curves``: run_id, flops, loss; ``run_blocks``: run_id -> budget label (for blocked resampling)."""
    label = f"objective {objective}: " if objective else ""
    ends = curves.groupby("run_id")["flops"].max()
    ends = ends[np.isfinite(ends) & (ends > 0)]
    if ends.size < 2 or ends.max() <= ends.min() * 1.01:
        raise UserError(f"{label}the envelope L(C) needs runs ending at two or more different computes")
    grid = np.exp(np.linspace(np.log(ends.min()), np.log(ends.max()), n_grid))
    M, ids = interpolate_runs(curves, grid)
    env = M.min(0)
    ok = np.isfinite(env)
    lc, ll = np.log(grid), np.where(ok, np.log(np.where(ok, env, 1.0)), np.nan)
    b, loga = weighted_line(lc, ll, ok[None, :].astype(float))
    rng = np.random.default_rng(seed)
    R = len(ids)
    blocks = np.array([str(run_blocks.get(r, r)) for r in ids])
    samples, intercepts = {}, {}
    for scheme in ("run", "budget"):
        C = simple_counts(R, n_boot, rng) if scheme == "run" else block_counts(blocks, n_boot, rng)
        out_b, out_i = np.empty(n_boot), np.empty(n_boot)
        for c0 in range(0, n_boot, 250):
            sel = C[c0:c0 + 250] > 0                                   # (B, R)
            Mb = np.where(sel[:, :, None], M[None, :, :], np.inf).min(1)  # (B, G)
            okb = np.isfinite(Mb)
            yb = np.where(okb, np.log(np.where(okb, Mb, 1.0)), np.nan)
            s, i = weighted_line(lc, yb, okb.astype(float))
            out_b[c0:c0 + 250], out_i[c0:c0 + 250] = s, i
        samples[scheme], intercepts[scheme] = out_b, out_i
    ci_r, ci_b = percentile_ci(samples["run"]), percentile_ci(samples["budget"])
    return {
        "a": float(np.exp(loga[0])), "b": float(b[0]),
        "b_ci95": hull(ci_r, ci_b), "b_ci95_run": ci_r, "b_ci95_budget": ci_b,
        "compute_range": [float(grid[0]), float(grid[-1])], "n_runs": int(R),
        "grid": [float(v) for v in grid], "envelope": [float(v) if np.isfinite(v) else None for v in env],
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed)},
        # for the band of the plot: up to 400 [b, ln a] pairs per scheme
        "bootstrap_samples": {k: [[float(f"{b_:.6g}"), float(f"{i_:.6g}")] for b_, i_ in
                                  zip(samples[k], intercepts[k]) if np.isfinite(b_) and np.isfinite(i_)][:400]
                              for k in samples},
        "bootstrap_samples_columns": ["b", "ln_a"],
    }
