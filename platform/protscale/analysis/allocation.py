"""Allocation of a compute budget, from a fitted ``results.json`` dict.

Single objective (``compute_optimal``): N_opt and D_opt = C/(6·N_opt) at budget C from the IsoFLOP
frontier (primary) and from the parametric law (N_opt = G·(C/6)^{β/(α+β)}, G = (αA/(βB))^{1/(α+β)}),
each with a 95% interval: the bootstrap samples stored in results.json are pushed through the same
formula, percentile intervals taken per scheme (run-level, budget-blocked) and their hull reported.

Transfer split (``transfer_split``, e.g. CLM pre-training then MLM): a model of size N spends a fraction
f of the total budget C on the source objective (D_src = f·C/(6N) tokens) and the rest on the target
(D_F = (1−f)·C/(6N) tokens). The target run is then worth a scratch run trained on

    D_eff = D_F + min(k·D_F^a·N^b, η·D_src)

tokens: the transfer law gives the credit a pre-trained start earns over D_F target tokens, and η, the
transfer efficiency measured on the transfer runs (target tokens earned per pre-training token, median
over runs; see ``transfer.fit_transfer``), caps it by what the pre-training actually paid for. The
fitted law does not depend on how long the source was trained, so without a cap any sliver of
pre-training would earn the full credit; with η ≤ 1 pre-training never beats spending the same compute
on the target, and the answer is f = 0. (N, f) minimise the target's parametric law L(N, D_eff) over a
grid (f from 0 to 0.95); f = 0 is training from scratch. Intervals: the same optimisation for paired
bootstrap samples (parametric sample i with transfer sample i), per scheme, hull.

A degenerate parametric law (α or β ≤ 0, non-finite parameters: ``parametric.degenerate_reason``) has no
compute-optimal size; it yields ``{"status": "skipped", "reason": ...}`` instead of numbers, and bootstrap
samples that are degenerate are left out of the intervals. No closed form here raises or returns a
complex number.
"""

from __future__ import annotations

import numpy as np

from .parametric import degenerate_reason, optimal_n
from .stats import hull, percentile_ci

F_GRID = np.linspace(0.0, 0.95, 96)


def _ci_hull(per_scheme: dict) -> list | None:
    return hull(*(percentile_ci(v) for v in per_scheme.values()))


def _isoflop_ok(iso) -> bool:
    return isinstance(iso, dict) and "n_exponent" in iso


def _param_ok(par) -> bool:
    return isinstance(par, dict) and "best" in par


def _param_problem(par) -> str | None:
    """None when the parametric law can allocate compute; else why not."""
    if not _param_ok(par):
        return (par.get("reason") if isinstance(par, dict) else None) or "no parametric fit"
    return degenerate_reason(par["best"])


def _transfer_ok(tr) -> bool:
    return isinstance(tr, dict) and "k" in tr


def _opt_param(E, A, B, al, be, C):
    """N_opt of the parametric law; NaN (never complex) where it has none."""
    return optimal_n(A, B, al, be, C)


def compute_optimal(obj_res: dict, compute: float) -> dict:
    """N_opt, D_opt (and intervals) at ``compute`` from the IsoFLOP frontier and the parametric law."""
    C = float(compute)
    out: dict = {"budget_flops": C}
    iso = obj_res.get("isoflop")
    if _isoflop_ok(iso):
        n = iso["n_coefficient"] * C ** iso["n_exponent"]
        per = {}
        for scheme, smp in (iso.get("bootstrap_samples") or {}).items():
            s = np.asarray(smp, float).reshape(-1, 2)
            per[scheme] = 10 ** (s[:, 1] + s[:, 0] * np.log10(C))
        n_ci = _ci_hull(per)
        out["isoflop"] = {"n": n, "d": C / (6 * n), "n_ci95": n_ci,
                          "d_ci95": None if n_ci is None else [C / (6 * n_ci[1]), C / (6 * n_ci[0])]}
    par = obj_res.get("parametric")
    problem = _param_problem(par) if _param_ok(par) else None
    if problem:
        out["parametric"] = {"status": "skipped", "reason": problem}
    elif _param_ok(par):
        b = par["best"]
        n = float(_opt_param(b["E"], b["A"], b["B"], b["alpha"], b["beta"], C))
        per = {}
        for scheme, smp in (par.get("bootstrap_samples") or {}).items():
            s = np.asarray(smp, float).reshape(-1, 5)
            per[scheme] = _opt_param(*s.T, C)
        n_ci = _ci_hull(per)
        out["parametric"] = {"n": n, "d": C / (6 * n), "n_ci95": n_ci,
                             "d_ci95": None if n_ci is None else [C / (6 * n_ci[1]), C / (6 * n_ci[0])],
                             "loss": float(b["E"] + b["A"] / n ** b["alpha"] + b["B"] / (C / (6 * n)) ** b["beta"])}
    return out


