"""Adaptive IsoFLOP placement: which model sizes to train next at each budget.

After a coarse first pass (a few sizes per budget), :func:`place` looks at the finished trials and says, per
budget, which candidate sizes would tell the most about the N_opt exponent:

* a budget whose best run sits at an edge of the sizes sampled (or with fewer than 3 sizes) is **not
  bracketed**, even when its parabola has a vertex: its next sizes extend the grid towards the side where
  the minimum lies (while candidates are left there);
* a budget whose best run is its smallest (largest) **candidate**, so the grid cannot extend past it, and
  that gets no other size in a wave, gets the untried candidate between the best and its sampled
  neighbour (a flat bottom often holds a lower point there, and it shows the curvature at that edge);
* a bracketed budget whose parabola has no usable vertex (not convex, vertex outside the sizes) gets the
  untried sizes nearest its best run;
* a bracketed budget with a vertex gets sizes where its minimum is **least certain**: among the untried
  candidates inside the vertex's 95% interval (the run-level bootstrap interval from
  :func:`isoflop.fit_isoflop`, widened to at least the delta-method interval of the same parabola with the
  noise pooled over budgets, since with 3–4 sizes the bootstrap is degenerate; and to at least one grid
  step), the ``REFINE_K`` that shrink the vertex's (delta-method) variance most. Budgets are ranked by how
  much that shrinks the exponent's variance per unit of cost: the variance of a least-squares slope is
  Σ wᵢ²·var(vertexᵢ) with wᵢ = (log Cᵢ − mean)/Sxx (the end budgets weigh most); the reduction is divided by
  Cᵢ^``COST_POWER``. Only budgets with a score ≥ ``SHARE`` × the largest get sizes in a wave.

Placement is **done** when the exponent's 95% interval is at most ``target_width`` wide, or when nothing
informative is left (every budget bracketed, and no untried candidate near any uncertain vertex).

The fit is the analyzer's own (:func:`isoflop.fit_isoflop`, the same parabolas, frontier and bootstrap as
``protscale fit``), so the interval that stops placement is the one the report will print.

Measured on a replay of the paper's CLM logs (``benchmarks/adaptive_replay.py --seeds 10``): from 3 sizes per
budget, one size per budget and wave, placement reaches the full grid's exponent interval width (within 5%)
with a median of 38 of the 76 trials and 51% of its compute (bootstrap seeds 0-9: 51% for 6 seeds, 62% for
3, 70% for 1; N_opt ∝ C^0.630 [0.558, 0.717] against the full grid's C^0.622 [0.553, 0.721]). The largest
budget (1e21) is 64% of that grid's compute at 8% per trial, so the share depends mostly on how many of
its sizes the interval needs (4 of 8 at the median).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import isoflop

N_BOOT = 4000          # bootstrap replicates per placement decision (vectorised: ~0.1 s; fewer make the stop noisy)
SHARE = 0.5            # a fitted budget gets sizes when its score is >= SHARE × the largest (see above)
SAME_SIZE_RTOL = 0.01  # two n_params within 1% are the same size
COST_POWER = 1.0       # score = slope-variance reduction / budget_flops**COST_POWER (a trial costs ~ its budget)
REFINE_K = 2           # sizes per wave for a budget whose minimum is bracketed (at most per_budget)


@dataclass
class Placement:
    next_sizes: dict[float, list[float]]            # budget_flops -> n_params to train next (from candidates)
    exponent: tuple[float, float, float] | None     # N_opt exponent, 95% lo, hi (None until fittable)
    done: bool
    reason: str


def _same(a: float, b: float) -> bool:
    return abs(a / b - 1.0) <= SAME_SIZE_RTOL


def _untried(cands: Sequence[float], sizes: np.ndarray) -> list[float]:
    return sorted(float(c) for c in cands if not any(_same(float(c), float(s)) for s in sizes))


def _nearest(cands: list[float], x: float, k: int) -> list[float]:
    """Up to k candidates nearest to log10 N = x, alternating sides (below, above, ...) by distance."""
    below = sorted((c for c in cands if np.log10(c) <= x), key=lambda c: x - np.log10(c))
    above = sorted((c for c in cands if np.log10(c) > x), key=lambda c: np.log10(c) - x)
    out: list[float] = []
    while len(out) < k and (below or above):
        for side in (below, above) if (below and (not above or x - np.log10(below[0]) <= np.log10(above[0]) - x)) \
                else (above, below):
            if side and len(out) < k:
                out.append(side.pop(0))
    return out


def _points_frame(points) -> pd.DataFrame:
    rows = [(float(b), float(n), float(l)) for b, n, l in points]
    df = pd.DataFrame(rows, columns=["budget", "n_params", "loss"], dtype=float)
    df = df[np.isfinite(df["loss"]) & (df["n_params"] > 0) & (df["budget"] > 0)].reset_index(drop=True)
    df["run_id"] = [f"p{i}" for i in range(len(df))]
    return df


def place(points, candidates, per_budget=2, target_width=0.1, seed=0) -> Placement:
    """Next sizes per budget from finished trials of one objective.

    ``points``: [(budget_flops, n_params, loss)] of finished trials; ``candidates``: the n_params that can
    be trained (the same N the IsoFLOP fit uses), either one list for every budget or a mapping
    budget_flops -> list (where the sizes available differ per budget, as in a replay of logged runs).
    Returns at most ``per_budget`` sizes per budget, all from the candidates and not yet trained there.
    """
    per_budget = max(1, int(per_budget))
    pts = _points_frame(points)
    if pts.empty:
        return Placement({}, None, True, "no finished trial with a finite loss: run a first pass first")

    def cands_for(b: float) -> list[float]:
        if isinstance(candidates, Mapping):
            for k, v in candidates.items():
                if abs(float(k) / b - 1.0) <= 1e-6:
                    return [float(c) for c in v]
            return []
        return [float(c) for c in candidates]

    # the frontier and per-budget vertex uncertainty, from the analyzer's own fit
    exponent = None
    fit_res = None
    profiles: list = []
    try:
        fit = isoflop.fit_isoflop(pts[["run_id", "n_params", "loss", "budget"]], n_boot=N_BOOT, seed=seed)
        fit_res, profiles = fit.result, fit.profiles
        ci = fit_res["n_exponent_ci95"]
        if ci is not None:
            exponent = (float(fit_res["n_exponent"]), float(ci[0]), float(ci[1]))
    except isoflop.FrontierNotFitted as exc:
        profiles = exc.profiles
    boot_width = {}
    if fit_res is not None:
        for e in fit_res["budgets"]:
            iv = e["n_opt_ci95_run"]
            if e["used"] and iv:
                boot_width[float(e["budget"])] = float(np.log10(iv[1]) - np.log10(iv[0]))
    vertex = _vertices(profiles, boot_width)   # budget -> (log10 N_opt, 95% width in decades or inf)

    if exponent is not None and exponent[2] - exponent[1] <= target_width:
        return Placement({}, exponent, True, f"N_opt exponent {exponent[0]:.3f}, 95% interval "
                         f"[{exponent[1]:.3f}, {exponent[2]:.3f}] is {exponent[2] - exponent[1]:.3f} wide "
                         f"(target {target_width:g})")

    nxt: dict[float, list[float]] = {}
    unbracketable = []
    fitted_wants: dict[float, list[float]] = {}
    edge_wants: dict[float, float] = {}    # best run at an edge the candidates cannot pass: its inside neighbour
    for b in np.sort(pts["budget"].unique()):
        b = float(b)
        g = pts[pts["budget"] == b]
        sizes = np.unique(g["n_params"].to_numpy(float))
        free = _untried(cands_for(b), sizes)
        best = float(g["n_params"].iloc[int(np.argmin(g["loss"].to_numpy(float)))])
        lo, hi = sizes.min(), sizes.max()
        at_low = sizes.size >= 2 and _same(best, lo)
        at_high = sizes.size >= 2 and _same(best, hi)
        if sizes.size < isoflop.MIN_SIZES or at_low or at_high:
            # not bracketed (the best run is at an edge, whatever a parabola's vertex says): extend
            # towards the side where the minimum lies
            if at_low:
                pick = sorted((c for c in free if c < lo), reverse=True)[:per_budget]
            elif at_high:
                pick = sorted(c for c in free if c > hi)[:per_budget]
            else:   # one size, or too few sizes with the best inside: grow around the best
                pick = _nearest(free, np.log10(best), per_budget)
            if pick:
                nxt[b] = pick
                continue
            inside = _inside_neighbour(best, sizes, free, cands_for(b))
            if inside is not None:
                edge_wants[b] = inside
            if b not in vertex:
                if inside is None:
                    unbracketable.append(b)
                continue
        if b not in vertex:
            # bracketed by the runs, but the parabola gives no vertex: sample around the best run
            pick = _nearest(free, np.log10(best), per_budget)
            if pick:
                nxt[b] = pick
        else:
            xv, w = vertex[b][:2]
            # where the minimum is least certain: inside its interval, widened to the neighbouring sizes;
            # of those, the size(s) that shrink the vertex's variance most
            half = max(w / 2.0 if np.isfinite(w) else np.log10(hi / lo) / 2.0, _step(sizes))
            window = [c for c in free if abs(np.log10(c) - xv) <= half]
            pick, gain = _most_informative(vertex[b][2], window, min(REFINE_K, per_budget))
            if pick:
                fitted_wants[b] = (pick, gain)

    # fitted budgets: only those whose vertex uncertainty matters for the exponent, per unit of cost
    if fitted_wants:
        if exponent is None:
            chosen = []   # first bracket the other budgets: the exponent needs two vertices
        else:
            logc = {b: np.log10(b) for b in vertex}
            m = np.mean(list(logc.values()))
            sxx = sum((v - m) ** 2 for v in logc.values())
            score = {b: (((logc[b] - m) / sxx) ** 2 if sxx > 0 else 1.0) * gain / b ** COST_POWER
                     for b, (_, gain) in fitted_wants.items()}
            top = max(score.values())
            chosen = [b for b in fitted_wants if score[b] >= SHARE * top] if top > 0 else list(fitted_wants)
        for b in chosen:
            nxt[b] = fitted_wants[b][0]

    # an edge the grid cannot extend past, at a budget nothing else was placed at: the untried size next to
    # the best on the inside (a flat bottom often hides a lower point there; it shows the curvature either way)
    edges = sorted(b for b in edge_wants if b not in nxt)
    for b in edges:
        nxt[b] = [edge_wants[b]]

    if nxt:
        parts = []
        if exponent is None:
            parts.append("no frontier yet (fewer than 2 budgets with a bracketed minimum)")
        else:
            parts.append(f"N_opt exponent {exponent[0]:.3f}, 95% interval [{exponent[1]:.3f}, {exponent[2]:.3f}] "
                         f"is {exponent[2] - exponent[1]:.3f} wide (target {target_width:g})")
        parts.append(f"{sum(len(v) for v in nxt.values())} size(s) at {len(nxt)} budget(s)")
        if edges:
            parts.append("at " + ", ".join(f"{b:.3g}" for b in edges) + " the best size is the edge of the "
                         "candidates (the grid cannot extend): its untried neighbour inside")
        return Placement(nxt, exponent, False, "; ".join(parts))
    if exponent is None:
        why = "no frontier can be fitted and no candidate size is left that could bracket a minimum"
        if unbracketable:
            why += " (budgets " + ", ".join(f"{b:.3g}" for b in unbracketable) + ": the minimum lies beyond the candidates)"
    else:
        why = (f"nothing informative left: N_opt exponent {exponent[0]:.3f}, 95% interval "
               f"[{exponent[1]:.3f}, {exponent[2]:.3f}] ({exponent[2] - exponent[1]:.3f} wide, target "
               f"{target_width:g}) and no untried candidate near an uncertain minimum")
    return Placement({}, exponent, True, why)


def _inside_neighbour(best: float, sizes: np.ndarray, free: list[float], cands: list[float]) -> float | None:
    """When the best run is both the smallest (largest) size sampled and the smallest (largest) candidate, the
    untried candidate between it and the next sampled size, nearest the best; else None."""
    if sizes.size < 2 or len(cands) < 3:
        return None
    if _same(best, sizes[0]) and _same(best, min(cands)):
        inside = [c for c in free if best < c < sizes[1] and not _same(c, sizes[1])]
        return min(inside) if inside else None
    if _same(best, sizes[-1]) and _same(best, max(cands)):
        inside = [c for c in free if sizes[-2] < c < best and not _same(c, sizes[-2])]
        return max(inside) if inside else None
    return None


def _vertices(profiles: list, boot_width: dict[float, float]) -> dict[float, tuple[float, float, dict]]:
    """Per budget with a vertex: (log10 N_opt, width of its 95% interval in decades, its profile).

    The width is the run-level bootstrap's, but at least the delta-method width of the same parabola with
    the residual noise pooled over all budgets: with 3–4 sizes most bootstrap replicates lose a size and
    drop out, and the rest reproduce the point estimate, so the bootstrap alone says "certain" exactly
    where a budget is least certain. Inf when the noise cannot be estimated yet (no budget has > 3 sizes).
    """
    rss, dof = 0.0, 0
    for e in profiles:
        if np.all(np.isfinite(e["coef"])):
            u = e["x"] - e["center"]
            r = e["y"] - (e["coef"][0] + e["coef"][1] * u + e["coef"][2] * u * u)
            rss += float(r @ r)
            dof += max(int(e["x"].size) - 3, 0)
    sigma2 = rss / dof if dof > 0 else float("nan")
    out = {}
    for e in profiles:
        if not e["used"]:
            continue
        b = float(e["budget"])
        w = float("inf")
        if np.isfinite(sigma2):
            w = 2 * 1.96 * float(np.sqrt(sigma2 * _vertex_var(e, [])))
            w = max(w, boot_width.get(b, 0.0))
        out[b] = (float(e["xv"]), w, e)
    return out


def _vertex_var(e: dict, extra_x: list[float]) -> float:
    """Delta-method variance of a budget's parabola vertex per unit noise variance, with its sizes plus
    ``extra_x`` (log10 N) in the design: the vertex moves as -(c1 + 2·c2·u)/(2·c2) at the vertex."""
    c0, c1, c2 = e["coef"]
    u = np.concatenate([e["x"], np.asarray(extra_x, float)]) - e["center"]
    X = np.column_stack([np.ones_like(u), u, u * u])
    g = np.array([0.0, -1.0 / (2 * c2), c1 / (2 * c2 * c2)])
    return float(max(g @ np.linalg.pinv(X.T @ X) @ g, 0.0))


def _most_informative(e: dict, window: list[float], k: int) -> tuple[list[float], float]:
    """Greedily the k sizes of ``window`` that shrink the vertex variance most, and the reduction."""
    v0 = _vertex_var(e, [])
    chosen: list[float] = []
    left = list(window)
    for _ in range(min(k, len(left))):
        best = min(left, key=lambda c: _vertex_var(e, [np.log10(x) for x in chosen + [c]]))
        chosen.append(best)
        left.remove(best)
    return sorted(chosen), v0 - _vertex_var(e, [np.log10(x) for x in chosen]) if chosen else 0.0


def _step(sizes: np.ndarray) -> float:
    """Typical spacing (decades) between neighbouring sampled sizes."""
    x = np.log10(np.unique(sizes))
    return float(np.median(np.diff(x))) if x.size >= 2 else 0.3

