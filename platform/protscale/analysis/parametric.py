"""Parametric loss law L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, "approach 3").

Fit: parameters θ = (e, a, b, α, β) with E = e^e, A = e^a, B = e^b; prediction in log space as a
log-sum-exp, log L̂ = LSE(e, a − α·log N, b − β·log D); objective = Σ_i w_i·Huber_δ(log L̂_i − log L_i)
with δ = 1e-3, *summed* over points (not averaged: the sum sets the scale of L-BFGS's tolerances the
way the original fits did). Minimised with L-BFGS from every point of a full initialisation grid:
all grid starts are run together by a vectorised L-BFGS (two-loop recursion, Armijo backtracking), then
every distinct end point is polished with SciPy's L-BFGS-B. End points are grouped into basins; every
basin whose objective is within ``basin_rel_tol`` of the best is reported with its allocation exponent
β/(α+β) (N_opt ∝ C^{β/(α+β)}, D_opt ∝ C^{α/(α+β)}).

The fit points are given by the caller: one point per run, (N, tokens, loss) at the end of its own
schedule (``pipeline._parametric``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from .optimize import batched_lbfgs
from .stats import Progress, block_counts, hull, percentile_ci, simple_counts, single_thread_blas

HUBER_DELTA = 1e-3
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")

#: Default initialisation grid (the Chinchilla grid): e, a, b, α, β.
DEFAULT_GRID = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}


#: A 3^5 = 243-start grid for quick looks and tests.
COARSE_GRID = {
    "e": (-1.0, 0.0, 1.0),
    "a": (0.0, 10.0, 20.0),
    "b": (0.0, 10.0, 20.0),
    "alpha": (0.25, 0.75, 1.5),
    "beta": (0.25, 0.75, 1.5),
}
GRIDS = {"full": DEFAULT_GRID, "coarse": COARSE_GRID}


# ------------------------------------------------------------------------------------------------
# objective


def objective_and_grad(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                       w: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Summed weighted Huber loss of log-sum-exp residuals and its gradient, batched.

    ``theta``: (S, 5) rows (e, a, b, α, β); ``logN``, ``logD``, ``logL``: (n,); ``w``: (S, n) or (n,).
    Returns f (S,) and grad (S, 5).
    """
    theta = np.atleast_2d(theta)
    e, a, b, al, be = (theta[:, i:i + 1] for i in range(5))
    u1 = np.broadcast_to(e, (theta.shape[0], logN.size))
    u2 = a - al * logN
    u3 = b - be * logD
    m = np.maximum(np.maximum(u1, u2), u3)
    x1, x2, x3 = np.exp(u1 - m), np.exp(u2 - m), np.exp(u3 - m)
    s = x1 + x2 + x3
    r = m + np.log(s) - logL
    ar = np.abs(r)
    h = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))
    psi = w * np.clip(r, -delta, delta)
    f = (w * h).sum(1)
    p1, p2, p3 = psi * x1 / s, psi * x2 / s, psi * x3 / s
    g = np.stack([p1.sum(1), p2.sum(1), p3.sum(1), -(p2 * logN).sum(1), -(p3 * logD).sum(1)], axis=1)
    return f, g


def predict_loss(params: dict, n, d) -> np.ndarray:
    """L̂(N, D) = E + A/N^α + B/D^β."""
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    return params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]


def theta_to_params(t) -> dict:
    return {"E": float(np.exp(t[0])), "A": float(np.exp(t[1])), "B": float(np.exp(t[2])),
            "alpha": float(t[3]), "beta": float(t[4])}


def params_to_theta(p) -> np.ndarray:
    if isinstance(p, dict):
        p = [p["E"], p["A"], p["B"], p["alpha"], p["beta"]]
    E, A, B, al, be = (float(v) for v in p)
    if min(E, A, B) <= 0:
        raise ValueError("E, A and B of an initial point must be positive")
    return np.array([np.log(E), np.log(A), np.log(B), al, be])


