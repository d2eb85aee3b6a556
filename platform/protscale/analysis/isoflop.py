"""IsoFLOP profiles (Hoffmann et al. 2022, "approach 2") → N_opt(C), D_opt(C).

Which points: one point per run, its *final* loss at the end of its own schedule, at the run's budget.
A run trained with a schedule ending at budget C is only "at C" at its end: intermediate points of a
cosine schedule are not what a run with budget C would reach, and using them biases the profile. So
imported curves that pass several budgets contribute only their end point (at their own budget, or the
compute where the curve ends when no budget is known); see ``checks.final_points`` for how budgets
close to each other (within 5% in C) are merged into one IsoFLOP slice.

Per budget, loss vs x = log10 N is fitted by a parabola (least squares); its vertex is N_opt(C). A
budget gives no vertex when it has fewer than 3 distinct sizes, when the parabola is not convex, or when
the vertex lies outside the sampled sizes (the minimum is not bracketed: an extrapolated vertex is not
a measurement). Those budgets are reported and left out. The frontier is the least-squares line
log10 N_opt = n·log10 C + c over budgets; D_opt = C / (6·N_opt), so its exponent is 1 − n.

When no frontier can be fitted, the per-budget *empirical* optimum (the best run observed at each budget,
``empirical_optima``) still says where the minimum lies relative to the grid, and ``grid_advice`` turns that
into plain advice (e.g. "extend the grid towards smaller models" when every budget's best run is the
smallest size sampled).

Uncertainty (percentile bootstrap, 95%): *run-level* — a residual bootstrap over the fixed design of
sizes: every run's loss is its budget's parabola plus a residual drawn from the pool of all budgets'
residuals (each budget's scaled by sqrt(n/(n-3)) for the 3 fitted coefficients; a budget of 3 sizes has
none of its own; with under ``MIN_RESIDUAL_DOF`` residual degrees of freedom in all, runs are resampled
within each budget instead), every parabola and the frontier refitted (a budget whose replicate has no bracketed
vertex drops out of that replicate); *budget-blocked* — whole budgets resampled with their vertices
(captures the scatter of budgets around the line). ``n_exponent_ci95`` is the hull of both.

Why residuals rather than resampling runs: a grid's sizes are chosen, not drawn, and resampling 5-8 runs
per budget often leaves 3 distinct sizes, whose parabola swings wildly. On 400 synthetic sweeps
(``benchmarks/calibration.py``) runs resampled within budgets gave the hull 99.5% coverage at nominal 95%
(median width 0.165); pooled residuals give 98.0% (width 0.113), the run-level interval alone 94.5%.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from protscale.errors import UserError

from .stats import block_counts, hull, percentile_ci, stratified_counts, weighted_line

MIN_SIZES = 3
MIN_RESIDUAL_DOF = 4   # residual degrees of freedom (runs − 3 per budget) for the residual bootstrap


class FrontierNotFitted(UserError):
    """No frontier: fewer than two budgets give a vertex. Carries what was learnt per budget."""

    def __init__(self, msg: str, *, dropped: list | None = None, profiles: list | None = None,
                 n_budgets: int = 0, n_used: int = 0):
        super().__init__(msg)
        self.dropped = dropped or []
        self.profiles = profiles or []
        self.n_budgets = n_budgets
        self.n_used = n_used


def _parabola_batched(x: np.ndarray, y: np.ndarray, W: np.ndarray):
    """Weighted parabola fits y = c0 + c1·u + c2·u², u = x − mean(x), for each weight row.

    Returns (c (R, 3), center, n_distinct (R,)); rows with < 3 distinct x carry NaN coefficients."""
    center = float(np.mean(x))
    u = x - center
    X = np.column_stack([np.ones_like(u), u, u * u])
    XtWX = np.einsum("rn,ni,nj->rij", W, X, X)
    XtWy = np.einsum("rn,ni,n->ri", W, X, y)
    ux = np.unique(np.round(x, 9), return_inverse=True)[1]
    k = ux.max() + 1
    present = np.zeros((W.shape[0], k))
    np.add.at(present, (slice(None), ux), W)
    n_distinct = (present > 0).sum(1)
    c = np.full((W.shape[0], 3), np.nan)
    ok = n_distinct >= MIN_SIZES
    if ok.any():
        c[ok] = np.linalg.solve(XtWX[ok], XtWy[ok][..., None])[..., 0]
    return c, center, n_distinct


def _vertex(c: np.ndarray, center: float, lo: float, hi: float):
    """Vertex x and its loss; NaN where not convex or outside [lo, hi]."""
    with np.errstate(invalid="ignore", divide="ignore"):
        xv = center - c[:, 1] / (2 * c[:, 2])
        lv = c[:, 0] - c[:, 1] ** 2 / (4 * c[:, 2])
    ok = (c[:, 2] > 0) & (xv >= lo) & (xv <= hi)
    return np.where(ok, xv, np.nan), np.where(ok, lv, np.nan)


def _design(e: dict) -> np.ndarray:
    u = e["x"] - e["center"]
    return np.column_stack([np.ones_like(u), u, u * u])


def _run_bootstrap_vertices(used: list[dict], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, budgets) vertices refitted to parabola + pooled residuals (see the module docstring).

    With fewer than ``MIN_RESIDUAL_DOF`` residual degrees of freedom over all budgets (a coarse pass of 3
    sizes each has none) the noise cannot be estimated from residuals, and runs are resampled within each
    budget instead: a wide, conservative interval until more sizes are trained."""
    dof = sum(e["x"].size - 3 for e in used)
    xv_boot = np.full((n_boot, len(used)), np.nan)
    if dof < MIN_RESIDUAL_DOF:
        for j, e in enumerate(used):
            c, center, _ = _parabola_batched(e["x"], e["y"], stratified_counts(np.zeros(e["x"].size), n_boot, rng))
            xv_boot[:, j], _ = _vertex(c, center, e["x"].min(), e["x"].max())
        return xv_boot
    pool = np.concatenate([(e["y"] - _design(e) @ e["coef"]) * np.sqrt(e["x"].size / (e["x"].size - 3))
                           for e in used if e["x"].size > 3])
    for j, e in enumerate(used):
        X = _design(e)
        Y = X @ e["coef"] + pool[rng.integers(0, pool.size, (n_boot, e["x"].size))]
        c = np.linalg.lstsq(X, Y.T, rcond=None)[0].T
        xv_boot[:, j], _ = _vertex(c, e["center"], e["x"].min(), e["x"].max())
    return xv_boot


