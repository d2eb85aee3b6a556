"""Parametric loss law L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, "approach 3").

Fit: parameters θ = (e, a, b, α, β) with E = e^e, A = e^a, B = e^b; prediction in log space as a
log-sum-exp, log L̂ = LSE(e, a − α·log N, b − β·log D); objective = Σ_i w_i·Huber_δ(log L̂_i − log L_i)
with δ = 1e-3, *summed* over points (not averaged: the sum sets the scale of L-BFGS's tolerances the
way the original fits did). Minimised with L-BFGS from every point of a full initialisation grid:
all grid starts are run together by a vectorised L-BFGS (two-loop recursion, Armijo backtracking), then
every distinct end point is polished with SciPy's L-BFGS-B. End points are grouped into basins; every
basin whose objective is within ``basin_rel_tol`` of the best is reported with its allocation exponent
β/(α+β) (N_opt ∝ C^{β/(α+β)}, D_opt ∝ C^{α/(α+β)}).

The fit points are given by the caller (``fit_points``: one point per run at the end of its own
schedule — see ``points_from_curves``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import minimize

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


# ------------------------------------------------------------------------------------------------
# batched L-BFGS


def batched_lbfgs(fg, x0: np.ndarray, maxiter: int = 400, memory: int = 10, gtol: float = 1e-10,
                  ftol: float = 1e-13, max_backtracks: int = 40, merge=None, merge_every: int = 20):
    """Minimise S independent problems at once. ``fg(x, idx)`` returns f (k,), g (k, P) for rows ``idx``.

    L-BFGS two-loop recursion with Armijo backtracking; a start stops when its gradient is below
    ``gtol``, its relative decrease below ``ftol``, or its line search fails.

    ``merge(x, f) -> (reps, members)`` (optional, for problems sharing one objective): every
    ``merge_every`` iterations the running starts are grouped and only the best of each group goes on;
    the others are recorded as merged into it (``owner``) and take its end point.
    Returns x, f, iterations, owner (owner[i] = i unless start i was merged).
    """
    x = np.array(x0, dtype=float)
    S, P = x.shape
    all_idx = np.arange(S)
    f, g = fg(x, all_idx)
    Sh = np.zeros((S, memory, P))
    Yh = np.zeros((S, memory, P))
    rho = np.zeros((S, memory))
    gamma = 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1e-300)
    gamma = np.minimum(gamma, 1.0)
    active = np.isfinite(f)
    iters = np.zeros(S, dtype=int)
    t_last = np.ones(S)
    owner = np.arange(S)
    for it in range(maxiter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        if merge is not None and it > 0 and it % merge_every == 0 and idx.size > 1:
            reps, members = merge(x[idx], f[idx])
            for rep, mem in zip(reps, members):
                for m in mem:
                    if m != rep:
                        owner[idx[m]] = idx[rep]
                        active[idx[m]] = False
            idx = np.flatnonzero(active)
        Sa, Ya, ra = Sh[idx], Yh[idx], rho[idx]
        q = g[idx].copy()
        al = np.zeros((idx.size, memory))
        for i in range(memory):
            al[:, i] = ra[:, i] * np.einsum("kp,kp->k", Sa[:, i], q)
            q -= al[:, i:i + 1] * Ya[:, i]
        r = gamma[idx, None] * q
        for i in reversed(range(memory)):
            bt = ra[:, i] * np.einsum("kp,kp->k", Ya[:, i], r)
            r += Sa[:, i] * (al[:, i] - bt)[:, None]
        d = -r
        gd = np.einsum("kp,kp->k", g[idx], d)
        bad = ~(gd < 0) | ~np.isfinite(gd)
        if bad.any():  # not a descent direction: restart from steepest descent
            gi = g[idx[bad]]
            sc = np.minimum(1.0, 1.0 / np.maximum(np.linalg.norm(gi, axis=1), 1e-300))
            d[bad] = -gi * sc[:, None]
            gd[bad] = np.einsum("kp,kp->k", g[idx[bad]], d[bad])
            Sh[idx[bad]] = 0.0
            Yh[idx[bad]] = 0.0
            rho[idx[bad]] = 0.0
        # Armijo backtracking from a per-row initial step (twice the last accepted one, at most 1); rows
        # that fail try blocks of halvings at once, so each iteration makes few calls into ``fg``
        t = np.minimum(1.0, 2.0 * t_last[idx])
        f_new = np.full(idx.size, np.nan)
        g_new = np.zeros((idx.size, P))
        ft, gt = fg(x[idx] + t[:, None] * d, idx)
        ok = np.isfinite(ft) & (ft <= f[idx] + 1e-4 * t * gd)
        f_new[ok], g_new[ok] = ft[ok], gt[ok]
        pending = np.flatnonzero(~ok)
        k0 = 1
        for block in (3, 8, max_backtracks):
            if pending.size == 0 or k0 > max_backtracks:
                break
            ks = np.arange(k0, min(k0 + block, max_backtracks + 1))
            k0 = ks[-1] + 1
            rows = np.repeat(pending, ks.size)
            tr = (t[pending][:, None] * 0.5 ** ks[None, :]).ravel()
            ft, gt = fg(x[idx[rows]] + tr[:, None] * d[rows], idx[rows])
            okm = (np.isfinite(ft) & (ft <= f[idx[rows]] + 1e-4 * tr * gd[rows])).reshape(pending.size, ks.size)
            first = np.argmax(okm, axis=1)
            hit = okm[np.arange(pending.size), first]
            sel = np.arange(pending.size) * ks.size + first
            ph = pending[hit]
            f_new[ph], g_new[ph], t[ph] = ft[sel[hit]], gt[sel[hit]], tr[sel[hit]]
            pending = pending[~hit]
        failed = np.zeros(idx.size, dtype=bool)
        failed[pending] = True
        acc = ~failed
        ia = idx[acc]
        s_vec = t[acc, None] * d[acc]
        y_vec = g_new[acc] - g[ia]
        sy = np.einsum("kp,kp->k", s_vec, y_vec)
        yy = np.einsum("kp,kp->k", y_vec, y_vec)
        f_old = f[ia]
        x[ia] += s_vec
        f[ia] = f_new[acc]
        g[ia] = g_new[acc]
        iters[ia] += 1
        t_last[ia] = t[acc]
        upd = (sy > 1e-300) & (yy > 0)
        iu = ia[upd]
        Sh[iu] = np.roll(Sh[iu], 1, axis=1)
        Yh[iu] = np.roll(Yh[iu], 1, axis=1)
        rho[iu] = np.roll(rho[iu], 1, axis=1)
        Sh[iu, 0] = s_vec[upd]
        Yh[iu, 0] = y_vec[upd]
        rho[iu, 0] = 1.0 / sy[upd]
        gamma[iu] = sy[upd] / yy[upd]
        done = (np.abs(g[ia]).max(1) < gtol) | (f_old - f[ia] <= ftol * np.maximum(np.abs(f_old), 1e-300))
        active[ia[done]] = False
        active[idx[failed]] = False
    # resolve chains of merges and give merged starts their owner's end point
    for _ in range(64):
        nxt = owner[owner]
        if np.array_equal(nxt, owner):
            break
        owner = nxt
    x, f = x[owner], f[owner]
    return x, f, iters, owner


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


def _bootstrap_parametric(n, d, loss, blocks, fit: ParametricFit, *, n_boot: int = 200, seed: int = 0,
                         delta: float = HUBER_DELTA, maxiter: int = 400, progress: bool = False,
                         chunk: int = 100) -> dict:
    """Run-level (points resampled) and block-level (whole blocks, e.g. budgets, resampled) bootstrap.

    Each replicate is re-fitted from the best point and from every reported basin (the best objective
    among those starts wins), all replicates at once. Returns samples of α, β, E, A, B and the
    allocation exponent for both schemes.
    """
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    blocks = np.asarray(blocks)
    logN, logD, logL = np.log(n), np.log(d), np.log(loss)
    starts = [fit.theta] + [t for t in fit.basin_thetas[:4] if not np.allclose(t, fit.theta)]
    starts = np.array(starts)
    k = starts.shape[0]
    rng = np.random.default_rng(seed)
    out = {}
    prog = Progress("parametric bootstrap", 2 * n_boot, progress)
    done = 0
    for scheme in ("run", "budget"):
        counts = simple_counts(n.size, n_boot, rng) if scheme == "run" else block_counts(blocks, n_boot, rng)
        res = np.full((n_boot, 5), np.nan)
        for c0 in range(0, n_boot, chunk):
            cw = counts[c0:c0 + chunk]
            W = np.repeat(cw, k, axis=0)  # (b*k, n)
            X0 = np.tile(starts, (cw.shape[0], 1))

            def fg(x, idx, W=W):
                return objective_and_grad(x, logN, logD, logL, W[idx], delta)

            x, f, _, _ = batched_lbfgs(fg, X0, maxiter=maxiter)
            f = f.reshape(cw.shape[0], k)
            j = np.nanargmin(np.where(np.isfinite(f), f, np.inf), axis=1)
            res[c0:c0 + cw.shape[0]] = x.reshape(cw.shape[0], k, 5)[np.arange(cw.shape[0]), j]
            done += cw.shape[0]
            prog.update(done)
        out[scheme] = {
            "E": np.exp(res[:, 0]), "A": np.exp(res[:, 1]), "B": np.exp(res[:, 2]),
            "alpha": res[:, 3], "beta": res[:, 4],
            "allocation_exponent": allocation_exponent(res[:, 3], res[:, 4]),
        }
    return out


def summarize_bootstrap(boot: dict) -> dict:
    """95% percentile intervals per scheme and their hull, for α, β and the allocation exponent."""
    ci = {}
    for key in ("alpha", "beta", "allocation_exponent"):
        r = percentile_ci(boot["run"][key])
        b = percentile_ci(boot["budget"][key])
        ci[key] = {"run": r, "budget": b, "ci95": hull(r, b)}
    return ci


def points_from_curves(final_points: pd.DataFrame) -> pd.DataFrame:
    """The parametric fit uses one point per run: (N, D = tokens at the end, final loss)."""
    return final_points[["run_id", "n_params", "tokens", "loss", "budget"]].copy()