def _split_batch(E, A, B, al, be, logk, a, b, eta, C, n_center):
    """Optimal (N, f, loss, scratch loss) for vectors of parameter sets (length S). Grid over N (log) × f."""
    E, A, B, al, be, logk, a, b, eta = (np.atleast_1d(np.asarray(v, float))[:, None, None]
                                        for v in (E, A, B, al, be, logk, a, b, eta))
    lnN = np.log(n_center) + np.linspace(np.log(1 / 100), np.log(100), 161)
    N = np.exp(lnN)[None, :, None]
    f = F_GRID[None, None, :]
    tok = C / (6 * N)
    d_src, d_f = f * tok, (1 - f) * tok
    with np.errstate(all="ignore"):
        d_t = np.exp(logk) * d_f ** a * N ** b
        d_eff = d_f + np.minimum(d_t, np.maximum(eta, 0.0) * d_src)
        L = E + A / N ** al + B / d_eff ** be
    L = np.where(np.isfinite(L), L, np.inf)
    flat = L.reshape(L.shape[0], -1)
    j = np.argmin(flat, axis=1)
    iN, iF = np.unravel_index(j, L.shape[1:])
    best_L = flat[np.arange(flat.shape[0]), j]
    L0 = L[:, :, 0].min(1)   # scratch baseline (f = 0) at its own best N
    # parameter sets without a compute-optimal size (α or β ≤ 0, ...) or with no finite loss give NaN
    valid = (np.isfinite(optimal_n(A[:, 0, 0], B[:, 0, 0], al[:, 0, 0], be[:, 0, 0], C))
             & np.isfinite(best_L) & np.isfinite(E[:, 0, 0]))
    nan = np.full(valid.shape, np.nan)
    return (np.where(valid, np.exp(lnN)[iN], nan), np.where(valid, F_GRID[iF], nan),
            np.where(valid, best_L, nan), np.where(valid, L0, nan))