@dataclass
class IsoflopFit:
    result: dict          # JSON-ready
    boot: dict            # scheme -> (slope samples, intercept samples)
    profiles: list        # per budget: dict with points and parabola for plots


def fit_isoflop(points: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, objective: str = "") -> IsoflopFit:
    """``points``: one row per run: run_id, n_params, loss (final), budget (IsoFLOP budget label).

    Raises UserError when fewer than two budgets give a vertex.
    """
    label = f"objective {objective}: " if objective else ""
    # The bootstraps resample rows by position: fit the points in an order of their own, not in the order
    # a store lists its runs (start order, which varies with how concurrent trials interleave), so the same
    # runs give the same intervals.
    pts = _finite(points).sort_values(["budget", "n_params", "loss"], kind="stable").reset_index(drop=True)
    if pts.empty:
        raise FrontierNotFitted(f"{label}no finite final losses to fit an IsoFLOP profile")
    budgets = np.sort(pts["budget"].unique())
    per_budget, dropped = [], []
    for b in budgets:
        g = pts[pts["budget"] == b]
        nd = g["n_params"].round(0).nunique()
        if nd < MIN_SIZES:
            dropped.append({"budget": float(b), "reason": f"only {nd} model size(s) (need {MIN_SIZES})",
                            "n_runs": int(len(g))})
            continue
        x = np.log10(g["n_params"].to_numpy(float))
        y = g["loss"].to_numpy(float)
        c, center, _ = _parabola_batched(x, y, np.ones((1, x.size)))
        xv, lv = _vertex(c, center, x.min(), x.max())
        entry = {"budget": float(b), "x": x, "y": y, "run_ids": g["run_id"].tolist(), "coef": c[0],
                 "center": center, "xv": float(xv[0]), "lv": float(lv[0])}
        if not np.isfinite(xv[0]):
            why = ("parabola not convex" if not c[0, 2] > 0 else
                   "minimum not bracketed by the sampled sizes (vertex outside them)")
            dropped.append({"budget": float(b), "reason": why, "n_runs": int(len(g))})
            entry["used"] = False
        else:
            entry["used"] = True
        per_budget.append(entry)
    used = [e for e in per_budget if e["used"]]
    if len(used) < 2:
        reasons = "; ".join(f"{d['budget']:.3g}: {d['reason']}" for d in dropped) or "none dropped"
        raise FrontierNotFitted(
            f"{label}no IsoFLOP frontier: it needs at least 2 budgets whose loss minimum is bracketed by "
            f">= {MIN_SIZES} sampled model sizes; {len(used)} of {len(budgets)} budget(s) have one ({reasons})",
            dropped=dropped, profiles=per_budget, n_budgets=len(budgets), n_used=len(used))
    logC = np.log10([e["budget"] for e in used])
    xv = np.array([e["xv"] for e in used])
    slope, icpt = weighted_line(logC, xv, np.ones((1, xv.size)))
    n_exp, c0 = float(slope[0]), float(icpt[0])

    rng = np.random.default_rng(seed)
    xv_boot = _run_bootstrap_vertices(used, n_boot, rng)
    s_run, i_run = weighted_line(logC, xv_boot, np.isfinite(xv_boot).astype(float))
    # budget-blocked
    W = block_counts(np.arange(len(used)), n_boot, rng)
    s_bud, i_bud = weighted_line(logC, xv, W)
    boot = {"run": (s_run, i_run), "budget": (s_bud, i_bud)}
    ci_run, ci_bud = percentile_ci(s_run), percentile_ci(s_bud)
    ci = hull(ci_run, ci_bud)

    def d_ci(iv):
        return None if iv is None else [1.0 - iv[1], 1.0 - iv[0]]

    result = {
        "n_exponent": n_exp,
        "n_exponent_ci95": ci,
        "n_exponent_ci95_run": ci_run,
        "n_exponent_ci95_budget": ci_bud,
        "n_coefficient": float(10 ** c0),
        "d_exponent": 1.0 - n_exp,
        "d_exponent_ci95": d_ci(ci),
        "d_exponent_ci95_run": d_ci(ci_run),
        "d_exponent_ci95_budget": d_ci(ci_bud),
        "d_coefficient": float(10 ** (-c0) / 6.0),
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed),
                      "failed_fraction_run": float(np.mean(~np.isfinite(s_run))),
                      "failed_fraction_budget": float(np.mean(~np.isfinite(s_bud)))},
        "budgets": [
            {"budget": e["budget"], "n_runs": int(e["x"].size), "n_sizes": int(np.unique(np.round(e["x"], 9)).size),
             "used": e["used"], "n_opt": float(10 ** e["xv"]) if np.isfinite(e["xv"]) else None,
             "d_opt": float(e["budget"] / (6 * 10 ** e["xv"])) if np.isfinite(e["xv"]) else None,
             "loss_opt": float(e["lv"]) if np.isfinite(e["lv"]) else None,
             "n_opt_ci95_run": (lambda iv: None if iv is None else [10 ** iv[0], 10 ** iv[1]])(
                 percentile_ci(xv_boot[:, used.index(e)])) if e["used"] else None,
             "parabola": [float(v) for v in e["coef"]], "parabola_center_log10n": e["center"]}
            for e in per_budget],
        "dropped_budgets": dropped,
    }
    return IsoflopFit(result=result, boot=boot, profiles=per_budget)