def allocation_exponent(alpha, beta):
    """N_opt ∝ C^{β/(α+β)} (NaN where α ≤ 0 or β ≤ 0: the law then has no compute-optimal size)."""
    alpha, beta = np.asarray(alpha, dtype=float), np.asarray(beta, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((alpha > 0) & (beta > 0), beta / (alpha + beta), np.nan)


def optimal_n(A, B, alpha, beta, compute):
    """N_opt = G·(C/6)^{β/(α+β)}, G = (αA/(βB))^{1/(α+β)} (Hoffmann et al. eq. 4), elementwise.

    Always real: NaN wherever the law has no compute-optimal size (α or β ≤ 0, A or B ≤ 0, C ≤ 0, or a
    non-finite input or result) -- never a complex number or an exception."""
    A, B, al, be, c = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (A, B, alpha, beta, compute)))
    ok = (np.isfinite(A) & np.isfinite(B) & np.isfinite(al) & np.isfinite(be) & np.isfinite(c)
          & (A > 0) & (B > 0) & (al > 0) & (be > 0) & (c > 0))
    with np.errstate(all="ignore"):
        s = al + be
        log_n = (np.log(np.where(ok, al * A, 1.0)) - np.log(np.where(ok, be * B, 1.0))) / np.where(ok, s, 1.0) \
            + be / np.where(ok, s, 1.0) * np.log(np.where(ok, c, 6.0) / 6.0)
        n = np.exp(log_n)
    n = np.where(ok & np.isfinite(n) & (n > 0), n, np.nan)
    return n if n.ndim else float(n)


def optimal_allocation(params: dict, compute):
    """Compute-optimal (N, D) of the fitted law under C = 6·N·D (Hoffmann et al. eq. 4); NaN where the law
    has none (see :func:`degenerate_reason`)."""
    n = optimal_n(params["A"], params["B"], params["alpha"], params["beta"], compute)
    with np.errstate(all="ignore"):
        return n, np.asarray(compute, dtype=float) / (6.0 * n)


def degenerate_reason(params: dict) -> str | None:
    """Why the fitted law has no usable compute-optimal allocation, or None when it has one.

    Degenerate: a non-finite parameter, α ≤ 0 (the loss does not fall with model size), β ≤ 0 (it does not
    fall with tokens), A or B ≤ 0, or a closed-form optimum that is not a finite real number."""
    vals = {k: params.get(k) for k in PARAM_NAMES}
    bad = [k for k, v in vals.items() if v is None or not np.isfinite(float(v))]
    if bad:
        return (f"degenerate parametric solution: non-finite parameter(s) {', '.join(bad)} (the fit did not "
                "converge to a usable law): no allocation is derived from it")
    al, be = float(vals["alpha"]), float(vals["beta"])
    why = []
    if al <= 0:
        why.append(f"α = {al:.3g} ≤ 0 (in the fitted law the loss does not fall as the model grows)")
    if be <= 0:
        why.append(f"β = {be:.3g} ≤ 0 (in the fitted law the loss does not fall with more tokens)")
    if float(vals["A"]) <= 0 or float(vals["B"]) <= 0:
        why.append("A or B ≤ 0")
    if not why and not np.isfinite(optimal_n(vals["A"], vals["B"], al, be, 1e20)):
        why.append("the closed-form optimum N_opt = (αA/(βB))^{1/(α+β)}·(C/6)^{β/(α+β)} is not a finite number")
    if not why:
        return None
    return ("degenerate parametric solution: " + "; ".join(why)
            + ": the law has no compute-optimal model size, so no allocation is derived from it")


def _polish(theta0: np.ndarray, logN, logD, logL, w, delta) -> tuple[np.ndarray, float]:
    def fun(t):
        f, g = objective_and_grad(t[None, :], logN, logD, logL, w[None, :], delta)
        return float(f[0]), g[0]

    res = minimize(fun, theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20})
    f0 = fun(theta0)[0]
    if not np.isfinite(res.fun) or res.fun > f0:
        return theta0, f0
    return res.x, float(res.fun)


# ------------------------------------------------------------------------------------------------
# basins


