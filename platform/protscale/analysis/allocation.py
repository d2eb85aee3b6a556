"""Allocation of a compute budget, from a fitted ``results.json`` dict.

Single objective (``compute_optimal``): N_opt and D_opt = C/(6·N_opt) at budget C from the IsoFLOP
frontier (primary) and from the parametric law (N_opt = G·(C/6)^{β/(α+β)}, G = (αA/(βB))^{1/(α+β)}),
each with a 95% interval: the bootstrap samples stored in results.json are pushed through the same
formula, percentile intervals taken per scheme (run-level, budget-blocked) and their hull reported.

Transfer split (``transfer_split``, e.g. CLM pre-training then MLM), as the transfer law defines it.
The law D_t = k·D_F^a·N^b (``transfer.py``) says: a target run of size N initialised from a source model,
after D_F target tokens, is worth a scratch run trained on D_eff = D_F + D_t tokens. It was measured on
source models trained a certain way -- in the paper, each CLM parent was trained at the CLM compute-optimal
budget for its size -- and it says nothing about other amounts of pre-training. So the split follows from
the law and from that *source rule* (D_src = s·N^q tokens, fitted over the measured transfer runs and
stored with the transfer fit as ``source_rule``): a model of size N costs C_src(N) = 6·N·D_src(N) of
pre-training, the rest of the budget C trains the target, D_F = (C − C_src(N))/(6N), and N minimises the
target's parametric law L(N, D_F + D_t). The source fraction is f = C_src(N)/C. Nothing caps D_t: the law
is used as fitted (outside the sizes it was measured on, ``source_rule.n_range``, an extrapolation). The
answer is compared with the target trained from scratch at the same total C (``scratch_loss``,
``scratch_n``); ``transfer_pays`` says which is lower. Intervals: the same optimisation for paired
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


N_GRID = 241   # sizes tried per split: log-spaced over 1/100 … 100 × the scratch optimum


def source_tokens(rule: dict, n):
    """Tokens of source pre-training for a model of size ``n`` under the measured source rule D_src = s·N^q."""
    return rule["coefficient"] * np.asarray(n, float) ** rule["exponent"]


def _split_batch(E, A, B, al, be, logk, a, b, rule, C, n_center):
    """Best (N, f, loss) with transfer and the best scratch (N, loss), for vectors of parameter sets (S,).

    Grid over log N; at each N the source takes C_src(N) (the source rule), the target the rest."""
    E, A, B, al, be, logk, a, b = (np.atleast_1d(np.asarray(v, float))[:, None] for v in (E, A, B, al, be, logk, a, b))
    N = np.exp(np.log(n_center) + np.linspace(np.log(1 / 100), np.log(100), N_GRID))[None, :]
    c_src = 6.0 * N * source_tokens(rule, N)
    with np.errstate(all="ignore"):
        d_f = (C - c_src) / (6.0 * N)
        d_t = np.exp(logk) * np.where(d_f > 0, d_f, np.nan) ** a * N ** b
        L = E + A / N ** al + B / (d_f + d_t) ** be
        L0 = E + A / N ** al + B / (C / (6.0 * N)) ** be
    L = np.where(np.isfinite(L) & (d_f > 0), L, np.inf)
    L0 = np.where(np.isfinite(L0), L0, np.inf)
    rows = np.arange(L.shape[0])
    j, j0 = np.argmin(L, axis=1), np.argmin(L0, axis=1)
    best, best0 = L[rows, j], L0[rows, j0]
    n_best, f_best = N[0, j], (c_src[0, j] / C)
    # parameter sets without a compute-optimal size (α or β ≤ 0, ...) or with no finite loss give NaN
    ok = np.isfinite(optimal_n(A[:, 0], B[:, 0], al[:, 0], be[:, 0], C)) & np.isfinite(E[:, 0])
    t_ok = ok & np.isfinite(best)
    nan = np.full(ok.shape, np.nan)
    return {"n": np.where(t_ok, n_best, nan), "f": np.where(t_ok, f_best, nan), "loss": np.where(t_ok, best, nan),
            "scratch_n": np.where(ok & np.isfinite(best0), N[0, j0], nan),
            "scratch_loss": np.where(ok & np.isfinite(best0), best0, nan)}


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
    problem = degenerate_reason(par["best"])
    if problem:
        raise KeyError(f"the parametric fit of {target!r} is unusable: {problem}")
    rule = tr.get("source_rule")
    if not rule:
        raise KeyError(f"the transfer fit of {target!r} has no source rule (the pre-training budget "
                       "init_budget_flops of the transfer runs is unknown)")
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
    r = _split_batch(bp["E"], bp["A"], bp["B"], bp["alpha"], bp["beta"], logk, tr["a"], bb, rule, C, n0)
    if not np.isfinite(r["n"][0]):
        raise KeyError(f"no finite transfer split of {source!r} → {target!r} at C = {C:.3g}: the budget does not "
                       "cover the pre-training of any model size")
    n, f = float(r["n"][0]), float(r["f"][0])
    out = {"budget_flops": C, "source": source, "target": target, "n": n, "source_fraction": f,
           "source_flops": f * C, "target_flops": (1 - f) * C,
           "source_tokens": f * C / (6 * n), "target_tokens": (1 - f) * C / (6 * n),
           "loss": float(r["loss"][0]), "scratch_loss": float(r["scratch_loss"][0]),
           "scratch_n": float(r["scratch_n"][0]), "transfer_pays": bool(r["loss"][0] < r["scratch_loss"][0]),
           "source_rule": rule}
    per_n, per_f, per_gain = {}, {}, {}
    ps, ts = par.get("bootstrap_samples") or {}, tr.get("bootstrap_samples") or {}
    for scheme in ps:
        if scheme not in ts:
            continue
        p = np.asarray(ps[scheme], float).reshape(-1, 5)
        q = np.asarray(ts[scheme], float)
        if q.size == 0 or p.size == 0:
            continue
        q = q.reshape(q.shape[0], -1)
        if q.shape[1] < 3:
            continue
        m = min(len(p), len(q), 200)
        rb = _split_batch(*p[:m].T, q[:m, 0], q[:m, 1], q[:m, 2], rule, C, n0)
        per_n[scheme], per_f[scheme] = rb["n"], rb["f"]
        per_gain[scheme] = rb["scratch_loss"] - rb["loss"]
    out["n_ci95"] = _ci_hull(per_n) if per_n else None
    out["source_fraction_ci95"] = _ci_hull(per_f) if per_f else None
    out["loss_gain_ci95"] = _ci_hull(per_gain) if per_gain else None
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
