"""Transfer law: effectively transferred tokens (Hernandez et al. 2021, "Scaling laws for transfer").

A *transfer run* is a trial initialised from another run (param ``init_from`` non-empty; its objective
is the *target*, ``init_objective`` the *source*). It is paired with a *scratch run* of the same
objective and size (|ΔN|/N < 2%) that starts from random weights, preferably at the same budget.

For a point of the transfer run that has seen D_F tokens of its own objective and reached loss L,
the scratch run needs D_S(L) tokens to reach L for the first time; the effectively transferred tokens are

    D_t = D_S(L) − D_F.

Both curves are read through their running minimum (the best loss reached so far, monotone), and
D_S(L) is interpolated linearly in (loss, log tokens) between the two scratch points that bracket L.
Points where the transfer run is already below anything the scratch run reached (D_S undefined) and
points with D_t ≤ 0 (no benefit) are counted and reported, not fitted.

Per run, points are taken at up to ``points_per_run`` log-spaced token counts from ``min_fraction`` of
the run's tokens to its end. The law D_t = k·D_F^a·N^b is fitted by least squares in log space
(b is left out, NaN, when all pairs share one N). Intervals come from a *wild cluster bootstrap* with
clusters = runs (points of one run are strongly correlated) and, as a second scheme, clusters = budgets:
each replicate refits y* = Xθ̂ + û·v_g with one weight v_g per cluster from Webb's six-point distribution,
so every replicate keeps every run and size. A sweep has few transfer runs (the paper: 6), and resampling
whole runs instead covered the truth 87% of the time at nominal 95% with 4–6 runs (``benchmarks/
calibration.py``): a replicate of 4 runs often holds only 2 sizes, which makes b erratic while a's spread
stays too narrow. The replicates of log k, a and b are also widened about the estimate by
``stats.few_cluster_factor(G)`` (Student's t with G − 1 degrees of freedom); the allocation's intervals use
the same samples: 97.5% (a) and 96.0% (b) coverage over 200 drawn sweeps. η (below) is resampled by runs
(by budgets in the second scheme): it is descriptive only.

The law holds for sources trained the way the measured ones were, so the fit also records that *source
rule*: the source tokens D_src = init_budget_flops / (6N) of the transfer runs as a power law of N,
D_src = s·N^q (q = 1 when all runs share one N). In the paper each CLM parent sits on the CLM
compute-optimal frontier for its size (e.g. 85M from 5.2e18 FLOPs, 470M from 1e20), and
``allocation.transfer_split`` prices pre-training with this rule. ``efficiency`` (D_t at a run's last
point over its source tokens) is reported as a description of the runs only: it is no part of the law.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .stats import block_counts, few_cluster_factor, hull, percentile_ci, simple_counts, widen

SIZE_TOL = 0.02


@dataclass
class TransferData:
    points: pd.DataFrame                       # run_id, scratch_run_id, n_params, budget, d_f, d_s, d_t, loss
    pairs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)


def _running_min(tokens: np.ndarray, loss: np.ndarray):
    order = np.argsort(tokens, kind="stable")
    t, l_ = tokens[order], loss[order]
    ok = np.isfinite(t) & np.isfinite(l_) & (t > 0)
    t, l_ = t[ok], l_[ok]
    return t, np.minimum.accumulate(l_) if l_.size else l_


def tokens_to_reach(tokens: np.ndarray, loss: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Tokens a curve needs to first reach each target loss (NaN where it never does)."""
    t, m = _running_min(np.asarray(tokens, float), np.asarray(loss, float))
    targets = np.asarray(targets, float)
    out = np.full(targets.shape, np.nan)
    if t.size == 0:
        return out
    # m is non-increasing; first index with m <= L
    neg = -m  # non-decreasing
    j = np.searchsorted(neg, -targets, side="left")
    for k, (L, i) in enumerate(zip(targets, j)):
        if i >= t.size or not np.isfinite(L):
            continue
        if i == 0:
            out[k] = t[0] if m[0] <= L else np.nan
            continue
        l0, l1 = m[i - 1], m[i]
        if l0 == l1:
            out[k] = t[i]
            continue
        frac = (l0 - L) / (l0 - l1)
        out[k] = float(np.exp(np.log(t[i - 1]) + frac * (np.log(t[i]) - np.log(t[i - 1]))))
    return out