def _cluster(thetas: np.ndarray, fs: np.ndarray, logN: np.ndarray, logD: np.ndarray, rel_tol: float = 0.01,
             tol_exp: float = 0.02):
    """Greedy clustering of end points, best first, in physically meaningful coordinates: α, β (within
    ``tol_exp``) and E, A/N^α, B/D^β at the median N and D (within ``rel_tol`` × the median loss scale).
    ``E`` itself is compared on its own scale (not log E), so the many end points with E → 0 are one basin.
    Returns representative indices and member lists."""
    order = np.argsort(np.where(np.isfinite(fs), fs, np.inf))
    mN, mD = np.median(logN), np.median(logD)
    with np.errstate(over="ignore", invalid="ignore"):
        coords = np.stack([np.exp(thetas[:, 0]), np.exp(thetas[:, 1] - thetas[:, 3] * mN),
                           np.exp(thetas[:, 2] - thetas[:, 4] * mD)], axis=1)
    scale = np.nanmedian(coords.sum(1)[np.isfinite(fs)]) if np.isfinite(fs).any() else 1.0
    tol = rel_tol * (scale if np.isfinite(scale) and scale > 0 else 1.0)
    reps: list[int] = []
    members: list[list[int]] = []
    for i in order:
        if not np.isfinite(fs[i]) or not np.all(np.isfinite(coords[i])):
            continue
        if reps:
            ra = np.array(reps)
            close = ((np.abs(thetas[ra, 3] - thetas[i, 3]) < tol_exp) & (np.abs(thetas[ra, 4] - thetas[i, 4]) < tol_exp)
                     & (np.abs(coords[ra] - coords[i]).max(1) < tol))
            hit = np.flatnonzero(close)
            if hit.size:
                members[hit[0]].append(i)
                continue
        reps.append(i)
        members.append([i])
    return reps, members


def _physical(thetas: np.ndarray, logN: np.ndarray, logD: np.ndarray) -> np.ndarray:
    """(α, β, E, A/N^α, B/D^β) at the median N and D: coordinates in which basins are compared."""
    mN, mD = np.median(logN), np.median(logD)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.column_stack([thetas[:, 3], thetas[:, 4], np.exp(thetas[:, 0]),
                                np.exp(thetas[:, 1] - thetas[:, 3] * mN), np.exp(thetas[:, 2] - thetas[:, 4] * mD)])


def _merge_cells(thetas: np.ndarray, fs: np.ndarray, logN, logD, loss_scale: float, rel_tol: float = 2e-3,
                 tol_exp: float = 5e-3):
    """Fast grouping for the running starts: same cell of a grid with the given tolerances (best first)."""
    ph = _physical(thetas, logN, logD)
    scale = np.array([tol_exp, tol_exp, rel_tol * loss_scale, rel_tol * loss_scale, rel_tol * loss_scale])
    ok = np.all(np.isfinite(ph), axis=1) & np.isfinite(fs)
    cells = np.floor(np.where(ok[:, None], ph, 0.0) / scale).astype(np.int64)
    order = np.lexsort((fs,) + tuple(cells.T[::-1]))  # by cell, then by f
    reps, members = [], []
    cs = cells[order]
    new = np.ones(order.size, dtype=bool)
    new[1:] = np.any(cs[1:] != cs[:-1], axis=1)
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], order.size)
    for a, b in zip(starts, ends):
        grp = order[a:b]
        grp = grp[ok[grp]] if ok[grp].any() else grp[:1]
        if not ok[grp[0]]:
            # non-finite points are never merged
            for i in order[a:b]:
                reps.append(int(i))
                members.append([int(i)])
            continue
        reps.append(int(grp[0]))
        members.append([int(i) for i in order[a:b]])
    return reps, members


# ------------------------------------------------------------------------------------------------
# public API


@dataclass
class ParametricFit:
    best: dict
    objective: float
    basins: list[dict]
    n_points: int
    n_starts: int
    from_init: dict | None = None
    theta: np.ndarray = field(default=None, repr=False)
    basin_thetas: list = field(default_factory=list, repr=False)


def grid_starts(grid: dict | str | None = None) -> np.ndarray:
    g = GRIDS[grid] if isinstance(grid, str) else (grid or DEFAULT_GRID)
    return np.array(list(itertools.product(g["e"], g["a"], g["b"], g["alpha"], g["beta"])), dtype=float)


def _scipy_default_from(theta0, logN, logD, logL, w, delta):
    """SciPy L-BFGS-B with its default tolerances (what published fits typically ran)."""
    def fun(t):
        f, g = objective_and_grad(t[None, :], logN, logD, logL, w[None, :], delta)
        return float(f[0]), g[0]

    res = minimize(fun, theta0, jac=True, method="L-BFGS-B")
    return res.x, float(res.fun), int(res.nit), float(np.abs(res.jac).max())


def fit_parametric(*args, **kwargs) -> "ParametricFit":
    """Fit L(N, D) from every start of the grid; see :func:`_fit_parametric` and the module docstring."""
    with single_thread_blas():
        return _fit_parametric(*args, **kwargs)


