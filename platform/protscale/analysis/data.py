"""Inputs of the fits: one row per run (``runs``) and one row per curve point (``curves``).

The fits take plain pandas frames so they can be tested on synthetic data; :func:`load_store` builds them
from the tracking store with the bulk reader (``protscale.tracking.reader``).

``runs`` columns: run_id, experiment, run_name, objective, size, n_params (non-embedding N; the total
count when the non-embedding one is missing), budget_flops (NaN if unknown), budget_source ("curve_end"
when the budget is only where the curve happens to end -- importer tag ``budget_source`` -- else
planned), init_from, init_objective, init_budget_flops, status (trial outcome tag), kind, source,
defects (importer's tag), data and epochs (tags naming the training set and how many times it was seen,
e.g. ``ur50`` repeated against ``all`` seen once: ``repetition.pairs_from_runs``).

``curves`` columns: run_id, step, tokens, flops, loss (the chosen metric, ``val_loss`` by default).

Runs tagged ``superseded_by`` (an older run of a trial whose config changed since: ``tracking.runs``) are
left out of both: the trial's current run stands for it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from protscale.errors import UserError
from protscale.tracking import contract as c

RUN_COLUMNS = ["run_id", "experiment", "run_name", "objective", "size", "n_params", "budget_flops", "budget_source",
               "init_from", "init_objective", "init_budget_flops", "status", "kind", "source", "defects",
               "data", "epochs"]
#: Tag an importer may set on a run whose budget it could not read (values: name, tokens_target, curve_end).
BUDGET_SOURCE_TAG = c.BUDGET_SOURCE
CURVE_COLUMNS = ["run_id", "step", "tokens", "flops", "loss"]


def make_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Fill missing optional columns of a user-made ``runs`` frame (tests, notebooks)."""
    out = df.copy()
    for col in RUN_COLUMNS:
        if col not in out:
            out[col] = np.nan if col in ("budget_flops", "init_budget_flops", "epochs") else None
    for col in ("n_params", "budget_flops", "init_budget_flops", "epochs"):
        out[col] = pd.to_numeric(out[col], errors="coerce")
    out["init_from"] = out["init_from"].fillna("").astype(str)
    out["objective"] = out["objective"].astype(object).where(out["objective"].notna(), None)
    return out[RUN_COLUMNS + [k for k in out.columns if k not in RUN_COLUMNS]]


def from_tables(tables, metric: str = c.VAL_LOSS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves) from the reader's :class:`Tables`."""
    from protscale.tracking.reader import curves as reader_curves

    r = tables.runs.to_pandas()
    superseded = f"tags.{c.SUPERSEDED_BY}"
    if superseded in r:
        r = r[r[superseded].fillna("").astype(str).str.len() == 0].reset_index(drop=True)

    def col(name, default=None):
        return r[name] if name in r else pd.Series([default] * len(r), index=r.index)

    n = pd.to_numeric(col(c.N_PARAMS_NON_EMBEDDING), errors="coerce")
    n = n.where(n.notna() & (n > 0), pd.to_numeric(col(c.N_PARAMS), errors="coerce"))
    runs = pd.DataFrame({
        "run_id": r["run_id"], "experiment": col("experiment"), "run_name": col("run_name"),
        "objective": col(f"params.{c.OBJECTIVE}"), "size": col(f"params.{c.SIZE}"), "n_params": n,
        "budget_flops": pd.to_numeric(col(c.BUDGET_FLOPS), errors="coerce"),
        "budget_source": col(f"tags.{BUDGET_SOURCE_TAG}"),
        "init_from": col(f"params.{c.INIT_FROM}"),
        "init_objective": col(f"params.{getattr(c, 'INIT_OBJECTIVE', 'init_objective')}"),
        "init_budget_flops": pd.to_numeric(col(f"params.{getattr(c, 'INIT_BUDGET_FLOPS', 'init_budget_flops')}"),
                                           errors="coerce"),
        "status": col(f"tags.{c.STATUS}"), "kind": col(f"tags.{c.KIND}"), "source": col(f"tags.{c.SOURCE}"),
        "defects": col(f"tags.{getattr(c, 'DEFECTS', 'defects')}"),
        "data": col("tags.data"), "epochs": pd.to_numeric(col("tags.epochs"), errors="coerce"),
    })
    runs = make_runs(runs)
    cv = reader_curves(tables, metric)
    curves = cv[cv["run_id"].isin(runs["run_id"])].rename(columns={"value": "loss"})[CURVE_COLUMNS].copy()
    return runs, curves


def load_store(tracking_uri: str, experiments: list[str], metric: str = c.VAL_LOSS):
    """Read the experiments in bulk and return (runs, curves, experiment_ids)."""
    from protscale.tracking.reader import read_experiments

    tables = read_experiments(tracking_uri, experiments, metric_keys=[metric, c.TOKENS, c.FLOPS])
    runs, curves = from_tables(tables, metric)
    if runs.empty:
        raise UserError(f"no runs in experiment(s) {', '.join(experiments)}")
    return runs, curves, dict(tables.experiment_ids)
