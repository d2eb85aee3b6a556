"""``protscale fit`` end to end: read the store, analyse, write results.json + report + plots, and log
them all to an MLflow run tagged kind=analysis in the first experiment."""

from __future__ import annotations

import time
from pathlib import Path

from protscale.tracking import contract as c

from .pipeline import Analysis, Config, _log, analyze
from .plots import make_plots
from .report import write_report
from .results import validate, write_results


def write_outputs(an: Analysis, out: Path) -> list[Path]:
    """Write plots, report and results.json into a hidden sibling folder first, then move the finished
    files into ``out`` (results.json last): an interrupted or failed fit leaves no half-written output."""
    import os
    import shutil

    out = Path(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plots = make_plots(an.results, an.plot_data, tmp)
        write_results(an.results, tmp / "results.json")
        md, htm = write_report(an.results, plots, tmp)
        done = [*plots, md, htm, tmp / "results.json"]
        out.mkdir(parents=True, exist_ok=True)
        for f in done:
            os.replace(f, out / Path(f).name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / "results.json", out / Path(md).name, out / Path(htm).name, *(out / Path(p).name for p in plots)]


def _metrics(results: dict) -> dict[str, float]:
    m = {}
    for obj, r in results["objectives"].items():
        iso = r.get("isoflop") or {}
        for k in ("n_exponent", "d_exponent"):
            if iso.get(k) is not None:
                m[f"{obj}.isoflop.{k}"] = iso[k]
                ci = iso.get(f"{k}_ci95")
                if ci:
                    m[f"{obj}.isoflop.{k}_ci95_low"], m[f"{obj}.isoflop.{k}_ci95_high"] = ci
        env = r.get("envelope") or {}
        if env.get("b") is not None:
            m[f"{obj}.envelope.b"] = env["b"]
        par = r.get("parametric") or {}
        if "best" in par:
            for k, v in par["best"].items():
                m[f"{obj}.parametric.{k}"] = v
            m[f"{obj}.parametric.allocation_exponent"] = par["allocation_exponent"]
            m[f"{obj}.parametric.n_basins"] = len(par["basins"])
        tr = r.get("transfer") or {}
        for k in ("k", "a", "b"):
            if tr.get(k) is not None:
                m[f"{obj}.transfer.{k}"] = tr[k]
    return {k: float(v) for k, v in m.items() if v is not None}


def log_to_mlflow(tracking_uri: str, experiment_id: str, results: dict, out: Path, experiments: list[str]) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id, run_name=f"analysis-{time.strftime('%Y%m%d-%H%M%S')}", tags={
        c.KIND: "analysis", c.SOURCE: "analysis", c.STATUS: c.STATUS_RUNNING,
        "analysis.experiments": ",".join(experiments), "analysis.schema_version": str(results["schema_version"])})
    rid = run.info.run_id
    try:
        now = int(time.time() * 1000)
        cfg = results.get("config", {})
        params = [Param(f"analysis.{k}", str(v)[:500]) for k, v in cfg.items()]
        metrics = [Metric(k, v, now, 0) for k, v in _metrics(results).items()]
        client.log_batch(rid, metrics=metrics, params=params)
        client.log_artifacts(rid, str(out))
        client.set_tag(rid, c.STATUS, c.STATUS_COMPLETED)
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_tag(rid, c.STATUS, c.STATUS_FAILED)
        client.set_terminated(rid, "FAILED")
        raise
    return rid


def run_fit(tracking_uri: str, experiments: list[str], out: Path, cfg: Config, *, log: bool = True) -> dict:
    from .data import load_store

    t0 = time.monotonic()
    _log(cfg, f"reading {', '.join(experiments)} from {tracking_uri}")
    runs, curves, exp_ids = load_store(tracking_uri, experiments, cfg.metric)
    _log(cfg, f"  {len(runs)} run(s), {len(curves)} point(s) of {cfg.metric} in {time.monotonic() - t0:.1f}s")
    an = analyze(runs, curves, cfg, experiments=experiments, tracking_uri=tracking_uri)
    problems = validate(an.results)
    if problems:  # a bug, not a user error
        raise RuntimeError("results.json does not follow its schema: " + "; ".join(problems))
    files = write_outputs(an, out)
    run_id = None
    if log:
        run_id = log_to_mlflow(tracking_uri, exp_ids[experiments[0]], an.results, out, experiments)
    return {"results": an.results, "files": files, "run_id": run_id, "seconds": time.monotonic() - t0}