def transfer_split(results: dict, compute: float, *, target: str = "mlm", source: str = "clm") -> dict:
    """Model size and compute split between ``source`` pre-training and ``target`` training at ``compute``."""
    objs = results.get("objectives", {})
    t = objs.get(target, {})
    par, tr = t.get("parametric"), t.get("transfer")
    if not _param_ok(par):
        raise KeyError(f"the results have no parametric fit for objective {target!r}")
    if not _transfer_ok(tr):
        raise KeyError(f"the results have no transfer fit for objective {target!r}")
    if tr.get("source_objectives") and source not in tr["source_objectives"]:
        raise KeyError(f"the transfer fit of {target!r} starts from {tr['source_objectives']}, not {source!r}")
    if tr.get("efficiency") is None:
        raise KeyError(f"the transfer fit of {target!r} has no transfer efficiency (the pre-training budget "
                       "init_budget_flops of the transfer runs is unknown)")
    problem = degenerate_reason(par["best"])
    if problem:
        raise KeyError(f"the parametric fit of {target!r} is unusable: {problem}")
    C = float(compute)
    if not (np.isfinite(C) and C > 0):
        raise KeyError(f"budget {compute!r} is not a positive number of FLOPs")
    bp = par["best"]
    n0 = _opt_param(bp["E"], bp["A"], bp["B"], bp["alpha"], bp["beta"], C)
    if not np.isfinite(n0):
        raise KeyError(f"the parametric fit of {target!r} has no compute-optimal size at C = {C:.3g}")
    bb = tr["b"] if tr.get("b") is not None else 0.0
    with np.errstate(all="ignore"):
        logk = np.log(tr["k"]) if tr["k"] is not None and tr["k"] > 0 else np.nan
    N, f, L, L0 = _split_batch(bp["E"], bp["A"], bp["B"], bp["alpha"], bp["beta"], logk, tr["a"], bb,
                               tr["efficiency"], C, n0)
    if not np.isfinite(N[0]):
        raise KeyError(f"no finite transfer split of {source!r} → {target!r} at C = {C:.3g} (degenerate fits)")
    out = {"budget_flops": C, "source": source, "target": target, "n": float(N[0]), "source_fraction": float(f[0]),
           "source_flops": float(f[0] * C), "target_flops": float((1 - f[0]) * C),
           "source_tokens": float(f[0] * C / (6 * N[0])), "target_tokens": float((1 - f[0]) * C / (6 * N[0])),
           "loss": float(L[0]), "scratch_loss": float(L0[0]), "efficiency": float(tr["efficiency"])}
    per_n, per_f = {}, {}
    ps, ts = par.get("bootstrap_samples") or {}, tr.get("bootstrap_samples") or {}
    for scheme in ps:
        if scheme not in ts:
            continue
        p = np.asarray(ps[scheme], float).reshape(-1, 5)
        q = np.asarray(ts[scheme], float)
        if q.size == 0 or p.size == 0:
            continue
        q = q.reshape(q.shape[0], -1)
        if q.shape[1] < 4:
            continue
        m = min(len(p), len(q), 200)
        res_n, res_f = [], []
        for c0 in range(0, m, 50):
            sl = slice(c0, min(m, c0 + 50))
            Nb, fb, _, _ = _split_batch(*p[sl].T, q[sl, 0], q[sl, 1], q[sl, 2], q[sl, 3], C, n0)
            res_n.append(Nb)
            res_f.append(fb)
        per_n[scheme], per_f[scheme] = np.concatenate(res_n), np.concatenate(res_f)
    out["n_ci95"] = _ci_hull(per_n) if per_n else None
    out["source_fraction_ci95"] = _ci_hull(per_f) if per_f else None
    return out


def _budgets_for(obj_res: dict) -> list[float]:
    """Decades of C from the smallest budget of the data to 100× the largest (floats: NumPy 2 keeps
    ``np.floor`` of an int an int, and 10**19 overflows int64)."""
    iso = obj_res.get("isoflop") or {}
    env = obj_res.get("envelope") or {}
    if _isoflop_ok(iso):
        b = [x["budget"] for x in iso["budgets"]]
    elif iso.get("empirical_optima"):
        b = [x["budget"] for x in iso["empirical_optima"]]
    elif env.get("compute_range"):
        b = list(env["compute_range"])
    else:
        b = [1e18, 1e20]
    b = [float(v) for v in b if v is not None and np.isfinite(v) and v > 0] or [1e18, 1e20]
    lo, hi = float(np.log10(min(b))), float(np.log10(max(b))) + 2.0
    return [float(10.0 ** e) for e in np.arange(np.floor(lo), np.ceil(hi) + 1.0, dtype=float)]


def single_objective_table(obj_res: dict) -> list[dict]:
    """Compute-optimal N, D at each decade from the smallest fitted budget to 100× the largest."""
    par = obj_res.get("parametric")
    if not (_isoflop_ok(obj_res.get("isoflop")) or (_param_ok(par) and _param_problem(par) is None)):
        return []
    return [compute_optimal(obj_res, C) for C in _budgets_for(obj_res)]


def transfer_tables(results: dict) -> list[dict]:
    """A transfer split table for every target objective that has both a parametric and a transfer fit."""
    out = []
    for target, r in results.get("objectives", {}).items():
        tr = r.get("transfer")
        if not (_transfer_ok(tr) and _param_ok(r.get("parametric"))):
            continue
        problem = _param_problem(r.get("parametric"))
        if problem:
            for source in tr.get("source_objectives") or ["unknown"]:
                out.append({"source": source, "target": target, "table": [], "status": "skipped",
                            "reason": f"the parametric law of {target} is unusable: {problem}"})
            continue
        for source in tr.get("source_objectives") or ["unknown"]:
            rows = []
            for C in _budgets_for(r):
                try:
                    rows.append(transfer_split(results, C, target=target, source=source))
                except KeyError:
                    break
            out.append({"source": source, "target": target, "table": rows})
    return out
