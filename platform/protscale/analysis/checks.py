"""Data checks run before any fit. Problems are reported (``CheckReport``), never silently fitted.

Every run that a check removes is listed with its reason in ``results.json`` (``checks.excluded``) and
in the report. Checks, in order:

``not_a_trial``      runs tagged kind=sweep/analysis (parents, earlier analyses): skipped, counted only
``missing_params``   no objective or no parameter count N: excluded
``no_curve``         no point of the fitted metric (e.g. only a training loss was logged): excluded
``status``           tag status = diverged / failed / running: excluded (running: not finished)
``no_axis``          neither tokens nor FLOPs logged: excluded; one of them missing: derived from the
                     other with C = 6·N·D (info)
``non_finite``       a NaN/inf loss: excluded as diverged
``loss_blow_up``     final loss > ``blowup_ratio`` × the lowest loss of the run: excluded as diverged
``flops_axis``       median |FLOPs / (6·N·tokens) − 1| > ``flops_tol``: the compute axis disagrees with
                     N and tokens (wrong N, or a wrong token count): excluded, with the N it implies
``duplicate_curve``  byte-identical loss sequences under several runs: one copy kept when they agree on
                     N; all copies excluded when they name different N (the size is ambiguous)
``importer_defect``  defects an importer wrote in the run's ``defects`` tag: listed (info; the checks
                     above are what exclude)

Budget-level checks (too few sizes, an unbracketed minimum) are done by the IsoFLOP fit and reported
in results.json (``isoflop`` → ``dropped_budgets``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from protscale.tracking import contract as c

BAD_STATUS = {c.STATUS_DIVERGED: "diverged", c.STATUS_FAILED: "failed", c.STATUS_RUNNING: "still running"}


@dataclass
class CheckReport:
    issues: list[dict] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)   # run_id -> check name
    n_runs_in: int = 0
    n_runs_clean: int = 0

    def add(self, check: str, severity: str, run_ids, message: str) -> None:
        run_ids = [str(r) for r in run_ids]
        self.issues.append({"check": check, "severity": severity, "run_ids": run_ids, "message": message})
        if severity == "excluded":
            for r in run_ids:
                self.excluded.setdefault(r, check)

    def to_json(self) -> dict:
        by = {}
        for k in self.excluded.values():
            by[k] = by.get(k, 0) + 1
        return {"n_runs_in": self.n_runs_in, "n_runs_clean": self.n_runs_clean, "excluded_by_check": by,
                "excluded": [{"run_id": r, "check": k} for r, k in self.excluded.items()],
                "issues": self.issues}

    def summary(self) -> str:
        by = self.to_json()["excluded_by_check"]
        if not by:
            return "no run excluded"
        return "excluded: " + ", ".join(f"{k} {v}" for k, v in sorted(by.items()))


def _names(runs: pd.DataFrame, ids, limit: int = 6) -> str:
    nm = runs.set_index("run_id")["run_name"] if "run_name" in runs else None
    out = []
    for r in list(ids)[:limit]:
        n = nm.get(r) if nm is not None else None
        out.append(f"{n} ({str(r)[:8]})" if isinstance(n, str) and n else str(r)[:12])
    more = len(ids) - limit
    return ", ".join(out) + (f" and {more} more" if more > 0 else "")


def run_checks(runs: pd.DataFrame, curves: pd.DataFrame, *, flops_tol: float = 0.05, blowup_ratio: float = 1.10,
               ) -> tuple[pd.DataFrame, pd.DataFrame, CheckReport]:
    """Apply the checks; returns (clean runs, clean curves, report). Curves get tokens/FLOPs filled in."""
    rep = CheckReport(n_runs_in=int(len(runs)))
    runs = runs.copy()
    kind = runs["kind"].fillna("").astype(str)
    skip = runs[kind.isin(["sweep", "analysis"])]
    if len(skip):
        rep.issues.append({"check": "not_a_trial", "severity": "info", "run_ids": [],
                           "message": f"{len(skip)} sweep/analysis run(s) skipped"})
    runs = runs[~kind.isin(["sweep", "analysis"])]
    rep.n_runs_in = int(len(runs))

    bad = runs[runs["objective"].isna() | ~(runs["n_params"] > 0)]
    if len(bad):
        rep.add("missing_params", "excluded", bad["run_id"],
                f"{len(bad)} run(s) without objective or parameter count: {_names(runs, bad['run_id'])}")

    curves = curves[curves["run_id"].isin(runs["run_id"])].copy()
    have = set(curves["run_id"].unique())
    nocurve = runs[~runs["run_id"].isin(have)]
    if len(nocurve):
        rep.add("no_curve", "excluded", nocurve["run_id"],
                f"{len(nocurve)} run(s) without a point of the fitted loss metric: {_names(runs, nocurve['run_id'])}")

    st = runs["status"].fillna("").astype(str).str.lower()
    for status, word in BAD_STATUS.items():
        ids = runs.loc[st == status, "run_id"]
        if len(ids):
            rep.add("status", "excluded", ids, f"{len(ids)} run(s) {word} (status tag): {_names(runs, ids)}")

    nmap = runs.set_index("run_id")["n_params"]
    curves["n"] = curves["run_id"].map(nmap)
    tok_missing = curves["tokens"].isna() & curves["flops"].notna()
    flo_missing = curves["flops"].isna() & curves["tokens"].notna()
    if tok_missing.any():
        ids = curves.loc[tok_missing, "run_id"].unique()
        curves.loc[tok_missing, "tokens"] = curves.loc[tok_missing, "flops"] / (6 * curves.loc[tok_missing, "n"])
        rep.add("no_axis", "info", ids, f"tokens missing at some steps of {len(ids)} run(s): derived as FLOPs/(6·N)")
    if flo_missing.any():
        ids = curves.loc[flo_missing, "run_id"].unique()
        curves.loc[flo_missing, "flops"] = 6 * curves.loc[flo_missing, "n"] * curves.loc[flo_missing, "tokens"]
        rep.add("no_axis", "info", ids, f"FLOPs missing at some steps of {len(ids)} run(s): derived as 6·N·tokens")
    noaxis = curves.groupby("run_id")["tokens"].apply(lambda s: s.notna().sum() == 0)
    ids = noaxis[noaxis].index
    if len(ids):
        rep.add("no_axis", "excluded", ids, f"{len(ids)} run(s) log neither tokens nor FLOPs: {_names(runs, ids)}")
    partial = curves["tokens"].isna() & ~curves["run_id"].isin(ids)
    if partial.any():
        pids = curves.loc[partial, "run_id"].unique()
        rep.add("no_axis", "info", pids, f"{int(partial.sum())} loss point(s) of {len(pids)} run(s) have neither "
                "tokens nor FLOPs at their step: dropped")
        curves = curves[~partial]

    g = curves.groupby("run_id")["loss"]
    nonfin = g.apply(lambda s: not np.all(np.isfinite(s.to_numpy(float))))
    ids = nonfin[nonfin].index
    if len(ids):
        rep.add("non_finite", "excluded", ids, f"{len(ids)} run(s) with NaN/inf losses (diverged): {_names(runs, ids)}")
    last = curves.sort_values(["run_id", "step"]).groupby("run_id")["loss"].last()
    lowest = g.min()
    blow = (last > blowup_ratio * lowest) & np.isfinite(last)
    ids = blow[blow].index
    if len(ids):
        rep.add("loss_blow_up", "excluded", ids,
                f"{len(ids)} run(s) end more than {100 * (blowup_ratio - 1):.0f}% above their lowest loss "
                f"(diverged): {_names(runs, ids)}")

    both = curves[(curves["tokens"] > 0) & (curves["flops"] > 0) & ~tok_missing & ~flo_missing]
    if not both.empty:
        ratio = (both["flops"] / (6 * both["n"] * both["tokens"])).groupby(both["run_id"]).median()
        off = ratio[np.abs(ratio - 1) > flops_tol]
        for rid, rr in off.items():
            n = nmap.get(rid)
            rep.add("flops_axis", "excluded", [rid],
                    f"{_names(runs, [rid])}: FLOPs/(6·N·tokens) = {rr:.3f} (N={n:,.0f}; the axis implies "
                    f"N={n * rr:,.0f})")

    # duplicated curves (identical loss sequences), among runs not excluded so far
    keep_ids = [r for r in runs["run_id"] if r not in rep.excluded]
    cur = curves[curves["run_id"].isin(keep_ids)].sort_values(["run_id", "step"])
    digests = cur.groupby("run_id")["loss"].apply(
        lambda s: hashlib.sha1(np.round(s.to_numpy(float), 7).tobytes()).hexdigest())
    for _, grp in digests.groupby(digests):
        ids = sorted(grp.index, key=lambda r: (str(runs.set_index("run_id").at[r, "run_name"] or ""), str(r)))
        if len(ids) < 2:
            continue
        ns = nmap.loc[ids].to_numpy(float)
        if np.all(np.abs(ns / ns[0] - 1) < 0.01):
            rep.add("duplicate_curve", "excluded", ids[1:],
                    f"identical loss curves: kept {_names(runs, ids[:1])}, excluded {_names(runs, ids[1:])}")
        else:
            rep.add("duplicate_curve", "excluded", ids,
                    f"identical loss curves under different sizes (N = {', '.join(f'{v:,.0f}' for v in ns)}): "
                    f"size ambiguous, all excluded: {_names(runs, ids)}")

    if "defects" in runs:
        d = runs["defects"].fillna("").astype(str)
        for rid, codes in zip(runs["run_id"], d):
            if codes.strip():
                rep.issues.append({"check": "importer_defect", "severity": "info", "run_ids": [str(rid)],
                                   "message": f"{_names(runs, [rid])}: importer reported {codes}"})

    clean_runs = runs[~runs["run_id"].isin(rep.excluded)].copy()
    clean_curves = curves[curves["run_id"].isin(clean_runs["run_id"])].drop(columns=["n"])
    rep.n_runs_clean = int(len(clean_runs))
    return clean_runs, clean_curves, rep


def final_points(runs: pd.DataFrame, curves: pd.DataFrame, *, snap_tol: float = 0.05,
                 reach_tol: float = 0.10) -> pd.DataFrame:
    """One row per run at the end of its curve, with its IsoFLOP budget label.

    A run's budget is its ``budget_flops`` param, or the compute where its curve ends when it has none.
    *Planned* budgets (a ``budget_flops`` the run was trained for) within ``snap_tol`` (relative, in C)
    of each other are merged into one IsoFLOP slice labelled by the most common value. Budgets that are
    only where a curve ends (no ``budget_flops``, or ``budget_source`` = ``curve_end``: a run trained to
    a token count, say) are merged among themselves the same way but never into a planned slice: a run
    that happens to end near a planned budget, with a schedule and recipe chosen otherwise, is not part
    of that IsoFLOP design. ``reached`` is false when the curve ends more than ``reach_tol`` below its
    budget (stopped early: not at its budget).
    """
    cur = curves.sort_values(["run_id", "step"])
    last = cur.groupby("run_id").agg(final_loss=("loss", "last"), final_flops=("flops", "last"),
                                     final_tokens=("tokens", "last"))
    pts = runs.set_index("run_id").join(last, how="inner").reset_index()
    src = pts["budget_source"].fillna("").astype(str) if "budget_source" in pts else pd.Series("", index=pts.index)
    declared = pts["budget_flops"].where((pts["budget_flops"] > 0) & (src != "curve_end"))
    pts["budget_source"] = np.where(declared.notna(), "planned", "curve_end")
    pts["budget_raw"] = declared.fillna(pts["budget_flops"].where(pts["budget_flops"] > 0)).fillna(pts["final_flops"])
    pts["reached"] = pts["final_flops"] >= (1 - reach_tol) * pts["budget_raw"]
    budget = np.full(len(pts), np.nan)
    for kind in ("planned", "curve_end"):
        m = (pts["budget_source"] == kind).to_numpy()
        budget[m] = _snap(pts.loc[m, "budget_raw"].to_numpy(float), snap_tol)
    pts["budget"] = budget
    return pts


def _snap(values: np.ndarray, tol: float) -> np.ndarray:
    """Merge values within ``tol`` (relative) of their neighbour into clusters labelled by their mode."""
    out = values.copy()
    ok = np.isfinite(values) & (values > 0)
    v = values[ok]
    if v.size == 0:
        return out
    order = np.argsort(v)
    sv = np.log(v[order])
    cluster = np.concatenate([[0], np.cumsum(np.diff(sv) > np.log1p(tol))])
    labels = np.empty_like(sv)
    for k in np.unique(cluster):
        members = v[order][cluster == k]
        vals, counts = np.unique(members, return_counts=True)
        mode = vals[np.argmax(counts)]   # most common; ties: the smallest
        # no chaining: members farther than tol from the label keep their own value
        labels[cluster == k] = np.where(np.abs(np.log(members / mode)) <= np.log1p(tol), mode, members)
    res = np.empty_like(v)
    res[order] = labels
    out[ok] = res
    return out