def frontier_samples(fit: IsoflopFit) -> dict:
    """Bootstrap (slope, intercept) pairs per scheme, finite only (for results.json and plan)."""
    out = {}
    for k, (s, i) in fit.boot.items():
        ok = np.isfinite(s) & np.isfinite(i)
        out[k] = np.column_stack([s[ok], i[ok]])
    return out


def predict_n_opt(slope, intercept, compute):
    return 10 ** (np.asarray(intercept, float) + np.asarray(slope, float) * np.log10(compute))


# ------------------------------------------------------------------------------------------------
# empirical optima and advice on the grid (also when no frontier can be fitted)


def _finite(points: pd.DataFrame) -> pd.DataFrame:
    return points[np.isfinite(points["loss"]) & (points["n_params"] > 0)].copy()


def empirical_optima(points: pd.DataFrame) -> list[dict]:
    """Per budget, the best run observed (lowest final loss) and whether it sits at the edge of the sizes
    sampled at that budget: ``edge`` = "smallest" / "largest" (the minimum may lie beyond the grid) or None
    (inside the grid, or a single size)."""
    pts = _finite(points)
    out = []
    for b in np.sort(pts["budget"].unique()) if len(pts) else []:
        g = pts[pts["budget"] == b]
        sizes = np.unique(g["n_params"].round(0).to_numpy(float))
        i = int(np.argmin(g["loss"].to_numpy(float)))
        n_best = float(g["n_params"].iloc[i])
        edge = None
        if sizes.size >= 2:
            if round(n_best) <= sizes[0]:
                edge = "smallest"
            elif round(n_best) >= sizes[-1]:
                edge = "largest"
        out.append({"budget": float(b), "n_runs": int(len(g)), "n_sizes": int(sizes.size),
                    "n_min": float(g["n_params"].min()), "n_max": float(g["n_params"].max()), "n_best": n_best,
                    "d_best": float(b / (6 * n_best)), "loss_best": float(g["loss"].iloc[i]),
                    "run_id_best": str(g["run_id"].iloc[i]), "edge": edge})
    return out


