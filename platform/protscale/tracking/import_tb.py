"""``protscale import tb-csv``: TensorBoard CSV exports (``Wall time,Step,Value``) -> MLflow runs.

Step 3, writing runs. The steps before it: ``tb_parse`` (file-name grammar, parsing one export) and
``tb_plan`` (grouping the exports that hold the same curve, one planned run per curve, defects).

Each run follows ``contract``: params objective, size, n_params, n_params_non_embedding (both N: the
vocabulary is tiny), budget_flops, tokens_target, seq_len, mask_ratio, flops_convention, lr_max where
named, init_from / init_objective / init_budget_flops for transfer runs; tags source=imported,
kind=trial, status=completed (diverged if a value is not finite), sweep, trial, the sweep's parent run,
plus the import tags below; metrics ``val_loss`` / ``train_loss`` / ``test_loss`` and ``tokens``,
``flops`` at the same steps. **Step** = 1-based index of the point in the export (TensorBoard keeps at
most 1000 evenly spread points, so optimizer steps are unknown); timestamps are the wall times.

Idempotent: a curve is skipped when a finished imported run in the experiment already lists one of its
files (``import_files``, relative to DIR) or its content hash; an unfinished one (an interrupted import)
is deleted and imported again.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from protscale.errors import UserError

from . import contract as c
from .runs import experiment_id
from .tb_parse import DEFAULT_SIZE_MAP, Finding, load_size_map
from .tb_plan import Plan, PlannedRun, scan

# the importer's public names, whichever step module defines them (the CLI imports them from here)
__all__ = ["DEFAULT_SIZE_MAP", "Plan", "PlannedRun", "Summary", "import_tb_csv", "load_size_map", "scan"]

# --- tags written by this importer (strings shared with the analysis live in contract.py) -------------
IMPORT_PATH = "import_path"          # the curve's canonical file, relative to the imported DIR
IMPORT_FILES = "import_files"        # every file holding this curve (copies, other axes), one per line
IMPORT_SHA256 = "import_sha256"      # sha256 of every such file, one per line
DEFECTS = c.DEFECTS                  # comma-separated defect codes ("" when clean)
TB_RUN = "tb_run"                    # the run name inside the export's file name
TB_TAG = "tb_tag"                    # the TensorBoard tag
X_AXES = "x_axes"                    # the exported x-axes merged into this run, e.g. "flops,tokens"
SIZE_SOURCE = "size_source"          # folder | name | name+folders | nearest | axes
BUDGET_SOURCE = c.BUDGET_SOURCE      # name | tokens_target | curve_end
INIT_OBJECTIVE = c.INIT_OBJECTIVE
INIT_BUDGET_FLOPS = c.INIT_BUDGET_FLOPS

FLOPS_CONVENTION_6N = "6N"           # flops = 6 · N(non-embedding) · tokens, as the exports' axis
MAX_METRICS_PER_CALL = 1000


# --- writing to MLflow ------------------------------------------------------------------------------------
@dataclass
class Summary:
    imported: list[tuple[str, str]] = field(default_factory=list)      # (rel, run_id)
    skipped: list[str] = field(default_factory=list)                   # rel of curves already there
    replaced: list[str] = field(default_factory=list)                  # unfinished runs deleted and redone
    findings: list[Finding] = field(default_factory=list)
    experiment_id: str = ""

    @property
    def defects(self) -> list[Finding]:
        return [f for f in self.findings if f.defect]


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def import_tb_csv(root: str | Path, experiment: str, tracking_uri: str | None = None,
                  size_map: dict[str, int] | None = None, sweep: str | None = None, seq_len: int = 1024,
                  dry_run: bool = False, out: Callable[[str], None] = print, verbose: bool = False) -> Summary:
    """Import every TensorBoard CSV export under ``root`` into ``experiment`` (see the module docstring)."""
    plan = scan(root, size_map, seq_len, progress=out)
    summary = Summary(findings=plan.findings)
    sweep = sweep or experiment
    if dry_run:
        for i, r in enumerate(plan.runs, 1):
            out(f"[{i}/{len(plan.runs)}] would import {_describe(r)}")
        _report(plan, summary, out, verbose, dry_run=True)
        return summary

    from mlflow.entities import Metric, Param, ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = c.resolve_tracking_uri(tracking_uri or c.default_tracking_uri())
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is not None and exp.lifecycle_stage != "active":
            raise UserError(f"experiment {experiment!r} is deleted in {uri}; restore it or choose another name")
        exp_id = exp.experiment_id if exp else experiment_id(uri, experiment)   # artifacts beside a SQLite store
    except MlflowException as exc:
        raise UserError(f"{uri}: {exc.message}") from None
    summary.experiment_id = exp_id

    # What is already there (idempotency) and the sweep's parent run.
    existing = []
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string=f"tags.{c.SOURCE} = '{c.SOURCE_IMPORTED}'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=50_000, page_token=token)
        existing.extend(page)
        token = page.token
        if not token:
            break
    done_paths: dict[str, str] = {}
    done_hashes: dict[str, str] = {}
    parent_id = None
    known: list[tuple[str, str, str, float, str]] = []       # (run_id, objective, size, budget, metric)
    for r in existing:
        tags = r.data.tags
        if tags.get(c.KIND) == "sweep" and tags.get(c.SWEEP) == sweep:
            parent_id = parent_id or r.info.run_id
            continue
        if IMPORT_FILES not in tags:
            continue
        if r.info.status != "FINISHED":
            client.delete_run(r.info.run_id)
            summary.replaced.append(tags.get(IMPORT_PATH, r.info.run_id))
            continue
        for p in tags[IMPORT_FILES].splitlines():
            done_paths[p] = r.info.run_id
        for h in tags.get(IMPORT_SHA256, "").splitlines():
            done_hashes[h] = r.info.run_id
        pr = r.data.params
        try:
            known.append((r.info.run_id, pr.get(c.OBJECTIVE, ""), pr.get(c.SIZE, ""),
                          float(pr.get(c.BUDGET_FLOPS, "nan")), tags.get("metric", "")))
        except ValueError:
            pass

    todo = []
    for r in plan.runs:
        hit = next((done_paths[e.rel] for e in r.files if e.rel in done_paths), None) or \
            next((done_hashes[e.sha256] for e in r.files if e.sha256 in done_hashes), None)
        if hit:
            summary.skipped.append(r.rel)
        else:
            todo.append(r)
    if summary.skipped:
        out(f"{len(summary.skipped)} curve(s) already imported into {experiment!r}: skipped")

    if todo and parent_id is None:
        parent = client.create_run(exp_id, run_name=f"{sweep} (imported)", tags={
            c.KIND: "sweep", c.SWEEP: sweep, c.SOURCE: c.SOURCE_IMPORTED, c.STATUS: c.STATUS_COMPLETED,
            IMPORT_PATH: str(Path(root).resolve())})
        parent_id = parent.info.run_id
        client.set_terminated(parent_id, "FINISHED")

    for i, r in enumerate(todo, 1):
        init_from = ""
        if r.init_objective:
            match = [k for k in known if k[1] == r.init_objective and k[2] == r.size
                     and r.init_budget and math.isclose(k[3], r.init_budget, rel_tol=1e-6)]
            match.sort(key=lambda k: k[4] != c.VAL_LOSS)
            init_from = match[0][0] if match else f"{r.init_objective}:{r.size}:{_fmt(r.init_budget or 0)}"
        params = {
            c.OBJECTIVE: r.objective, c.SIZE: r.size, c.N_PARAMS: int(r.n), c.N_PARAMS_NON_EMBEDDING: int(r.n),
            c.BUDGET_FLOPS: _fmt(r.budget), c.TOKENS_TARGET: _fmt(r.tokens_target), c.SEQ_LEN: r.seq_len,
            c.MASK_RATIO: 0.15 if r.objective == "mlm" else 0.0, c.FLOPS_CONVENTION: FLOPS_CONVENTION_6N,
            c.INIT_FROM: init_from,
        }
        if r.lr is not None:
            params[c.LR_MAX] = _fmt(r.lr)
        if r.init_objective:
            params[INIT_OBJECTIVE] = r.init_objective
            params[INIT_BUDGET_FLOPS] = _fmt(r.init_budget or float("nan"))
        finite = bool(np.all(np.isfinite(r.value)))
        canon = r.canonical
        tags = {
            c.SWEEP: sweep, c.SOURCE: c.SOURCE_IMPORTED, c.KIND: "trial", c.TRIAL: r.rel,
            c.STATUS: c.STATUS_COMPLETED if finite else c.STATUS_DIVERGED, c.PARENT_RUN_ID: parent_id,
            IMPORT_PATH: r.rel, IMPORT_FILES: "\n".join(e.rel for e in r.files),
            IMPORT_SHA256: "\n".join(dict.fromkeys(e.sha256 for e in r.files)), DEFECTS: ",".join(r.defects),
            TB_RUN: canon.label, TB_TAG: canon.tb_tag, X_AXES: ",".join(dict.fromkeys(e.axis for e in r.files)),
            SIZE_SOURCE: r.size_source, BUDGET_SOURCE: r.budget_source, "metric": r.metric,
        }
        if canon.data:
            tags["data"] = canon.data
        if canon.epochs is not None:
            tags["epochs"] = _fmt(canon.epochs)
        run = client.create_run(exp_id, start_time=int(r.timestamps[0]), run_name=r.run_name,
                                tags={k: str(v) for k, v in tags.items()})
        run_id = run.info.run_id
        try:        # a run is in the store whole or not at all (Ctrl-C or an error midway: deleted)
            metrics = []
            for key, arr in ((r.metric, r.value), (c.TOKENS, r.tokens), (c.FLOPS, r.flops)):
                metrics.extend(Metric(key, float(v), int(t), int(s)) for v, t, s in zip(arr, r.timestamps, r.steps))
            param_list = [Param(k, str(v)) for k, v in params.items()]
            first = MAX_METRICS_PER_CALL - len(param_list)
            client.log_batch(run_id, metrics=metrics[:first], params=param_list)
            for j in range(first, len(metrics), MAX_METRICS_PER_CALL):
                client.log_batch(run_id, metrics=metrics[j:j + MAX_METRICS_PER_CALL])
            client.set_terminated(run_id, "FINISHED", end_time=int(r.timestamps[-1]))
        except BaseException:
            _delete_half_written(client, run_id)    # (a re-run would also replace an unfinished run)
            raise
        known.append((run_id, r.objective, r.size, r.budget, r.metric))
        summary.imported.append((r.rel, run_id))
        out(f"[{i}/{len(todo)}] {_describe(r)} -> run {run_id[:8]}")
    _report(plan, summary, out, verbose, dry_run=False, experiment=experiment, uri=uri)
    return summary


def _delete_half_written(client, run_id: str) -> None:
    """Delete a run whose import was cut short. A Ctrl-C inside a SQLite write leaves that write's
    connection holding the database lock until it is rolled back and collected (seen on a loaded machine:
    "database is locked"): collect it and retry for a few seconds."""
    import gc
    import time

    for attempt in range(20):
        try:
            client.delete_run(run_id)
            return
        except Exception as exc:
            if "locked" not in str(exc) or attempt == 19:
                raise
            gc.collect()
            time.sleep(0.5)


def _describe(r: PlannedRun) -> str:
    extra = f" +{len(r.files) - 1} file(s)" if len(r.files) > 1 else ""
    init = f" from {r.init_objective} {r.init_budget:.3g}" if r.init_objective else ""
    flags = f" [{','.join(r.defects)}]" if r.defects else ""
    return (f"{r.rel}{extra}: {r.objective} {r.size} C={r.budget:.3g}{init} {r.metric} "
            f"({len(r.value)} pts){flags}")


def _report(plan: Plan, summary: Summary, out, verbose: bool, dry_run: bool, experiment: str = "",
            uri: str = "") -> None:
    defects, notes = plan.defects, plan.notes
    if defects:
        out(f"defects ({len(defects)}):")
        for f in defects:
            out(f"  {f}")
    if notes:
        counts = Counter(f.code for f in notes)
        out(f"notes ({len(notes)}: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
            + ("" if verbose else "; --verbose lists them"))
        if verbose:
            for f in notes:
                out(f"  {f}")
    by_code = Counter(f.code for f in defects)
    codes = ", ".join(f"{k} {v}" for k, v in sorted(by_code.items())) or "none"
    files_in_runs = sum(len(r.files) for r in plan.runs)
    if dry_run:
        out(f"dry run: {plan.n_files} files -> {len(plan.runs)} runs ({files_in_runs} files in them); "
            f"defects: {codes}")
    else:
        extra = f", {len(summary.replaced)} unfinished replaced" if summary.replaced else ""
        out(f"imported {len(summary.imported)} runs, skipped {len(summary.skipped)} already imported{extra} "
            f"({plan.n_files} files -> {len(plan.runs)} curves) into {experiment!r} at {uri}; defects: {codes}")
