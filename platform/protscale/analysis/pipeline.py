"""The whole analysis of a set of runs: checks, then per objective the envelope, IsoFLOP, parametric and
transfer fits with bootstrap intervals, then the allocation tables. Returns the ``results.json`` dict
(see ``SCHEMA.md``) and the in-memory pieces the plots need.

Every part that can be fitted is fitted and reported; a part that cannot is ``{"status": "skipped",
"reason": ...}`` with the reason in words a user can act on (e.g. when no IsoFLOP minimum is bracketed:
the best run per budget and which way to extend the grid). Only when nothing at all can be fitted does
``analyze`` raise a UserError.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from protscale.errors import UserError

from . import allocation, envelope, isoflop, parametric, repetition, transfer, trust
from .checks import CheckReport
from .checks import final_points, run_checks
from .results import CALIBRATION, SCHEMA_VERSION, clean_json
from .stats import single_thread_blas

SAMPLES_KEPT = 400   # bootstrap samples stored in results.json per scheme (for `protscale plan`)


@dataclass
class Config:
    n_boot: int = 1000               # IsoFLOP / envelope / transfer replicates per scheme
    n_boot_parametric: int = 200     # parametric replicates per scheme (each is an L-BFGS refit)
    seed: int = 0
    snap_tol: float = 0.05
    flops_tol: float = 0.05
    blowup_ratio: float = 1.10
    parametric_points: str = "isoflop"   # "isoflop": runs of budgets with >= 3 sizes; "all": every run end
    parametric_init: list | None = None  # extra start [E, A, B, alpha, beta]
    parametric_grid: str | dict = "full"  # "full" (4,500 starts), "coarse" (243) or {e, a, b, alpha, beta: values}
    basin_rel_tol: float = 0.02
    metric: str = "val_loss"
    unigram_baseline: float | None = None   # nats; None: trust.UNIGRAM_BASELINE_NATS (Swiss-Prot composition)
    baseline_margin: float = trust.BASELINE_MARGIN
    unique_tokens: dict | None = None     # {dataset name (tag ``data``): unique tokens} for the repetition law
    n_boot_repetition: int = 200          # block-bootstrap replicates of the repetition law (Nelder-Mead refits)
    progress: bool = True

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "progress"}


@dataclass
class Analysis:
    results: dict
    plot_data: dict = field(default_factory=dict)


def _log(cfg: Config, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


def _samples(arr: np.ndarray, k: int = SAMPLES_KEPT) -> list:
    arr = np.asarray(arr, float)
    arr = arr[np.all(np.isfinite(arr), axis=1)] if arr.ndim == 2 else arr[np.isfinite(arr)]
    return [[float(f"{v:.6g}") for v in row] for row in arr[:k]]


def analyze(runs: pd.DataFrame, curves: pd.DataFrame, cfg: Config | None = None, *,
            experiments: list[str] | None = None, tracking_uri: str | None = None) -> Analysis:
    """Checks, fits and allocation tables; raises UserError when nothing can be fitted."""
    with single_thread_blas():
        return _analyze(runs, curves, cfg or Config(), experiments=experiments, tracking_uri=tracking_uri)


def _analyze(runs: pd.DataFrame, curves: pd.DataFrame, cfg: Config, *,
             experiments: list[str] | None = None, tracking_uri: str | None = None) -> Analysis:
    clean_runs, clean_curves, rep = run_checks(runs, curves, flops_tol=cfg.flops_tol, blowup_ratio=cfg.blowup_ratio)
    _log(cfg, f"checks: {rep.n_runs_in} trial run(s), {rep.n_runs_clean} clean; {rep.summary()}")
    if clean_runs.empty:
        raise UserError(f"no run left to fit after the data checks ({rep.summary()})")
    objectives = sorted(str(o) for o in clean_runs["objective"].dropna().unique())
    out = {"schema_version": SCHEMA_VERSION, "experiments": experiments or [], "tracking_uri": tracking_uri,
           "config": cfg.to_json(), "checks": None, "calibration": CALIBRATION,
           "unigram_baseline": trust.baseline_info(cfg.unigram_baseline, cfg.baseline_margin), "objectives": {}}
    baseline = out["unigram_baseline"]
    plot_data: dict = {}
    notes: list[str] = []
    skipped_reasons = []
    for obj in objectives:
        _log(cfg, f"[{obj}] fitting")
        o_runs = clean_runs[clean_runs["objective"] == obj]
        scratch = o_runs[o_runs["init_from"].fillna("").astype(str).str.len() == 0]
        sc_curves = clean_curves[clean_curves["run_id"].isin(scratch["run_id"])]
        res: dict = {"n_runs": int(len(o_runs)), "n_scratch_runs": int(len(scratch)),
                     "n_transfer_runs": int(len(o_runs) - len(scratch))}
        pd_obj: dict = {"curves": sc_curves}
        fp = final_points(scratch, sc_curves, snap_tol=cfg.snap_tol) if len(scratch) else pd.DataFrame()
        if len(fp):
            early = fp[~fp["reached"]]
            if len(early):
                rep.add("not_at_budget", "warning", early["run_id"],
                        f"[{obj}] {len(early)} run(s) end more than 10% below their budget (stopped early): "
                        "left out of the IsoFLOP and parametric fits")
            fp = fp[fp["reached"]]
            pd_obj["final_points_all"] = fp
            unplanned = fp[fp["budget_source"] == "curve_end"]
            if len(unplanned) and len(unplanned) < len(fp):
                # IsoFLOP slices are a design: runs without a planned budget do not join them
                rep.issues.append({"check": "no_planned_budget", "severity": "info",
                                   "run_ids": [str(r) for r in unplanned["run_id"]],
                                   "message": f"[{obj}] {len(unplanned)} run(s) without a planned budget (budget = "
                                   "where the curve ends): used in the envelope, not in IsoFLOP slices"})
                fp = fp[fp["budget_source"] != "curve_end"]
            elif len(unplanned):
                rep.issues.append({"check": "no_planned_budget", "severity": "warning", "run_ids": [],
                                   "message": f"[{obj}] no run has a planned budget: IsoFLOP slices are formed from "
                                   "the computes where curves end (merged within 5%)"})
        pd_obj["final_points"] = fp
        # IsoFLOP
        pts = (fp.rename(columns={"final_loss": "loss"})[["run_id", "n_params", "loss", "budget"]] if len(fp)
               else pd.DataFrame(columns=["run_id", "n_params", "loss", "budget"]))
        emp = isoflop.empirical_optima(pts) if len(pts) else []
        try:
            if len(fp) == 0:
                raise UserError(f"objective {obj}: no scratch run with a final point")
            iso = isoflop.fit_isoflop(pts, n_boot=cfg.n_boot, seed=cfg.seed, objective=obj)
            r = iso.result
            smp = isoflop.frontier_samples(iso)
            r["bootstrap_samples"] = {k: _samples(v) for k, v in smp.items()}
            r["bootstrap_samples_columns"] = ["n_exponent", "log10_n_coefficient"]
            r["empirical_optima"] = emp
            r["grid_advice"] = adv = isoflop.grid_advice(emp, r["dropped_budgets"])
            _isoflop_trust(r, emp, baseline)
            res["isoflop"] = r
            pd_obj["isoflop"] = iso
            _dropped_issues(rep, obj, r["dropped_budgets"])
            if adv["messages"]:
                rep.add("isoflop_grid", "warning", [], f"[{obj}] " + " ".join(adv["messages"]))
            _log(cfg, f"[{obj}] IsoFLOP: N_opt ∝ C^{r['n_exponent']:.3f} 95% {_fmt_ci(r['n_exponent_ci95'])}")
        except UserError as exc:
            dropped = list(getattr(exc, "dropped", []))
            adv = isoflop.grid_advice(emp, dropped)
            reason = str(exc)
            if adv["messages"]:
                reason = f"{reason}. " + " ".join(adv["messages"])
            res["isoflop"] = {"status": "skipped", "reason": reason, "dropped_budgets": dropped,
                              "empirical_optima": emp, "grid_advice": adv}
            bw, _ = trust.baseline_warning([e["loss_best"] for e in emp], baseline,
                                           f"the {len(emp)} budgets' best losses")
            res["isoflop"]["warnings"] = [bw] if bw else []
            if getattr(exc, "profiles", None):
                pd_obj["isoflop_profiles"] = exc.profiles
            _dropped_issues(rep, obj, dropped)
            skipped_reasons.append(reason)
            notes.append(f"{obj.upper()}: no IsoFLOP frontier. " + (" ".join(adv["messages"]) or str(exc)))
            _log(cfg, f"[{obj}] IsoFLOP skipped: {reason}")
        # envelope
        try:
            blocks = dict(zip(fp["run_id"], fp["budget"])) if len(fp) else {}
            res["envelope"] = env = envelope.fit_envelope(sc_curves, blocks, n_boot=cfg.n_boot, seed=cfg.seed,
                                                          objective=obj)
            bw, bad = trust.baseline_warning(env["envelope"], baseline, "the envelope's losses",
                                             min_share=trust.POINT_SHARE)
            env.update(warnings=[bw] if bw else [], unusable=bad, budget_range=env["compute_range"])
        except UserError as exc:
            res["envelope"] = {"status": "skipped", "reason": str(exc)}
        # parametric
        res["parametric"] = _parametric(obj, fp, pd_obj.get("final_points_all", fp), cfg, pd_obj, rep, baseline)
        par = res["parametric"]
        if par.get("status") == "warning":
            notes.append(f"{obj.upper()} parametric law: {par['reason']}")
        iso_w = (res.get("isoflop") or {}).get("warnings") or []
        if iso_w:
            notes.append(f"{obj.upper()} IsoFLOP frontier: " + "; ".join(iso_w))
        # transfer (this objective as the target)
        res["transfer"] = _transfer(obj, clean_runs, clean_curves, fp, cfg, pd_obj)
        # repeated data: runs on a repeated dataset against runs that saw their data once
        res["repetition"] = _repetition(obj, o_runs, clean_curves, cfg)
        # compute-optimal allocation table
        res["allocation"] = allocation.single_objective_table(res)
        out["objectives"][obj] = res
        plot_data[obj] = pd_obj
    if not any(_fitted(r) for r in out["objectives"].values()):
        raise UserError("nothing could be fitted: " + " | ".join(skipped_reasons) + f" (data checks: {rep.summary()})")
    out["allocation"] = allocation.transfer_tables(out)
    out["checks"] = rep.to_json()
    out["notes"] = notes
    return Analysis(results=clean_json(out), plot_data=plot_data)


def _fmt_ci(ci) -> str:
    return "n/a" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _fitted(r: dict) -> bool:
    """Whether any law was fitted for this objective."""
    return ("n_exponent" in (r.get("isoflop") or {}) or "b" in (r.get("envelope") or {})
            or "best" in (r.get("parametric") or {}) or "k" in (r.get("transfer") or {})
            or "r_star_identified" in (r.get("repetition") or {}))


def _isoflop_trust(r: dict, emp: list[dict], baseline: dict) -> None:
    """Warnings, ``unusable`` and ``budget_range`` of a fitted IsoFLOP frontier (see ``trust.py``)."""
    used = [b for b in r["budgets"] if b["used"]]
    r["budget_range"] = [min(b["budget"] for b in used), max(b["budget"] for b in used)]
    best = {e["budget"]: e["loss_best"] for e in emp}
    bw, bad = trust.baseline_warning([best.get(b["budget"]) for b in used], baseline,
                                     f"the {len(used)} frontier budgets' best losses")
    warnings = [bw] if bw else []
    if r["n_exponent_ci95"] is None:
        warnings.append("no interval for the exponent: too few bootstrap replicates succeeded")
        bad = True
    if len(used) == 2:
        warnings.append("the frontier rests on 2 budgets only: its interval cannot show how budgets scatter "
                        "around the line")
    r["warnings"], r["unusable"] = warnings, bool(bad)


def _dropped_issues(rep: CheckReport, obj: str, dropped: list[dict]) -> None:
    for d in dropped:
        rep.issues.append({"check": "isoflop_budget", "severity": "warning", "run_ids": [],
                           "message": f"[{obj}] budget {d['budget']:.3g} left out of the frontier: "
                           f"{d['reason']} ({d['n_runs']} run(s))"})


MIN_PARAMETRIC_POINTS = 8


def _enough(pts: pd.DataFrame) -> bool:
    return len(pts) >= MIN_PARAMETRIC_POINTS and pts["n_params"].round(0).nunique() >= 3


def _parametric(obj: str, fp: pd.DataFrame, fp_all: pd.DataFrame, cfg: Config, pd_obj: dict,
                rep: CheckReport | None = None, baseline: dict | None = None) -> dict:
    rep = rep if rep is not None else CheckReport()
    if len(fp_all) == 0:
        return {"status": "skipped", "reason": f"objective {obj}: no clean scratch run reached its budget"}
    warnings: list[str] = []
    if cfg.parametric_points == "isoflop":
        if len(fp):
            n_sizes = fp.groupby("budget")["n_params"].agg(lambda s: s.round(0).nunique())
            grid_budgets = list(n_sizes.index[n_sizes >= isoflop.MIN_SIZES])
        else:
            grid_budgets = []
        pts = fp[fp["budget"].isin(grid_budgets)] if len(fp) else fp
        how = f"final points of the runs in IsoFLOP budgets with >= {isoflop.MIN_SIZES} sizes"
        if not _enough(pts) and _enough(fp_all):
            msg = (f"the IsoFLOP-budget selection (budgets with >= {isoflop.MIN_SIZES} sizes) has {len(pts)} "
                   f"point(s), too few for the parametric law (>= {MIN_PARAMETRIC_POINTS} points over >= 3 sizes): "
                   f"fitted on all {len(fp_all)} clean scratch runs instead")
            warnings.append(msg)
            rep.add("parametric_points", "warning", [], f"[{obj}] {msg}")
            pts = fp_all
            how = "final points of every clean scratch run (fallback: too few runs in IsoFLOP budgets)"
    else:
        pts = fp_all
        how = "final points of every clean scratch run"
    if not _enough(pts):
        return {"status": "skipped",
                "reason": f"objective {obj}: the parametric fit needs >= {MIN_PARAMETRIC_POINTS} points over >= 3 "
                          f"sizes ({how}); got {len(pts)} point(s) over "
                          f"{pts['n_params'].round(0).nunique() if len(pts) else 0} size(s)"}
    _log(cfg, f"[{obj}] parametric: L-BFGS from the initialisation grid ({len(pts)} points)")
    n, d, L = (pts[k].to_numpy(float) for k in ("n_params", "final_tokens", "final_loss"))
    try:
        fit = parametric.fit_parametric(n, d, L, grid=cfg.parametric_grid, init=cfg.parametric_init,
                                        basin_rel_tol=cfg.basin_rel_tol)
        boot = parametric.bootstrap_parametric(n, d, L, pts["budget"].to_numpy(), fit, n_boot=cfg.n_boot_parametric,
                                               seed=cfg.seed, grid=cfg.parametric_grid, progress=cfg.progress,
                                               basin_rel_tol=cfg.basin_rel_tol)
    except (FloatingPointError, np.linalg.LinAlgError, ValueError) as exc:
        return {"status": "skipped", "reason": f"objective {obj}: the parametric fit failed numerically: {exc}"}
    ci = parametric.summarize_bootstrap(boot)
    best = fit.best
    with np.errstate(all="ignore"):
        resid = np.log(parametric.predict_loss(best, n, d)) - np.log(L)
    degenerate = parametric.degenerate_reason(best)
    if degenerate:
        rep.add("parametric_degenerate", "warning", [], f"[{obj}] {degenerate}")
        _log(cfg, f"[{obj}] parametric: {degenerate}")
    else:
        budgets = np.unique(pts["budget"].to_numpy(float))
        n_opt = parametric.optimal_n(best["A"], best["B"], best["alpha"], best["beta"], budgets)
        lo, hi = float(np.min(n)), float(np.max(n))
        if np.any(n_opt < lo / 10) or np.any(n_opt > hi * 10):
            span = (f"{np.min(n_opt):.3g}" if np.max(n_opt) <= np.min(n_opt) * 1.01
                    else f"{np.min(n_opt):.3g} to {np.max(n_opt):.3g}")
            msg = (f"at the budgets fitted the law puts the compute-optimal size at N_opt = {span}, more than 10× "
                   f"outside the sizes fitted ({lo:.3g} to {hi:.3g}): its allocation is an extrapolation the data "
                   "do not support")
            warnings.append(msg)
            rep.add("parametric_extrapolation", "warning", [], f"[{obj}] {msg}")
    n_bad = {k: float(np.mean(~np.isfinite(parametric.optimal_n(v["A"], v["B"], v["alpha"], v["beta"], 1e20))))
             for k, v in boot.items()}
    alpha_ci, beta_ci = ci["alpha"]["ci95"], ci["beta"]["ci95"]
    ident, unusable = trust.parametric_identifiability(
        {"basins": fit.basins, "basin_rel_tol": cfg.basin_rel_tol, "alpha_ci95": alpha_ci, "beta_ci95": beta_ci})
    warnings += ident
    for w in ident:
        rep.add("parametric_identifiability", "warning", [], f"[{obj}] {w}")
    bw, near = trust.baseline_warning(L, baseline or trust.baseline_info(), "the points fitted",
                                      min_share=trust.POINT_SHARE)
    if bw:
        warnings.append(bw)
        rep.add("unigram_baseline", "warning", [], f"[{obj}] parametric law: {bw}")
    problems = ([degenerate] if degenerate else []) + warnings
    r = {
        "status": "warning" if problems else "ok",
        **({"reason": "; ".join(problems)} if problems else {}),
        "degenerate": bool(degenerate),
        "degenerate_reason": degenerate,
        "warnings": warnings,
        "unusable": bool(degenerate) or unusable or near,
        "budget_range": [float(pts["budget"].min()), float(pts["budget"].max())],
        "points": how, "n_points": fit.n_points, "n_starts": fit.n_starts, "huber_delta": parametric.HUBER_DELTA,
        "best": best, "objective_value": fit.objective,
        "allocation_exponent": (float("nan") if degenerate
                                else float(parametric.allocation_exponent(best["alpha"], best["beta"]))),
        "allocation_exponent_ci95": ci["allocation_exponent"]["ci95"],
        "allocation_exponent_ci95_run": ci["allocation_exponent"]["run"],
        "allocation_exponent_ci95_budget": ci["allocation_exponent"]["budget"],
        "alpha_ci95": ci["alpha"]["ci95"], "beta_ci95": ci["beta"]["ci95"],
        "basins": fit.basins, "basin_rel_tol": cfg.basin_rel_tol,
        "basin_spread": parametric.basin_spread(boot, len(fit.basins)),
        "from_init": fit.from_init,
        "rmse_log": float(np.sqrt(np.mean(resid ** 2))),
        "bootstrap": {"n_boot": cfg.n_boot_parametric, "seed": cfg.seed,
                      "degenerate_fraction_run": n_bad.get("run"), "degenerate_fraction_budget": n_bad.get("budget")},
        "bootstrap_samples": {k: _samples(np.column_stack([v[p] for p in parametric.PARAM_NAMES]))
                              for k, v in boot.items()},
        "bootstrap_samples_columns": list(parametric.PARAM_NAMES),
    }
    pd_obj["parametric"] = {"points": pts, "fit": fit}
    _log(cfg, f"[{obj}] parametric: best E={best['E']:.4g} A={best['A']:.4g} B={best['B']:.4g} "
              f"alpha={best['alpha']:.4f} beta={best['beta']:.4f}; {len(fit.basins)} basin(s) near the optimum")
    return r


def _transfer(obj: str, runs: pd.DataFrame, curves: pd.DataFrame, fp: pd.DataFrame, cfg: Config,
              pd_obj: dict) -> dict | None:
    o = runs[runs["objective"] == obj]
    if not (o["init_from"].fillna("").astype(str).str.len() > 0).any():
        return None
    rr = runs.copy()
    bmap = dict(zip(fp["run_id"], fp["budget"])) if len(fp) else {}
    rr["budget"] = [bmap.get(r, b) for r, b in zip(rr["run_id"], rr["budget_flops"])]
    td = transfer.transfer_points(curves, rr, obj)
    pd_obj["transfer"] = td
    pd_obj["all_curves"] = curves[curves["run_id"].isin(o["run_id"])]
    fit = transfer.fit_transfer(td.points, n_boot=cfg.n_boot, seed=cfg.seed, pairs=td.pairs)
    sources = sorted({p["init_objective"] for p in td.pairs if p["init_objective"]})
    base = {"source_objectives": sources, "pairs": td.pairs, "notes": td.notes}
    if fit is None:
        base.update(status="skipped",
                    reason=f"objective {obj}: the transfer law needs >= 2 transfer runs paired with a scratch run "
                           f"of the same size; got {len(td.pairs)}")
        return base
    boot = fit.pop("_boot")
    base.update(fit)
    base["warnings"], base["unusable"] = trust.transfer_warnings(base)
    cols = ["log_k", "a", "b", "eta"]
    base["bootstrap_samples"] = {
        k: _samples(np.column_stack([np.nan_to_num(v[c], nan=0.0) if c in ("b", "eta") else v[c] for c in cols]))
        for k, v in boot.items()}
    base["bootstrap_samples_columns"] = cols
    _log(cfg, f"[{obj}] transfer: D_t = {fit['k']:.3g}·D_F^{fit['a']:.3f}·N^{fit['b'] if fit['b'] is not None else float('nan'):.3f}")
    return base


def _repetition(obj: str, o_runs: pd.DataFrame, curves: pd.DataFrame, cfg: Config) -> dict | None:
    """Muennighoff's repetition law from this objective's repeated/fresh pairs (``repetition.py``); None
    without such pairs. With several repeated datasets, the one with most pairs (the others in ``others``)."""
    by_data = repetition.pairs_from_runs(o_runs, curves)
    fits = []
    for name, pairs in sorted(by_data.items(), key=lambda kv: -len(kv[1])):
        u = (cfg.unique_tokens or {}).get(name)
        f = repetition.fit_dataset(name, pairs, unique=u, n_boot=cfg.n_boot_repetition, seed=cfg.seed)
        if f is not None:
            f["fresh_pairs"] = [p["fresh_label"] for p in pairs]
            fits.append(f)
    if not fits:
        return None
    main, others = fits[0], fits[1:]
    if others:
        main["others"] = others
    r = main["r_star"]
    _log(cfg, f"[{obj}] repetition ({main['dataset']}): " + (
        f"R* = {r:.3g} 95% {_fmt_ci(main['r_star_ci95'])}, U = {main['unique_tokens']:.3g}" if r is not None
        else main["reason"]))
    return main