def transfer_points(curves: pd.DataFrame, runs: pd.DataFrame, objective: str, *, points_per_run: int = 30,
                    min_fraction: float = 0.05) -> TransferData:
    """Effectively transferred tokens for every transfer run of ``objective`` (see module docstring).

    ``curves``: run_id, tokens, loss (clean curves); ``runs``: one row per run with run_id, objective,
    n_params, budget (the IsoFLOP budget label or the run's budget), init_from, init_objective,
    init_budget_flops.
    """
    # Runs in an order of their own (by run_id), not in the order a store lists them: a scratch partner is
    # the first of equally good candidates, and the points' order changes the fit in its last digits.
    runs = runs.set_index("run_id").sort_index(kind="stable")
    target = runs[(runs["objective"] == objective)]
    is_transfer = target["init_from"].fillna("").astype(str).str.len() > 0
    tr, sc = target[is_transfer], target[~is_transfer]
    rows, pairs, notes, unpaired = [], [], [], []
    by_run = {rid: g for rid, g in curves.groupby("run_id", sort=False)}
    n_beyond = n_neg = 0
    for rid, r in tr.iterrows():
        if rid not in by_run:
            continue
        cand = sc[np.abs(sc["n_params"] / r["n_params"] - 1) < SIZE_TOL]
        cand = cand[[c in by_run for c in cand.index]]
        if cand.empty:
            unpaired.append(rid)
            continue
        same = cand[np.isclose(cand["budget_flops"], r["budget_flops"], rtol=0.05)]
        pick = same if not same.empty else cand
        sid = pick["budget_flops"].idxmax() if pick["budget_flops"].notna().any() else pick.index[0]
        g, s = by_run[rid], by_run[sid]
        t, m = _running_min(g["tokens"].to_numpy(float), g["loss"].to_numpy(float))
        if t.size < 2:
            continue
        grid = np.exp(np.linspace(np.log(max(t[-1] * min_fraction, t[0])), np.log(t[-1]), points_per_run))
        idx = np.unique(np.clip(np.searchsorted(t, grid, side="left"), 0, t.size - 1))
        d_f, L = t[idx], m[idx]
        d_s = tokens_to_reach(s["tokens"].to_numpy(float), s["loss"].to_numpy(float), L)
        d_t = d_s - d_f
        beyond = ~np.isfinite(d_s)
        neg = np.isfinite(d_t) & (d_t <= 0)
        n_beyond += int(beyond.sum())
        n_neg += int(neg.sum())
        keep = np.isfinite(d_t) & (d_t > 0)
        d_src = _f(r.get("init_budget_flops"))
        d_src = d_src / (6.0 * float(r["n_params"])) if d_src else None
        last = float(d_t[keep][-1]) if keep.any() else None
        pairs.append({"run_id": rid, "scratch_run_id": sid, "n_params": float(r["n_params"]),
                      "budget_flops": _f(r.get("budget_flops")), "init_objective": _s(r.get("init_objective")),
                      "init_budget_flops": _f(r.get("init_budget_flops")), "n_points": int(keep.sum()),
                      "n_beyond_scratch": int(beyond.sum()), "n_no_benefit": int(neg.sum()),
                      "d_t_final": float(d_t[-1]) if np.isfinite(d_t[-1]) else None,
                      "d_f_final": float(d_f[-1]), "d_t_last": last, "d_source": d_src,
                      "efficiency": (last / d_src) if (last and d_src) else None})
        rows.append(pd.DataFrame({"run_id": rid, "scratch_run_id": sid, "n_params": float(r["n_params"]),
                                  "budget": r.get("budget", r.get("budget_flops")), "d_f": d_f[keep],
                                  "d_s": d_s[keep], "d_t": d_t[keep], "loss": L[keep]}))
    if n_beyond:
        notes.append(f"{n_beyond} transfer point(s) below the lowest loss of their scratch run: D_t undefined, not fitted")
    if n_neg:
        notes.append(f"{n_neg} transfer point(s) with D_t <= 0 (no benefit from the initialisation): not fitted")
    if unpaired:
        notes.append(f"{len(unpaired)} transfer run(s) without a scratch run of the same size and objective: "
                     + ", ".join(unpaired[:5]))
    pts = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["run_id", "scratch_run_id", "n_params", "budget", "d_f", "d_s", "d_t", "loss"])
    return TransferData(points=pts, pairs=pairs, notes=notes, unpaired=unpaired)