def _own_order(n, d, loss, *more):
    """The points (and arrays aligned with them) sorted by (N, D, L): an order of their own, not the order
    a store lists its runs in (start order, which varies with how concurrent trials interleave), so the
    same runs give the same fit and the same bootstrap replicates."""
    o = np.lexsort((loss, d, n))
    return (n[o], d[o], loss[o], *(m[o] for m in more))


def _fit_parametric(n, d, loss, *, weights=None, grid: dict | None = None, init=None,
                   delta: float = HUBER_DELTA, basin_rel_tol: float = 0.02, max_basins: int = 12,
                   max_polish: int = 40, maxiter: int = 300) -> ParametricFit:
    """Fit L(N, D) from every start of the grid; see the module docstring.

    ``init``: optional extra initial point [E, A, B, α, β] (e.g. a paper's). Its fit is reported as
    ``from_init`` in two forms: ``scipy_default`` (SciPy L-BFGS-B with default tolerances from that
    point, the usual published procedure, which can stop early on this flat objective) and
    ``converged`` (the same start polished to convergence). The global optimum over the grid and that
    start is ``best``.
    """
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    ok = np.isfinite(n) & np.isfinite(d) & np.isfinite(loss) & (n > 0) & (d > 0) & (loss > 0)
    n, d, loss = n[ok], d[ok], loss[ok]
    w = np.ones(n.size) if weights is None else np.asarray(weights, dtype=float)[ok]
    n, d, loss, w = _own_order(n, d, loss, w)  # its sums round alike, so L-BFGS ends alike, in any order
    logN, logD, logL = np.log(n), np.log(d), np.log(loss)

    def fg(x, idx):
        return objective_and_grad(x, logN, logD, logL, w[None, :], delta)

    starts = grid_starts(grid)

    loss_scale = float(np.median(loss))

    def merge(xa, fa):
        return _merge_cells(xa, fa, logN, logD, loss_scale)

    x, f, _, _ = batched_lbfgs(fg, starts, maxiter=maxiter, ftol=1e-10, merge=merge)
    reps, members = _cluster(x, f, logN, logD)
    # polish the best distinct end points with SciPy's L-BFGS-B
    pol_t, pol_f, counts = [], [], []
    f0 = f[reps[0]] if reps else np.inf
    for k, (rep, mem) in enumerate(zip(reps, members)):
        # distinct end points that could still be near the optimum after polishing (and the best few)
        if k >= max_polish or (k >= 5 and f[rep] > f0 * (1 + 10 * basin_rel_tol)):
            break
        t, fv = _polish(x[rep], logN, logD, logL, w, delta)
        pol_t.append(t)
        pol_f.append(fv)
        counts.append(len(mem))
    from_init = None
    if init is not None:
        t0 = params_to_theta(init)
        ts, fs, nit, gmax = _scipy_default_from(t0, logN, logD, logL, w, delta)
        tc, fc = _polish(ts, logN, logD, logL, w, delta)
        sd, cv = theta_to_params(ts), theta_to_params(tc)
        sd.update(objective=fs, iterations=nit, max_abs_gradient=gmax,
                  allocation_exponent=float(allocation_exponent(sd["alpha"], sd["beta"])))
        cv.update(objective=fc, allocation_exponent=float(allocation_exponent(cv["alpha"], cv["beta"])))
        from_init = {"init": dict(zip(PARAM_NAMES, (float(v) for v in init))), "scipy_default": sd,
                     "converged": cv}
        pol_t.append(tc)
        pol_f.append(fc)
        counts.append(0)
    pol_t, pol_f = np.array(pol_t), np.array(pol_f)
    # polishing can merge basins: re-cluster the polished points, summing start counts
    reps2, members2 = _cluster(pol_t, pol_f, logN, logD)
    if not reps2:
        raise FloatingPointError("no finite end point in the parametric fit")
    fbest = pol_f[reps2[0]]
    basins, basin_thetas = [], []
    for rep, mem in zip(reps2, members2):
        if pol_f[rep] > fbest * (1 + basin_rel_tol) + 1e-15:
            continue
        p = theta_to_params(pol_t[rep])
        p.update(objective=float(pol_f[rep]), relative_objective=float(pol_f[rep] / fbest) if fbest > 0 else 1.0,
                 n_starts=int(sum(counts[m] for m in mem)),
                 allocation_exponent=float(allocation_exponent(p["alpha"], p["beta"])),
                 valid=bool(p["alpha"] > 0 and p["beta"] > 0))
        basins.append(p)
        basin_thetas.append(pol_t[rep])
        if len(basins) >= max_basins:
            break
    best_t = pol_t[reps2[0]]
    return ParametricFit(best=theta_to_params(best_t), objective=float(fbest), basins=basins,
                         n_points=int(n.size), n_starts=int(starts.shape[0]), from_init=from_init,
                         theta=best_t, basin_thetas=basin_thetas)


