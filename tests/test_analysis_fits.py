"""Fits recover known laws from synthetic data; data checks report problems; degenerate inputs fail clearly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from protscale.analysis import envelope, isoflop, parametric, synthetic, transfer
from protscale.analysis.checks import final_points, run_checks
from protscale.analysis.pipeline import Config, analyze
from protscale.analysis.stats import weighted_line
from protscale.errors import UserError

FAST = dict(n_boot=200, n_boot_parametric=30, parametric_grid="coarse", progress=False)


def test_parametric_recovers_law_and_allocation_exponent():
    runs, curves = synthetic.parametric_runs(noise=0.003, seed=1)
    clean, cc, rep = run_checks(runs, curves)
    fp = final_points(clean, cc)
    fit = parametric.fit_parametric(fp["n_params"], fp["final_tokens"], fp["final_loss"], grid="coarse")
    law = synthetic.LAW
    b = fit.best
    assert b["E"] == pytest.approx(law["E"], rel=0.02)
    assert b["alpha"] == pytest.approx(law["alpha"], abs=0.03)
    assert b["beta"] == pytest.approx(law["beta"], abs=0.03)
    truth = law["beta"] / (law["alpha"] + law["beta"])
    assert parametric.allocation_exponent(b["alpha"], b["beta"]) == pytest.approx(truth, abs=0.02)
    assert fit.basins and fit.basins[0]["objective"] == pytest.approx(fit.objective)
    assert all(x["objective"] <= fit.objective * 1.02 + 1e-15 for x in fit.basins)


def test_huber_objective_is_summed_and_gradient_is_exact():
    rng = np.random.default_rng(0)
    logN, logD = rng.uniform(16, 22, 30), rng.uniform(19, 25, 30)
    logL = rng.uniform(0.7, 1.0, 30)
    th = np.array([[0.5, 5.0, 9.0, 0.4, 0.45]])
    f1, g = parametric.objective_and_grad(th, logN, logD, logL, np.ones((1, 30)))
    f2, _ = parametric.objective_and_grad(th, np.tile(logN, 2), np.tile(logD, 2), np.tile(logL, 2), np.ones((1, 60)))
    assert f2[0] == pytest.approx(2 * f1[0])          # summed, not averaged
    eps = 1e-6
    for i in range(5):
        d = np.zeros((1, 5))
        d[0, i] = eps
        fp_, _ = parametric.objective_and_grad(th + d, logN, logD, logL, np.ones((1, 30)))
        fm_, _ = parametric.objective_and_grad(th - d, logN, logD, logL, np.ones((1, 30)))
        assert g[0, i] == pytest.approx((fp_[0] - fm_[0]) / (2 * eps), rel=1e-4, abs=1e-9)


def test_parametric_reports_several_basins_when_they_exist():
    # A law whose D term is invisible (tokens proportional to N): A/N^α and B/D^β cannot be told apart,
    # so several end points fit equally well; each is reported with its own allocation exponent.
    n = np.logspace(7, 9, 12)
    d = 20 * n
    loss = 2.0 + 50 / n ** 0.3 + 50 / d ** 0.3
    fit = parametric.fit_parametric(n, d, loss, grid="coarse", basin_rel_tol=0.5)
    assert len(fit.basins) >= 2
    assert all("allocation_exponent" in b and "n_starts" in b for b in fit.basins)


def test_parametric_from_init_reports_default_and_converged_runs():
    runs, curves = synthetic.parametric_runs(noise=0.003, seed=2)
    clean, cc, _ = run_checks(runs, curves)
    fp = final_points(clean, cc)
    fit = parametric.fit_parametric(fp["n_params"], fp["final_tokens"], fp["final_loss"], grid="coarse",
                                    init=[np.e, np.e ** 5, np.e ** 10, 0.5, 0.5])
    fi = fit.from_init
    assert set(fi) == {"init", "scipy_default", "converged"}
    assert fi["converged"]["objective"] <= fi["scipy_default"]["objective"] + 1e-15
    assert fit.objective <= fi["converged"]["objective"] + 1e-15


def test_isoflop_recovers_exponents():
    pts = synthetic.isoflop_points(n_exponent=0.6, seed=3)
    fit = isoflop.fit_isoflop(pts, n_boot=300, seed=0)
    r = fit.result
    assert r["n_exponent"] == pytest.approx(0.6, abs=0.04)
    assert r["d_exponent"] == pytest.approx(1 - r["n_exponent"])
    lo, hi = r["n_exponent_ci95"]
    assert lo < r["n_exponent"] < hi and hi - lo < 0.3
    assert r["d_exponent_ci95"] == pytest.approx([1 - hi, 1 - lo])
    assert r["n_exponent_ci95"] == [min(r["n_exponent_ci95_run"][0], r["n_exponent_ci95_budget"][0]),
                                    max(r["n_exponent_ci95_run"][1], r["n_exponent_ci95_budget"][1])]


def test_isoflop_intervals_do_not_depend_on_the_order_of_the_runs():
    """A store lists runs in start order, which varies with how concurrent trials interleave: the same
    runs must give the same frontier and the same bootstrap intervals in any order."""
    pts = synthetic.isoflop_points(n_exponent=0.6, seed=3)
    a = isoflop.fit_isoflop(pts, n_boot=200, seed=0).result
    for order in (1, 2):
        b = isoflop.fit_isoflop(pts.sample(frac=1, random_state=order).reset_index(drop=True), n_boot=200,
                                seed=0).result
        assert b["n_exponent"] == pytest.approx(a["n_exponent"], abs=1e-12)
        assert b["n_exponent_ci95"] == a["n_exponent_ci95"] and b["n_exponent_ci95_run"] == a["n_exponent_ci95_run"]


def test_parametric_fit_and_intervals_do_not_depend_on_the_order_of_the_runs():
    """As for IsoFLOP: the same runs in another order give the same law, basins and bootstrap replicates."""
    runs, curves = synthetic.parametric_runs(budgets=(1e18, 1e19, 1e20), sizes_per_budget=5, noise=0.006, seed=12,
                                             points=6)
    clean, cc, _ = run_checks(runs, curves)
    fp = final_points(clean, cc)

    def fit(f):
        n, d, L = (f[k].to_numpy(float) for k in ("n_params", "final_tokens", "final_loss"))
        fit = parametric.fit_parametric(n, d, L, grid="coarse")
        return fit, parametric.bootstrap_parametric(n, d, L, f["budget"].to_numpy(), fit, n_boot=6, grid="coarse")

    a, a_boot = fit(fp)
    b, b_boot = fit(fp.sample(frac=1, random_state=1).reset_index(drop=True))
    assert b.best == pytest.approx(a.best, rel=1e-12)
    assert [x["n_starts"] for x in b.basins] == [x["n_starts"] for x in a.basins]
    for scheme in ("run", "budget"):
        for k in ("alpha", "beta", "allocation_exponent"):
            np.testing.assert_allclose(b_boot[scheme][k], a_boot[scheme][k], rtol=1e-12)


def test_isoflop_on_parametric_law_matches_its_allocation_exponent():
    law = dict(synthetic.LAW, alpha=0.4, beta=0.4)   # symmetric profiles: the parabola vertex is unbiased
    runs, curves = synthetic.parametric_runs(law=law, noise=0.001, seed=4)
    clean, cc, _ = run_checks(runs, curves)
    fp = final_points(clean, cc).rename(columns={"final_loss": "loss"})
    r = isoflop.fit_isoflop(fp[["run_id", "n_params", "loss", "budget"]], n_boot=200).result
    assert r["n_exponent"] == pytest.approx(0.5, abs=0.04)


def test_isoflop_drops_budgets_with_too_few_sizes_or_unbracketed_minimum():
    pts = synthetic.isoflop_points(seed=5)
    small = pts[pts["budget"] == pts["budget"].max()].head(2)            # 2 sizes only
    pts = pd.concat([pts[pts["budget"] != pts["budget"].max()], small])
    # a budget whose sizes all lie on one side of the optimum
    one_side = synthetic.isoflop_points(budgets=(1e21,), noise=0.0, seed=6).sort_values("n_params").head(3)
    pts = pd.concat([pts, one_side])
    r = isoflop.fit_isoflop(pts, n_boot=50).result
    reasons = {d["budget"]: d["reason"] for d in r["dropped_budgets"]}
    assert "only 2 model size" in reasons[3e20]
    assert "not bracketed" in reasons[1e21]
    assert not any(b["used"] for b in r["budgets"] if b["budget"] == 1e21)


def test_transfer_law_recovered():
    runs, curves = synthetic.transfer_runs(k=2e3, a=0.2, b=0.4, noise=0.0)
    td = transfer.transfer_points(curves, runs.assign(budget=runs["budget_flops"]), "mlm")
    fit = transfer.fit_transfer(td.points, n_boot=200, pairs=td.pairs)
    assert fit["a"] == pytest.approx(0.2, abs=0.02)
    assert fit["b"] == pytest.approx(0.4, abs=0.02)
    assert fit["k"] == pytest.approx(2e3, rel=0.3)
    assert len(td.pairs) == 4 and all(p["scratch_run_id"].startswith("mlm-scratch") for p in td.pairs)
    assert fit["efficiency"] is not None and fit["efficiency"] > 0


def test_tokens_to_reach_inverts_a_monotone_curve():
    t = np.geomspace(1e6, 1e9, 50)
    L = 2 + 100 / t ** 0.3
    targets = 2 + 100 / np.array([3e6, 1e8, 5e8]) ** 0.3
    got = transfer.tokens_to_reach(t, L, np.append(targets, 1.0))
    assert got[:3] == pytest.approx([3e6, 1e8, 5e8], rel=0.02)
    assert np.isnan(got[3])                      # never reached


def test_envelope_recovers_power_law():
    rng = np.random.default_rng(0)
    rows = []
    for k, n in enumerate(np.logspace(7, 9, 9)):
        f = np.geomspace(1e17, 1e17 * 10 ** (0.5 + 0.35 * k), 40)
        # each run is on the frontier L = 5·C^-0.03 at its end and above it before
        loss = 5 * f ** -0.03 * (1 + 0.02 * (np.log(f[-1] / f)) ** 2 / 10)
        rows.append(pd.DataFrame({"run_id": f"r{k}", "step": np.arange(40), "flops": f, "tokens": f / (6 * n),
                                  "loss": loss * np.exp(0.0005 * rng.standard_normal(40))}))
    env = envelope.fit_envelope(pd.concat(rows), {}, n_boot=200)
    assert env["b"] == pytest.approx(-0.03, abs=0.004)
    assert env["b_ci95"][0] <= env["b"] <= env["b_ci95"][1]


def test_weighted_line_batched_matches_polyfit():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=12), rng.normal(size=12)
    w = rng.integers(0, 3, size=(5, 12)).astype(float)
    s, i = weighted_line(x, y, w)
    for r in range(5):
        keep = np.repeat(np.arange(12), w[r].astype(int))
        ps, pi = np.polyfit(x[keep], y[keep], 1)
        assert s[r] == pytest.approx(ps) and i[r] == pytest.approx(pi)


# -------------------------------------------------------------------------------------------- checks


def _store_like():
    runs, curves = synthetic.parametric_runs(budgets=(1e18, 1e19, 1e20), sizes_per_budget=5, seed=7, points=10)
    return runs, curves


def test_checks_report_duplicates_flops_axis_nan_and_divergence():
    runs, curves = _store_like()
    ids = list(runs["run_id"])
    # duplicate curve of ids[0] under a new run with the same N
    dup = curves[curves["run_id"] == ids[0]].assign(run_id="dup")
    runs = pd.concat([runs, runs[runs["run_id"] == ids[0]].assign(run_id="dup", run_name="zz-dup")])
    # identical curves under different N: both copies ambiguous
    amb = curves[curves["run_id"] == ids[1]].assign(run_id="amb")
    amb["tokens"] = amb["tokens"] / 2            # consistent with its (doubled) N: only the size is in doubt
    runs = pd.concat([runs, runs[runs["run_id"] == ids[1]].assign(run_id="amb", run_name="amb",
                                                                   n_params=runs["n_params"].iloc[1] * 2)])
    curves = pd.concat([curves, dup, amb])
    curves.loc[curves["run_id"] == ids[2], "flops"] *= 1.5                       # inconsistent axis
    curves.loc[(curves["run_id"] == ids[3]) & (curves["step"] == 5), "loss"] = np.nan   # NaN
    last = curves["run_id"] == ids[4]
    curves.loc[last & (curves["step"] == 10), "loss"] = 9.0                       # blow-up at the end
    runs.loc[runs["run_id"] == ids[5], "status"] = "diverged"                     # status tag
    clean, cc, rep = run_checks(runs, curves)
    ex = rep.excluded
    assert ex["dup"] == "duplicate_curve" and ids[0] not in ex
    assert ex["amb"] == "duplicate_curve" and ex[ids[1]] == "duplicate_curve"
    assert ex[ids[2]] == "flops_axis"
    assert ex[ids[3]] == "non_finite"
    assert ex[ids[4]] == "loss_blow_up"
    assert ex[ids[5]] == "status"
    assert set(clean["run_id"]).isdisjoint(ex)
    msg = " ".join(i["message"] for i in rep.issues)
    assert "implies N=" in msg and "diverged" in msg


def test_final_points_merge_close_budgets_but_not_unplanned_runs():
    runs, curves = _store_like()
    runs.loc[runs.index[0], "budget_flops"] = 1.03e18               # planned, 3% off: merged into 1e18
    runs.loc[runs.index[1], "budget_source"] = "curve_end"         # not planned: kept apart
    fp = final_points(runs, curves)
    b = dict(zip(fp["run_id"], fp["budget"]))
    assert b[runs["run_id"].iloc[0]] == 1e18
    assert fp.set_index("run_id").loc[runs["run_id"].iloc[1], "budget_source"] == "curve_end"


# ----------------------------------------------------------------------------------- degenerate inputs


def test_one_budget_is_a_clear_error():
    runs, curves = synthetic.parametric_runs(budgets=(1e19,), seed=8, points=8)
    with pytest.raises(UserError, match="at least 2 budgets"):
        analyze(runs, curves, Config(**FAST))


def test_nothing_fittable_is_a_clear_error_naming_the_budget_problem():
    # one budget with 2 sizes: no frontier, no envelope (all runs end at one compute), < 8 parametric points
    runs, curves = synthetic.parametric_runs(budgets=(1e19,), sizes_per_budget=2, seed=9, points=8)
    with pytest.raises(UserError, match=r"nothing could be fitted.*only 2 model size"):
        analyze(runs, curves, Config(**FAST))


def test_all_nan_or_diverged_is_a_clear_error():
    runs, curves = synthetic.parametric_runs(budgets=(1e18, 1e19), sizes_per_budget=3, seed=10, points=8)
    curves.loc[curves["step"] == 3, "loss"] = np.nan
    with pytest.raises(UserError, match="no run left.*non_finite"):
        analyze(runs, curves, Config(**FAST))
    runs2, curves2 = synthetic.parametric_runs(budgets=(1e18, 1e19), sizes_per_budget=3, seed=10, points=8)
    runs2["status"] = "diverged"
    with pytest.raises(UserError, match="status"):
        analyze(runs2, curves2, Config(**FAST))


def test_partly_diverged_runs_are_dropped_and_listed():
    runs, curves = synthetic.parametric_runs(budgets=(1e18, 1e19, 1e20), sizes_per_budget=5, seed=11, points=8)
    bad = runs["run_id"].iloc[2]
    curves.loc[curves["run_id"] == bad, "loss"] = np.inf
    res = analyze(runs, curves, Config(**FAST)).results
    assert {"run_id": bad, "check": "non_finite"} in res["checks"]["excluded"]
    used = [b["n_runs"] for b in res["objectives"]["clm"]["isoflop"]["budgets"]]
    assert sum(used) == len(runs) - 1


def test_bootstrap_replicates_are_refitted_from_the_full_grid():
    runs, curves = synthetic.parametric_runs(budgets=(1e18, 1e19, 1e20), sizes_per_budget=5, noise=0.006, seed=12,
                                             points=6)
    clean, cc, _ = run_checks(runs, curves)
    fp = final_points(clean, cc)
    n, d, L = (fp[k].to_numpy(float) for k in ("n_params", "final_tokens", "final_loss"))
    fit = parametric.fit_parametric(n, d, L, grid="coarse")
    # a replicate of all ones is the original data: refitted from the grid it finds the point estimate
    best, f, ends, _ = parametric.refit_grid(np.log(n), np.log(d), np.log(L), np.ones((1, n.size)),
                                             parametric.grid_starts("coarse"))
    assert f[0] == pytest.approx(fit.objective, rel=1e-6)
    assert ends.shape == (1, parametric.KEEP, 5)
    boot = parametric.bootstrap_parametric(n, d, L, fp["budget"].to_numpy(), fit, n_boot=8, grid="coarse")
    spread = parametric.basin_spread(boot, len(fit.basins))
    for scheme in ("run", "budget"):
        assert boot[scheme]["alpha"].shape == (8,) and np.isfinite(boot[scheme]["alpha"]).all()
        s = spread[scheme]
        assert sum(s["share_by_basin"]) + s["share_other"] == pytest.approx(1.0)
        assert sum(s["near_optimal_basins"].values()) == pytest.approx(1.0)
