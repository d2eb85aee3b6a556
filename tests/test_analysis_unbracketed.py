"""Sweeps whose IsoFLOP minima are not bracketed (every budget's best run is the smallest size, as in the
CPU demo sweep) and parametric fits that come out degenerate: the analysis still fits and reports what it
can, says why no frontier was fitted and which way to extend the grid, and never crashes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from protscale.analysis import allocation, synthetic
from protscale.analysis.data import make_runs
from protscale.analysis.pipeline import Config, analyze
from protscale.analysis.plan import format_plan, plan
from protscale.analysis.results import validate
from protscale.analysis.run import write_outputs
from protscale.errors import UserError

FAST = dict(n_boot=100, n_boot_parametric=20, parametric_grid="coarse", progress=False)


def _runs_from(loss_fn, budgets, sizes, points: int = 8):
    """Runs and curves (tokens, FLOPs = 6·N·tokens) of the given sizes at each budget, loss = loss_fn(N, D)."""
    runs, curves = [], []
    for C in budgets:
        for n in sizes:
            rid = f"clm-{C:.0e}-{n:.3g}"
            d = C / (6 * n)
            t = np.geomspace(d / 50, d, points)
            runs.append({"run_id": rid, "run_name": rid, "objective": "clm", "n_params": float(n),
                         "budget_flops": float(C), "status": "completed", "kind": "trial"})
            curves.append(pd.DataFrame({"run_id": rid, "step": np.arange(1, points + 1), "tokens": t,
                                        "flops": 6 * n * t, "loss": loss_fn(n, t)}))
    return make_runs(pd.DataFrame(runs)), pd.concat(curves, ignore_index=True)


@pytest.fixture(scope="module")
def too_large_grid(tmp_path_factory):
    # sizes 10^0.6 .. 10^1.8 × N_opt at every budget: each budget's best run is the smallest model
    runs, curves = synthetic.parametric_runs(budgets=(1e18, 1e19, 1e20), sizes_per_budget=4, span_decades=1.2,
                                             offset_decades=1.2, noise=0.001, points=10, seed=40)
    an = analyze(runs, curves, Config(**FAST))
    out = tmp_path_factory.mktemp("unbracketed")
    write_outputs(an, out)
    return an, out


def test_every_optimum_at_the_smallest_size_still_fits_and_says_extend_smaller(too_large_grid):
    an, out = too_large_grid
    res = an.results
    assert validate(res) == []
    iso = res["objectives"]["clm"]["isoflop"]
    assert iso["status"] == "skipped"
    assert "at least 2 budgets" in iso["reason"] and "extend the grid towards smaller models" in iso["reason"]
    assert iso["grid_advice"]["direction"] == "smaller"
    emp = iso["empirical_optima"]
    assert len(emp) == 3 and all(e["edge"] == "smallest" and e["n_best"] == e["n_min"] for e in emp)
    # what can be fitted is fitted: the envelope and the parametric law (on the runs of the IsoFLOP budgets)
    r = res["objectives"]["clm"]
    assert "b" in r["envelope"]
    assert "best" in r["parametric"] and r["parametric"]["n_points"] == 12
    # allocation rows come from the parametric law, over decades of the data's budgets (not 1e18..1e22 blindly)
    assert r["allocation"] and all("n" in row["parametric"] and "isoflop" not in row for row in r["allocation"])
    assert r["allocation"][0]["budget_flops"] == 1e18
    assert any("extend the grid towards smaller models" in n for n in res["notes"])
    # the files say it too
    md = (out / "report.md").read_text()
    assert "## Summary" in md and "extend the grid towards smaller models" in md and "**Not fitted.**" in md
    assert "Best run observed per budget" in md
    on_disk = json.loads((out / "results.json").read_text())
    assert validate(on_disk) == [] and on_disk["objectives"]["clm"]["isoflop"]["grid_advice"]["direction"] == "smaller"
    assert (out / "isoflop_clm.png").is_file() and not (out / "frontier_clm.png").exists()


def test_plan_on_a_fit_without_frontier_answers_from_the_parametric_law(too_large_grid):
    p = plan(too_large_grid[0].results, 1e21, "clm")
    assert "isoflop" not in p and p["parametric"]["n"] > 0
    assert "parametric" in format_plan(p)


def test_optimum_at_the_largest_size_says_extend_larger():
    runs, curves = synthetic.parametric_runs(budgets=(1e18, 1e19, 1e20), sizes_per_budget=4, span_decades=1.2,
                                             offset_decades=-1.2, noise=0.001, points=6, seed=41)
    from protscale.analysis import isoflop
    from protscale.analysis.checks import final_points, run_checks

    clean, cc, _ = run_checks(runs, curves)
    fp = final_points(clean, cc).rename(columns={"final_loss": "loss"})
    emp = isoflop.empirical_optima(fp)
    adv = isoflop.grid_advice(emp)
    assert adv["direction"] == "larger" and "extend the grid towards larger models" in adv["messages"][0]
    with pytest.raises(isoflop.FrontierNotFitted) as exc:
        isoflop.fit_isoflop(fp[["run_id", "n_params", "loss", "budget"]], n_boot=20)
    assert len(exc.value.dropped) == 3


def test_two_sizes_per_budget_falls_back_to_all_points_for_the_parametric_law():
    runs, curves = synthetic.parametric_runs(sizes_per_budget=2, seed=9, points=8)
    res = analyze(runs, curves, Config(**FAST)).results
    assert validate(res) == []
    r = res["objectives"]["clm"]
    assert r["isoflop"]["status"] == "skipped" and "only 2 model size" in r["isoflop"]["reason"]
    assert any("at least 3 sizes" in m for m in r["isoflop"]["grid_advice"]["messages"])
    par = r["parametric"]
    assert "best" in par and par["n_points"] == 10 and par["status"] == "warning"
    assert any("fitted on all 10 clean scratch runs" in w for w in par["warnings"])
    assert any(i["check"] == "parametric_points" for i in res["checks"]["issues"])


def test_negative_exponent_is_reported_not_a_crash(tmp_path):
    # loss rises with N at fixed tokens: the best fit has α < 0, a law without a compute-optimal size
    runs, curves = _runs_from(lambda n, d: 2.0 + 400 / d ** 0.3 + 0.02 * np.log(n / 1e6),
                              budgets=(1e17, 1e18, 1e19), sizes=np.logspace(6, 7.5, 4))
    an = analyze(runs, curves, Config(**FAST))
    res = an.results
    assert validate(res) == []
    par = res["objectives"]["clm"]["parametric"]
    assert par["best"]["alpha"] < 0
    assert par["degenerate"] is True and par["status"] == "warning" and "α" in par["reason"]
    assert par["allocation_exponent"] is None
    assert any(i["check"] == "parametric_degenerate" for i in res["checks"]["issues"])
    assert res["objectives"]["clm"]["allocation"] == []     # no frontier, no usable law: no table
    write_outputs(an, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "degenerate parametric solution" in md and "n/a (the law has no compute-optimal size)" in md
    with pytest.raises(UserError, match="neither an IsoFLOP frontier nor a parametric law.*degenerate"):
        plan(res, 1e20, "clm")


def _par(alpha, beta, samples=None):
    best = {"E": 2.0, "A": 100.0, "B": 1e4, "alpha": alpha, "beta": beta}
    return {"best": best, "basins": [], "allocation_exponent": None, "allocation_exponent_ci95": None,
            "bootstrap_samples": samples or {}}


def test_allocation_guards_every_closed_form():
    smp = {"run": [[2.0, 100.0, 1e4, a, 0.4] for a in np.linspace(-0.2, 0.5, 40)]}
    for alpha, beta in ((-0.2, 0.4), (0.3, -0.1), (0.0, 0.4), (float("nan"), 0.4), (None, 0.4)):
        row = allocation.compute_optimal({"parametric": _par(alpha, beta, smp)}, 1e20)
        assert row["parametric"]["status"] == "skipped" and "degenerate" in row["parametric"]["reason"]
    # a usable law with degenerate bootstrap samples: finite answer, interval from the usable samples only
    row = allocation.compute_optimal({"parametric": _par(0.35, 0.4, smp)}, 1e20)
    n, (lo, hi) = row["parametric"]["n"], row["parametric"]["n_ci95"]
    assert np.isfinite(n) and 0 < lo <= hi and isinstance(n, float)
    # without a frontier the table is still computed over float budgets (10**19 overflowed int64 before)
    table = allocation.single_objective_table({"parametric": _par(0.35, 0.4)})
    assert [r["budget_flops"] for r in table] == [1e18, 1e19, 1e20, 1e21, 1e22]
    assert all(np.isfinite(r["parametric"]["n"]) and r["parametric"]["n"] > 0 for r in table)
    # the transfer split refuses a degenerate law with a reason instead of computing with it
    res = {"objectives": {"mlm": {"parametric": _par(-0.1, 0.4),
                                  "transfer": {"k": 10.0, "a": 0.2, "b": 0.1, "efficiency": 0.5,
                                               "source_objectives": ["clm"]}}}}
    with pytest.raises(KeyError, match="degenerate"):
        allocation.transfer_split(res, 1e20)
    tables = allocation.transfer_tables(res)
    assert tables[0]["status"] == "skipped" and tables[0]["table"] == []