def _f(v):
    try:
        v = float(v)
        return v if np.isfinite(v) else None
    except (TypeError, ValueError):
        return None


def _s(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def _lstsq_batched(X: np.ndarray, y: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Weighted least squares for many weight vectors: X (n, p), y (n,), W (R, n) -> (R, p) (NaN if singular)."""
    XtWX = np.einsum("rn,ni,nj->rij", W, X, X)
    XtWy = np.einsum("rn,ni,n->ri", W, X, y)
    out = np.full((W.shape[0], X.shape[1]), np.nan)
    det_ok = np.abs(np.linalg.det(XtWX)) > 1e-12 * np.maximum(1.0, np.abs(XtWX).max(axis=(1, 2))) ** X.shape[1]
    if det_ok.any():
        out[det_ok] = np.linalg.solve(XtWX[det_ok], XtWy[det_ok][..., None])[..., 0]
    return out


#: Webb's six-point weights (mean 0, variance 1): many distinct replicates even with 4 clusters.
WEBB_WEIGHTS = np.array([-np.sqrt(1.5), -1.0, -np.sqrt(0.5), np.sqrt(0.5), 1.0, np.sqrt(1.5)])


def _wild_cluster(X: np.ndarray, y: np.ndarray, coef: np.ndarray, cluster: np.ndarray, n_boot: int,
                  rng: np.random.Generator) -> np.ndarray:
    """(n_boot, p) least-squares refits of y* = X·coef + residual·v[cluster], one Webb weight v per cluster."""
    fitted = X @ coef
    resid = y - fitted
    v = rng.choice(WEBB_WEIGHTS, size=(n_boot, int(cluster.max()) + 1))
    ys = fitted[None, :] + resid[None, :] * v[:, cluster]
    return np.linalg.lstsq(X, ys.T, rcond=None)[0].T


def fit_transfer(points: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, pairs: list[dict] | None = None
                 ) -> dict | None:
    """Fit log D_t = log k + a·log D_F + b·log N with wild cluster bootstrap intervals (runs; budgets).

    With ``pairs`` (from :func:`transfer_points`) it also reports the *transfer efficiency* η: per run,
    D_t at its last point where D_t is defined divided by the tokens of its pre-training
    (``init_budget_flops`` / 6N); η is the median over runs (bootstrap: runs resampled). η > 1 means a
    pre-training token was worth more than one token of the target objective.
    """
    if points.empty or points["run_id"].nunique() < 2:
        return None
    x_f = np.log(points["d_f"].to_numpy(float))
    x_n = np.log(points["n_params"].to_numpy(float))
    y = np.log(points["d_t"].to_numpy(float))
    with_n = np.unique(np.round(x_n, 6)).size >= 2
    X = np.column_stack([np.ones_like(y), x_f] + ([x_n] if with_n else []))
    coef = _lstsq_batched(X, y, np.ones((1, y.size)))[0]
    resid = y - X @ coef
    runs = points["run_id"].to_numpy()
    uniq, inv = np.unique(runs, return_inverse=True)
    eff = {p["run_id"]: p.get("efficiency") for p in (pairs or [])}
    eta = np.array([eff.get(u) if eff.get(u) is not None else np.nan for u in uniq], float)
    rng = np.random.default_rng(seed)
    boot = {}
    bud = np.asarray([str(b) for b in points.groupby("run_id")["budget"].first().reindex(uniq).to_numpy()])
    _, bud_inv = np.unique(bud, return_inverse=True)
    factors = {"run": few_cluster_factor(uniq.size), "budget": few_cluster_factor(int(bud_inv.max()) + 1)}
    for scheme in ("run", "budget"):
        rc = simple_counts(uniq.size, n_boot, rng) if scheme == "run" else block_counts(bud, n_boot, rng)
        cluster = inv if scheme == "run" else bud_inv[inv]
        cb = widen(_wild_cluster(X, y, coef, cluster, n_boot, rng), coef, factors[scheme])
        boot[scheme] = {"a": cb[:, 1], "b": cb[:, 2] if with_n else np.full(n_boot, np.nan),
                        "log_k": cb[:, 0], "eta": _weighted_medians(eta, rc)}
    res = {
        "k": float(np.exp(coef[0])), "a": float(coef[1]), "b": float(coef[2]) if with_n else None,
        "n_points": int(y.size), "n_runs": int(uniq.size),
        "rmse_log": float(np.sqrt(np.mean(resid ** 2))),
        "interval_widening": factors,
    }
    res["efficiency"] = float(np.median(eta[np.isfinite(eta)])) if np.isfinite(eta).any() else None
    res["source_rule"] = source_rule(pairs or [])
    for name in ("a", "b", "eta"):
        r_ci = percentile_ci(boot["run"][name])
        b_ci = percentile_ci(boot["budget"][name])
        key = "efficiency" if name == "eta" else name
        res[f"{key}_ci95_run"] = r_ci
        res[f"{key}_ci95_budget"] = b_ci
        res[f"{key}_ci95"] = hull(r_ci, b_ci)
    res["_boot"] = boot
    return res


def source_rule(pairs: list[dict]) -> dict | None:
    """How the measured runs' sources were trained: D_src = coefficient·N^exponent (least squares in logs
    over the transfer runs with a known source budget; exponent 1 when they share one size)."""
    pts = [(p["n_params"], p["d_source"]) for p in pairs if p.get("d_source") and p.get("n_params")]
    if not pts:
        return None
    n, d = (np.array(v, float) for v in zip(*pts))
    if np.unique(np.round(np.log(n), 6)).size >= 2:
        q, logs = np.polyfit(np.log(n), np.log(d), 1)
    else:
        q, logs = 1.0, float(np.median(np.log(d / n)))
    return {"coefficient": float(np.exp(logs)), "exponent": float(q), "n_runs": len(pts),
            "n_range": [float(n.min()), float(n.max())]}


def _weighted_medians(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median of ``values`` repeated ``counts[r]`` times, for each row r (NaN values ignored)."""
    out = np.full(counts.shape[0], np.nan)
    ok = np.isfinite(values)
    if not ok.any():
        return out
    v, cnt = values[ok], counts[:, ok]
    order = np.argsort(v)
    v, cnt = v[order], cnt[:, order]
    cum = np.cumsum(cnt, axis=1)
    tot = cum[:, -1]
    has = tot > 0
    lo = np.argmax(cum >= np.floor((tot[:, None] + 1) / 2.0), axis=1)   # 1-based position floor((T+1)/2)
    hi = np.argmax(cum >= np.floor(tot[:, None] / 2.0) + 1, axis=1)     # 1-based position floor(T/2) + 1
    out[has] = 0.5 * (v[lo[has]] + v[hi[has]])
    return out


def predict_dt(fit: dict, d_f, n) -> np.ndarray:
    b = fit.get("b") or 0.0
    return fit["k"] * np.asarray(d_f, float) ** fit["a"] * np.asarray(n, float) ** b
