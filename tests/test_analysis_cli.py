"""End to end: `protscale fit` on a small synthetic MLflow SQLite store, then `protscale plan`."""

from __future__ import annotations

import contextlib
import io
import json
import time

import pandas as pd
import pytest

from protscale.analysis import synthetic
from protscale.analysis.results import REQUIRED_ISOFLOP, REQUIRED_PARAMETRIC, SCHEMA_VERSION, validate
from protscale.cli import main
from protscale.tracking import contract as c

FAST = ["--bootstrap", "100", "--bootstrap-parametric", "20", "--parametric-grid", "coarse", "-q"]


def _log_store(db, experiment: str, runs: pd.DataFrame, curves: pd.DataFrame, artifacts) -> str:
    """Log runs the way training does (contract params, tags, metrics by step) with log_batch."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.create_experiment(experiment, artifact_location=str(artifacts))
    parent = client.create_run(exp, run_name="sweep", tags={c.KIND: "sweep", c.SWEEP: experiment})
    ids = {}
    now = int(time.time() * 1000)
    for r in runs.itertuples():
        run = client.create_run(exp, run_name=r.run_id, tags={c.PARENT_RUN_ID: parent.info.run_id})
        rid = run.info.run_id
        ids[r.run_id] = rid
        params = {c.OBJECTIVE: r.objective, c.SIZE: f"{r.n_params:.3g}", c.N_PARAMS: int(r.n_params * 1.02),
                  c.N_PARAMS_NON_EMBEDDING: int(r.n_params), c.BUDGET_FLOPS: r.budget_flops,
                  c.TOKENS_TARGET: r.budget_flops / (6 * r.n_params), c.INIT_FROM: ids.get(r.init_from, r.init_from or "")}
        if r.init_from:
            params.update({c.INIT_OBJECTIVE: r.init_objective, c.INIT_BUDGET_FLOPS: r.init_budget_flops})
        g = curves[curves["run_id"] == r.run_id]
        metrics = []
        for s, tok, fl, lo in zip(g["step"], g["tokens"], g["flops"], g["loss"]):
            metrics += [Metric(c.VAL_LOSS, float(lo), now, int(s)), Metric(c.TOKENS, float(tok), now, int(s)),
                        Metric(c.FLOPS, float(fl), now, int(s))]
        tags = [RunTag(c.STATUS, r.status), RunTag(c.KIND, "trial"), RunTag(c.SOURCE, "trained"),
                RunTag(c.SWEEP, experiment)]
        if isinstance(getattr(r, "superseded_by", None), str):
            tags.append(RunTag(c.SUPERSEDED_BY, r.superseded_by))
        client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()], tags=tags)
        client.set_terminated(rid, "FINISHED")
    return exp


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    clm_r, clm_c = synthetic.parametric_runs(budgets=(1e18, 1e19, 1e20), sizes_per_budget=5, points=12, seed=21)
    mlm_law = dict(synthetic.LAW, E=1.9)
    mlm_r, mlm_c = synthetic.parametric_runs(law=mlm_law, budgets=(1e18, 1e19, 1e20), sizes_per_budget=5, points=12,
                                             seed=22, objective="mlm")
    tr_r, tr_c = synthetic.transfer_runs(law=mlm_law, sizes=(3e7, 1e8, 3e8), points=25, noise=0.001, seed=23)
    # a diverged trial, reported and left out
    bad = clm_r.iloc[[0]].assign(run_id="clm-diverged", run_name="clm-diverged")
    bad_c = clm_c[clm_c["run_id"] == clm_r["run_id"].iloc[0]].assign(run_id="clm-diverged")
    bad_c.loc[bad_c["step"] == 12, "loss"] = float("nan")
    # an older run of a trial whose config changed since (tagged superseded_by): never read by the analyzer
    old = clm_r.iloc[[1]].assign(run_id="clm-old", run_name="clm-old", superseded_by="another-run")
    old_c = clm_c[clm_c["run_id"] == clm_r["run_id"].iloc[1]].assign(run_id="clm-old")
    old_c["loss"] += 0.5
    runs = pd.concat([clm_r, mlm_r, tr_r, bad, old], ignore_index=True)
    curves = pd.concat([clm_c, mlm_c, tr_c, bad_c, old_c], ignore_index=True)
    db = tmp / "mlflow.db"
    _log_store(db, "synth", runs, curves, tmp / "artifacts")
    return {"db": db, "tmp": tmp}


@pytest.fixture(scope="module")
def fitted(store):
    out = store["tmp"] / "fit"
    with contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main(["fit", "--experiment", "synth", "--tracking-uri", str(store["db"]), "--out", str(out), *FAST])
    assert rc == 0
    (out / "stderr.txt").write_text(err.getvalue())
    return out


def test_fit_quiet_prints_no_progress(fitted):
    assert "reading" not in (fitted / "stderr.txt").read_text()


def test_superseded_runs_are_not_read(store, fitted):
    from protscale.analysis.data import load_store

    runs, curves, _ = load_store(f"sqlite:///{store['db']}", ["synth"])
    assert "clm-old" not in set(runs["run_name"]) and len(runs) > 0
    assert set(curves["run_id"]) <= set(runs["run_id"])
    res = json.loads((fitted / "results.json").read_text())
    assert res["checks"]["n_runs_in"] == len(runs[runs["kind"] == "trial"])


def test_fit_writes_all_outputs(fitted):
    names = {p.name for p in fitted.iterdir()}
    assert {"results.json", "report.md", "report.html", "isoflop_clm.png", "frontier_clm.png",
            "loss_vs_compute_clm.png", "isoflop_mlm.png", "transfer_mlm.png"} <= names
    html = (fitted / "report.html").read_text()
    assert "<table>" in html and "frontier_clm.png" in html


def test_results_json_follows_the_documented_schema(fitted):
    res = json.loads((fitted / "results.json").read_text())
    assert res["schema_version"] == SCHEMA_VERSION
    assert validate(res) == []
    for obj in ("clm", "mlm"):
        r = res["objectives"][obj]
        assert set(REQUIRED_ISOFLOP) <= set(r["isoflop"]) and set(REQUIRED_PARAMETRIC) <= set(r["parametric"])
        lo, hi = r["isoflop"]["n_exponent_ci95"]
        assert lo <= r["isoflop"]["n_exponent"] <= hi
        assert set(r["parametric"]["best"]) == {"E", "A", "B", "alpha", "beta"}
    truth = synthetic.LAW["beta"] / (synthetic.LAW["alpha"] + synthetic.LAW["beta"])
    assert res["objectives"]["clm"]["parametric"]["allocation_exponent"] == pytest.approx(truth, abs=0.05)
    tr = res["objectives"]["mlm"]["transfer"]
    assert tr["a"] == pytest.approx(0.2, abs=0.05) and tr["source_objectives"] == ["clm"]
    assert res["objectives"]["clm"]["transfer"] is None
    assert {"run_id": None, "check": "non_finite"}.keys() <= res["checks"]["excluded"][0].keys()
    assert any(e["check"] == "non_finite" for e in res["checks"]["excluded"])
    # the documentation names every top-level and per-objective key
    doc = (__import__("protscale.analysis.results", fromlist=["x"]).SCHEMA_DOC).read_text()
    for key in ("n_exponent_ci95", "d_exponent_ci95", "allocation_exponent", "basins", "schema_version"):
        assert f"`{key}" in doc


def test_fit_logged_an_analysis_run(store, fitted):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store['db']}")
    exp = client.get_experiment_by_name("synth")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.{c.KIND} = 'analysis'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert "clm.isoflop.n_exponent" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "report.md", "report.html", "frontier_clm.png"} <= arts


def test_plan_answers_from_results(fitted, capsys):
    res = fitted / "results.json"
    assert main(["plan", "--budget-flops", "1e21", "--objective", "clm", "--results", str(res), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    iso = p["isoflop"]
    assert iso["n_ci95"][0] <= iso["n"] <= iso["n_ci95"][1]
    assert iso["d"] == pytest.approx(1e21 / (6 * iso["n"]))
    expect = synthetic.law_n_opt(synthetic.LAW, 1e21)
    assert p["parametric"]["n"] == pytest.approx(expect, rel=0.5)
    # a usable law, asked beyond the budgets it was fitted on (1e18 to 1e20): usable, with a warning
    assert p["usable"] and iso["usable"]
    assert any("10.0× above the largest budget sampled" in w for w in iso["warnings"])
    assert main(["plan", "--budget-flops", "1e21", "--objective", "both", "--results", str(res)]) == 0
    out = capsys.readouterr().out
    assert "clm pre-training then mlm" in out and "N = " in out


def test_plan_without_that_objective_is_a_clear_error(fitted, tmp_path, capsys):
    res = json.loads((fitted / "results.json").read_text())
    del res["objectives"]["mlm"]
    res["allocation"] = []
    p = tmp_path / "results.json"
    p.write_text(json.dumps(res))
    assert main(["plan", "--budget-flops", "1e20", "--objective", "mlm", "--results", str(p)]) == 2
    err = capsys.readouterr().err
    assert "no fit for objective 'mlm'" in err and "Traceback" not in err
    assert main(["plan", "--budget-flops", "1e20", "--objective", "both", "--results", str(p)]) == 2
    assert "needs a parametric law and a transfer fit" in capsys.readouterr().err
    assert main(["plan", "--budget-flops", "1e20", "--objective", "clm", "--results", str(tmp_path / "nope.json")]) == 2


def test_fit_on_degenerate_store_is_a_clear_error(tmp_path, capsys):
    runs, curves = synthetic.parametric_runs(budgets=(1e19,), sizes_per_budget=4, points=6, seed=30)
    db = tmp_path / "one.db"
    _log_store(db, "one-budget", runs, curves, tmp_path / "art")
    rc = main(["fit", "--experiment", "one-budget", "--tracking-uri", str(db), "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "at least 2 budgets" in err and "Traceback" not in err
    rc = main(["fit", "--experiment", "no-such", "--tracking-uri", str(db), "--out", str(tmp_path / "o"), *FAST])
    assert rc == 2


def test_fit_without_bracketed_minima_writes_a_report_and_says_how_to_extend(tmp_path, capsys):
    # the CPU demo's regime: at every budget the best run is the smallest model, so no frontier
    runs, curves = synthetic.parametric_runs(budgets=(1e18, 1e19, 1e20), sizes_per_budget=4, span_decades=1.2,
                                             offset_decades=1.2, noise=0.001, points=6, seed=31)
    db = tmp_path / "edge.db"
    _log_store(db, "edge", runs, curves, tmp_path / "art")
    out = tmp_path / "o"
    rc = main(["fit", "--experiment", "edge", "--tracking-uri", str(db), "--out", str(out), "--no-log", *FAST])
    cap = capsys.readouterr()
    assert rc == 0 and "Traceback" not in cap.err
    assert "IsoFLOP not fitted" in cap.out and "extend the grid towards smaller models" in cap.out
    res = json.loads((out / "results.json").read_text())
    assert validate(res) == [] and res["objectives"]["clm"]["isoflop"]["status"] == "skipped"
    assert "extend the grid towards smaller models" in (out / "report.md").read_text()