def bootstrap_parametric(*args, **kwargs) -> dict:
    """See :func:`_bootstrap_parametric`."""
    with single_thread_blas():
        return _bootstrap_parametric(*args, **kwargs)


#: Bootstrap refits: every grid start is scored on the replicate (``PRUNE_AFTER`` L-BFGS iterations: 0 =
#: its objective at the start), and the ``KEEP`` best distinct starts go on to convergence. Measured on
#: 16 replicates of the paper's CLM points (75 points, 4,500 starts): 0.23 s CPU per replicate for (0, 32),
#: 0.33 s for (1, 32), 0.55 s for (3, 24); (0, 32) came closest to the best optimum any setting found
#: (largest relative gap 1.4e-4, against 1.5e-3 for (3, 24)). On synthetic sweeps (0, 32) matched running
#: every start to convergence (gap < 1e-13) at 1/100 of its cost. ``benchmarks/calibration.py
#: --check-pruning`` repeats the comparison.
PRUNE_AFTER = 0
KEEP = 32
_MAX_ELEMENTS = 2_000_000   # rows × points per objective evaluation in the pruning stage (memory bound)


def refit_grid(logN, logD, logL, W: np.ndarray, starts: np.ndarray, *, delta: float = HUBER_DELTA,
               prune_after: int = PRUNE_AFTER, keep: int = KEEP, maxiter: int = 300):
    """Fit R weighted problems (rows of ``W``, bootstrap counts) from every start of the grid each.

    Every start of every problem runs ``prune_after`` iterations (problems in memory-bounded groups);
    per problem the ``keep`` best distinct points (by objective) then continue to convergence, all
    problems together. Returns the best θ per problem (R, 5), its objective (R,), and every converged
    end point with its objective ((R, keep, 5), (R, keep)) for counting basins.
    """
    R, S = W.shape[0], starts.shape[0]
    k = min(keep, S)
    sel = np.empty((R, k, 5))
    group = max(1, _MAX_ELEMENTS // (S * logN.size))
    for g0 in range(0, R, group):
        Wg = W[g0:g0 + group]
        rep = np.repeat(np.arange(Wg.shape[0]), S)

        def fg(x, idx, Wg=Wg, rep=rep):
            return objective_and_grad(x, logN, logD, logL, Wg[rep[idx]], delta)

        x0 = np.tile(starts, (Wg.shape[0], 1))
        if prune_after > 0:
            x, f, _, _ = batched_lbfgs(fg, x0, maxiter=prune_after)
        else:
            x, (f, _) = x0, fg(x0, np.arange(x0.shape[0]))
        x, f = x.reshape(-1, S, 5), np.where(np.isfinite(f), f, np.inf).reshape(-1, S)
        for r in range(Wg.shape[0]):
            order = np.argsort(f[r], kind="stable")
            # distinct: not within 1e-3 in every coordinate of a better kept point
            _, first = np.unique(np.round(x[r, order] / 1e-3).astype(np.int64), axis=0, return_index=True)
            pick = order[np.sort(first)[:k]]
            if pick.size < k:
                pick = np.concatenate([pick, order[:k - pick.size]])
            sel[g0 + r] = x[r, pick]
    rep2 = np.repeat(np.arange(R), k)

    def fg2(x, idx):
        return objective_and_grad(x, logN, logD, logL, W[rep2[idx]], delta)

    x2, f2, _, _ = batched_lbfgs(fg2, sel.reshape(-1, 5), maxiter=maxiter)
    x2, f2 = x2.reshape(R, k, 5), np.where(np.isfinite(f2), f2, np.inf).reshape(R, k)
    j = np.argmin(f2, axis=1)
    return x2[np.arange(R), j], f2[np.arange(R), j], x2, f2


def _basin_of(theta: np.ndarray, basins: list[np.ndarray], tol_exp: float = 0.02) -> int:
    """Index of the point estimate's basin whose (α, β) are within ``tol_exp`` of θ's, or -1."""
    for i, b in enumerate(basins):
        if abs(theta[3] - b[3]) < tol_exp and abs(theta[4] - b[4]) < tol_exp:
            return i
    return -1


def _bootstrap_parametric(n, d, loss, blocks, fit: ParametricFit, *, n_boot: int = 200, seed: int = 0,
                         delta: float = HUBER_DELTA, grid: dict | str | None = None, progress: bool = False,
                         chunk: int = 100, basin_rel_tol: float = 0.02) -> dict:
    """Run-level (points resampled) and block-level (whole blocks, e.g. budgets, resampled) bootstrap.

    Every replicate is re-fitted from the full initialisation grid (``refit_grid``), as the point
    estimate was: a replicate may land in another basin than the point estimate, and that spread is part
    of the uncertainty. Returns, per scheme, samples of α, β, E, A, B and the allocation exponent, and
    ``basins``: for each replicate the index of the point estimate's basin its optimum lies in (-1: none
    of them) and how many distinct basins lie within ``basin_rel_tol`` of its own optimum.
    """
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    n, d, loss, blocks = _own_order(n, d, loss, np.asarray(blocks))  # resampled by position below
    logN, logD, logL = np.log(n), np.log(d), np.log(loss)
    starts = grid_starts(grid)
    rng = np.random.default_rng(seed)
    out = {}
    prog = Progress("parametric bootstrap", 2 * n_boot, progress)
    try:
        done = 0
        ref_basins = list(fit.basin_thetas) or [fit.theta]
        for scheme in ("run", "budget"):
            counts = simple_counts(n.size, n_boot, rng) if scheme == "run" else block_counts(blocks, n_boot, rng)
            res = np.full((n_boot, 5), np.nan)
            which = np.full(n_boot, -1)
            near = np.zeros(n_boot, dtype=int)
            for c0 in range(0, n_boot, chunk):
                cw = counts[c0:c0 + chunk]
                best, fbest, ends, fends = refit_grid(logN, logD, logL, cw, starts, delta=delta)
                res[c0:c0 + cw.shape[0]] = best
                for r in range(cw.shape[0]):
                    which[c0 + r] = _basin_of(best[r], ref_basins)
                    ok = fends[r] <= fbest[r] * (1 + basin_rel_tol) + 1e-15
                    reps, _ = _cluster(ends[r][ok], fends[r][ok], logN, logD)
                    near[c0 + r] = len(reps)
                done += cw.shape[0]
                prog.update(done)
            with np.errstate(over="ignore"):       # a replicate far out in log A or log B is inf, not a warning
                E, A, B = np.exp(res[:, 0]), np.exp(res[:, 1]), np.exp(res[:, 2])
            out[scheme] = {
                "E": E, "A": A, "B": B,
                "alpha": res[:, 3], "beta": res[:, 4],
                "allocation_exponent": allocation_exponent(res[:, 3], res[:, 4]),
                "basin": which, "n_near_basins": near,
            }
    finally:
        prog.close()
    return out


def basin_spread(boot: dict, n_basins: int) -> dict:
    """How the replicates' optima spread over the point estimate's basins, per scheme: the share landing in
    each reported basin, elsewhere (``other``), and the distribution of near-optimal basins per replicate."""
    out = {}
    for scheme, b in boot.items():
        which = np.asarray(b["basin"])
        m = max(which.size, 1)
        out[scheme] = {"share_by_basin": [float(np.mean(which == i)) for i in range(n_basins)],
                       "share_other": float(np.mean(which < 0)),
                       "near_optimal_basins": {str(k): float(np.sum(b["n_near_basins"] == k) / m)
                                               for k in np.unique(b["n_near_basins"])}}
    return out


def summarize_bootstrap(boot: dict) -> dict:
    """95% percentile intervals per scheme and their hull, for α, β and the allocation exponent."""
    ci = {}
    for key in ("alpha", "beta", "allocation_exponent"):
        r = percentile_ci(boot["run"][key])
        b = percentile_ci(boot["budget"][key])
        ci[key] = {"run": r, "budget": b, "ci95": hull(r, b)}
    return ci
