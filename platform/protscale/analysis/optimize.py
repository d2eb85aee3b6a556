"""The shared optimizer: L-BFGS for many independent small problems at once (NumPy, no Python loop over
problems). The parametric law's fit runs every start of its initialisation grid through it, for the point
estimate and for every bootstrap replicate.
"""

from __future__ import annotations

import numpy as np


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
