"""Repeated data: the data-constrained law of Muennighoff et al. (2023), fitted from paired curves.

U unique tokens seen for D tokens in all are repeated R = D/U − 1 times. Repeated tokens are worth less
than fresh ones; the effective data is

    D′ = U + U·R*·(1 − e^(−R/R*))        (D′ = D while D ≤ U),

so D′ → U·(1 + R*) however long one trains: R* is the number of repetitions after which more epochs
stop paying (the plateau of CLM on UniRef50, the overfitting of MLM, in the paper's Figure 1).

Fit from a *pair* of runs of one objective and size: one trained on the repeated dataset, one on data
seen once (the paper's ``ur50_*`` and ``all1ep_*`` curves). The fresh curve says how many fresh tokens
reach a loss; at each point of the repeated run (D tokens, loss L) that is the observed D′ =
tokens_fresh(L). U and R* minimise Σ (log D′_obs − log D′(D; U, R*))² over all pairs of the objective
(one U: the pairs share the dataset). A repeated run that ends *above* a loss it reached earlier
(overfitting) gives a falling D′_obs, which only a small R* fits.

In ``protscale fit`` the pairs come from run tags (:func:`pairs_from_runs`) and U from
``--unique-tokens NAME=N``; without U, R* is reported as not identified when U runs off to zero
(:func:`fit_dataset`).

Intervals: moving-block bootstrap of the points of each curve (neighbouring points of a curve are
correlated), 95% percentile. ``repetition_warning`` turns the law into the warning ``protscale plan``
gives when a budget would repeat a dataset beyond what the law supports.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from .stats import percentile_ci
from .transfer import tokens_to_reach


def effective_tokens(tokens, unique, r_star):
    """D′ of Muennighoff et al. for ``tokens`` drawn from ``unique`` unique tokens (elementwise)."""
    d = np.asarray(tokens, float)
    u = np.asarray(unique, float)
    r = np.maximum(d / u - 1.0, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        rep = u * r_star * (1.0 - np.exp(-r / r_star))
    return np.where(d <= u, d, u + rep)


def observed_effective(rep_tokens, rep_loss, fresh_tokens, fresh_loss) -> tuple[np.ndarray, np.ndarray]:
    """(D, D′_obs) at the points of the repeated run whose loss the fresh run reaches."""
    d = np.asarray(rep_tokens, float)
    dp = tokens_to_reach(fresh_tokens, fresh_loss, np.asarray(rep_loss, float))
    ok = np.isfinite(dp) & (dp > 0) & (d > 0)
    return d[ok], dp[ok]


def _fit(d: np.ndarray, dp: np.ndarray, w: np.ndarray, x0s, unique: float | None) -> np.ndarray:
    """(log U, log R*) minimising the weighted squared log error; U pinned when ``unique`` is given."""
    ldp = np.log(dp)

    def loss(x):
        u = unique if unique is not None else np.exp(x[0])
        with np.errstate(all="ignore"):
            r = np.log(effective_tokens(d, u, np.exp(x[-1]))) - ldp
        v = float(np.sum(w * r * r))
        return v if np.isfinite(v) else 1e30

    best = min((minimize(loss, x0 if unique is None else x0[1:], method="Nelder-Mead",
                         options={"xatol": 1e-6, "fatol": 1e-14, "maxiter": 4000}) for x0 in x0s),
               key=lambda res: res.fun)
    return best.x if unique is None else np.array([np.log(unique), best.x[0]])


def fit_repetition(pairs: list[dict], *, n_boot: int = 200, seed: int = 0, unique: float | None = None) -> dict | None:
    """Fit U and R* from ``pairs`` [{"rep_tokens", "rep_loss", "fresh_tokens", "fresh_loss", "label"}].

    With ``unique`` the number of unique tokens is fixed (a dataset's manifest) and only R* is fitted.
    Returns {"r_star", "r_star_ci95", "unique_tokens", "unique_tokens_ci95", "n_points", "max_repetitions",
    "rmse_log", "pairs"} or None when no pair has usable points."""
    segs = []
    for p in pairs:
        d, dp = observed_effective(p["rep_tokens"], p["rep_loss"], p["fresh_tokens"], p["fresh_loss"])
        if d.size >= 5:
            segs.append((p.get("label", ""), d, dp))
    if not segs:
        return None
    # The bootstrap draws blocks curve by curve: take the curves in an order of their own (label, then data),
    # not in the order a store lists its runs, so the same runs give the same intervals.
    segs.sort(key=lambda s: (s[0], s[1].tolist(), s[2].tolist()))
    d = np.concatenate([s[1] for s in segs])
    dp = np.concatenate([s[2] for s in segs])
    seg_id = np.concatenate([np.full(s[1].size, i) for i, s in enumerate(segs)])
    d_max = float(d.max())
    u_grid = [np.log(d_max / k) for k in (1.5, 3, 8, 20)] if unique is None else [np.log(unique)]
    x0s = [np.array([u, np.log(r)]) for u in u_grid for r in (0.5, 3.0, 15.0)]

    x = _fit(d, dp, np.ones(d.size), x0s, unique)

    def fit_w(w):  # replicates start from the point estimate and one start on each side of R*
        return _fit(d, dp, w, [x, x + [0.0, 1.0], x - [0.0, 1.0]], unique)

    U, R = float(np.exp(x[0])), float(np.exp(x[1]))
    resid = np.log(effective_tokens(d, U, R)) - np.log(dp)
    rng = np.random.default_rng(seed)
    samples = np.full((n_boot, 2), np.nan)
    for b in range(n_boot):
        w = np.zeros(d.size)
        for i in range(len(segs)):
            idx = np.flatnonzero(seg_id == i)
            L = max(2, idx.size // 10)
            starts = rng.integers(0, idx.size - L + 1, size=int(np.ceil(idx.size / L)))
            for s0 in starts:
                np.add.at(w, idx[s0:s0 + L], 1.0)
        samples[b] = fit_w(w)
    return {"r_star": R, "r_star_ci95": _exp_ci(samples[:, 1]), "unique_tokens": U,
            "unique_tokens_ci95": None if unique is not None else _exp_ci(samples[:, 0]),
            "unique_tokens_fixed": unique is not None, "n_points": int(d.size),
            "max_repetitions": float(d_max / U - 1.0), "rmse_log": float(np.sqrt(np.mean(resid ** 2))),
            "pairs": [s[0] for s in segs], "n_boot": int(n_boot)}


def pairs_from_runs(runs, curves, size_tol: float = 0.02) -> dict[str, list[dict]]:
    """Pairs of one objective's runs for :func:`fit_repetition`, by repeated dataset name.

    A *fresh* run saw its data once (tag ``epochs`` ≤ 1, e.g. the paper's ``all1ep``); a *repeated* run
    names another dataset in its ``data`` tag with ``epochs`` unset or > 1 (``ur50``). Each repeated run is
    paired with the fresh run of the same size (|ΔN|/N < ``size_tol``) whose curve reaches furthest.
    ``runs``: run_id, run_name, n_params, data, epochs (``data.py``); ``curves``: run_id, tokens, loss."""
    if "data" not in runs or runs["data"].isna().all():
        return {}
    # Runs in an order of their own (by run_id), not in the order a store lists them: a fresh partner is the
    # first of equally long candidates, and the datasets are listed (so tied for most pairs) in this order.
    runs = runs.sort_values("run_id", kind="stable")
    epochs = runs["epochs"].astype(float)
    fresh = runs[epochs <= 1]
    repeated = runs[runs["data"].notna() & ~(epochs <= 1) & ~runs["data"].isin(fresh["data"].dropna())]
    by_run = {rid: g.sort_values("tokens") for rid, g in curves.groupby("run_id", sort=False)}
    out: dict[str, list[dict]] = {}
    for _, r in repeated.iterrows():
        cand = fresh[(np.abs(fresh["n_params"] / r["n_params"] - 1) < size_tol) & fresh["run_id"].isin(list(by_run))]
        if cand.empty or r["run_id"] not in by_run:
            continue
        f_id = max(cand["run_id"], key=lambda i: by_run[i]["tokens"].max())
        g, f = by_run[r["run_id"]], by_run[f_id]
        out.setdefault(str(r["data"]), []).append({
            "rep_tokens": g["tokens"].to_numpy(float), "rep_loss": g["loss"].to_numpy(float),
            "fresh_tokens": f["tokens"].to_numpy(float), "fresh_loss": f["loss"].to_numpy(float),
            "label": str(r.get("run_name") or r["run_id"]), "fresh_label": str(
                cand.set_index("run_id").loc[f_id].get("run_name") or f_id), "n_params": float(r["n_params"])})
    return out


def fit_dataset(data_name: str, pairs: list[dict], *, unique: float | None, n_boot: int, seed: int) -> dict | None:
    """:func:`fit_repetition` for the pairs of one repeated dataset, with what a reader must know: without
    the dataset's unique tokens U the fit can drive U to zero and R* to infinity (only U·(1 + R*) is then
    pinned); R* is then reported as not identified rather than as a number."""
    d_min = min(float(np.min(p["rep_tokens"][p["rep_tokens"] > 0])) for p in pairs)
    res = fit_repetition(pairs, n_boot=0, seed=seed, unique=unique)       # the point fit alone first:
    if res is not None and not (unique is None and res["unique_tokens"] < 0.01 * d_min):
        res = fit_repetition(pairs, n_boot=n_boot, seed=seed, unique=unique)  # no intervals for a lost cause
    if res is None:
        return None
    res["dataset"] = data_name
    res["saturation_tokens"] = res["unique_tokens"] * (1.0 + res["r_star"])
    if unique is None and res["unique_tokens"] < 0.01 * d_min:
        res["r_star_identified"] = False
        res["reason"] = (f"U → {res['unique_tokens']:.3g} tokens: the curves pin only U·(1 + R*) = "
                         f"{res['saturation_tokens']:.3g}; give the dataset's unique tokens "
                         f"(`protscale fit --unique-tokens {data_name}=N`) to read R*")
        res["r_star"] = res["r_star_ci95"] = None
    else:
        res["r_star_identified"] = True
    return res


def _exp_ci(log_samples):
    ci = percentile_ci(log_samples)
    return None if ci is None else [float(np.exp(ci[0])), float(np.exp(ci[1]))]


def repetition_warning(tokens: float, unique: float, r_star: float, *, min_value: float = 0.9) -> str | None:
    """A warning when training ``tokens`` on ``unique`` unique tokens repeats data beyond what pays.

    None while the data are not repeated, or while repeated tokens are still worth at least ``min_value``
    of fresh ones on average (D′/D ≥ min_value)."""
    if not (tokens > unique > 0):
        return None
    dp = float(effective_tokens(tokens, unique, r_star))
    ratio = dp / tokens
    if ratio >= min_value:
        return None
    return (f"{tokens:.3g} tokens from {unique:.3g} unique tokens repeat the data {tokens / unique:.1f} times; with "
            f"R* = {r_star:.3g} they are worth {dp:.3g} fresh tokens ({100 * ratio:.0f}%), and no amount of training "
            f"on this dataset is worth more than {unique * (1 + r_star):.3g}: use more unique data or a smaller budget")