def _step(sizes_lo: float, sizes_hi: float, n_sizes: int) -> float:
    """Typical ratio between neighbouring sizes of a budget's grid (at least 2)."""
    if n_sizes < 2 or not sizes_hi > sizes_lo > 0:
        return 3.0
    return float(max(2.0, (sizes_hi / sizes_lo) ** (1.0 / (n_sizes - 1))))


def grid_advice(empirical: list[dict], dropped: list[dict] | None = None) -> dict:
    """Plain advice on how to extend the sweep so that IsoFLOP minima are bracketed.

    Returns {"direction": "smaller" | "larger" | "both" | None, "messages": [str]}."""
    dropped = dropped or []
    small = [e for e in empirical if e["edge"] == "smallest"]
    large = [e for e in empirical if e["edge"] == "largest"]
    msgs = []

    def budgets(es):
        return ", ".join(f"{e['budget']:.3g}" for e in es)

    if small:
        e0 = min(small, key=lambda e: e["n_min"])
        r = _step(e0["n_min"], e0["n_max"], e0["n_sizes"])
        every = "every budget" if len(small) == len(empirical) else f"budget(s) {budgets(small)}"
        msgs.append(f"At {every} the best run is the smallest model sampled (N = {e0['n_min']:.3g}): the loss "
                    f"minimum lies at or below the smallest size, so extend the grid towards smaller models "
                    f"(e.g. N ≈ {e0['n_min'] / r:.3g} and {e0['n_min'] / r ** 2:.3g}), or use larger compute "
                    "budgets, which move the optimum up into the sizes sampled.")
    if large:
        e0 = max(large, key=lambda e: e["n_max"])
        r = _step(e0["n_min"], e0["n_max"], e0["n_sizes"])
        every = "every budget" if len(large) == len(empirical) else f"budget(s) {budgets(large)}"
        msgs.append(f"At {every} the best run is the largest model sampled (N = {e0['n_max']:.3g}): the loss "
                    f"minimum lies at or above the largest size, so extend the grid towards larger models "
                    f"(e.g. N ≈ {e0['n_max'] * r:.3g} and {e0['n_max'] * r ** 2:.3g}), or use smaller compute "
                    "budgets, which move the optimum down into the sizes sampled.")
    few = [d for d in dropped if d["reason"].startswith("only")]
    if few:
        msgs.append(f"Budget(s) {budgets(few)} have fewer than {MIN_SIZES} model "
                    f"sizes: train at least {MIN_SIZES} sizes (better 5 or more) at each budget.")
    inner = {e["budget"] for e in empirical if e["edge"] is None and e["n_sizes"] >= MIN_SIZES}
    flat = [d for d in dropped if d["reason"] == "parabola not convex" and d["budget"] in inner]
    if flat:
        msgs.append(f"Budget(s) {budgets(flat)}: the best run is inside the grid "
                    "but the loss profile is not convex (losses too noisy or too flat over the sizes sampled): "
                    "add sizes around the best one or repeat runs with other seeds.")
    direction = "both" if small and large else "smaller" if small else "larger" if large else None
    return {"direction": direction, "messages": msgs}
