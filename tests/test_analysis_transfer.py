"""The transfer law and the CLM→MLM split it implies, on synthetic curves with a planted law."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar

from protscale.analysis import allocation, plan, synthetic, transfer

MLM_LAW = dict(synthetic.LAW, E=1.9)
K, A, B = 2e4, 0.2, 0.4


def _fitted(rule: dict, n_boot: int = 100):
    runs, curves = synthetic.transfer_runs(law=MLM_LAW, k=K, a=A, b=B, sizes=(3e7, 1e8, 3e8, 1e9), source_rule=rule)
    td = transfer.transfer_points(curves, runs.assign(budget=runs["budget_flops"]), "mlm")
    fit = transfer.fit_transfer(td.points, n_boot=n_boot, pairs=td.pairs)
    return fit


def _results(fit: dict) -> dict:
    tr = {k: fit[k] for k in ("k", "a", "b", "efficiency", "source_rule")}
    return {"objectives": {"mlm": {"parametric": {"best": MLM_LAW}, "transfer": {**tr, "source_objectives": ["clm"]}}}}


def _true_split(rule: dict, C: float):
    """The planted optimum by a dense 1-D search, independent of ``allocation``'s grid."""
    def loss(logn):
        n = np.exp(logn)
        d_f = C / (6 * n) - rule["coefficient"] * n ** rule["exponent"]
        return synthetic.law_loss(MLM_LAW, n, d_f + K * d_f ** A * n ** B) if d_f > 0 else 1e9

    r = minimize_scalar(loss, bounds=(np.log(1e6), np.log(1e12)), method="bounded", options={"xatol": 1e-9})
    n = float(np.exp(r.x))
    return n, 6 * n * rule["coefficient"] * n ** rule["exponent"] / C, float(r.fun)


def test_planted_transfer_law_and_source_rule_are_recovered():
    rule = {"coefficient": 5.0, "exponent": 1.0}
    fit = _fitted(rule)
    assert fit["a"] == pytest.approx(A, abs=0.01) and fit["b"] == pytest.approx(B, abs=0.01)
    assert fit["k"] == pytest.approx(K, rel=0.1)
    sr = fit["source_rule"]
    assert sr["coefficient"] == pytest.approx(5.0, rel=1e-6) and sr["exponent"] == pytest.approx(1.0, abs=1e-9)
    assert sr["n_runs"] == 4


def test_transfer_pairs_and_fit_do_not_depend_on_the_order_of_the_runs():
    """A store lists runs in start order: with a second scratch run of the same size and budget (another seed),
    the same scratch run is paired in any order, and the law and its intervals come out the same."""
    runs, curves = synthetic.transfer_runs(law=MLM_LAW, k=K, a=A, b=B, noise=0.01, seed=3)
    more, more_c = synthetic.transfer_runs(law=MLM_LAW, k=K, a=A, b=B, noise=0.01, seed=4)
    seed1 = more[more["run_id"].str.contains("scratch")]
    runs = pd.concat([runs, seed1.assign(run_id=seed1["run_id"] + "-seed1")], ignore_index=True)
    curves = pd.concat([curves, more_c[more_c["run_id"].isin(seed1["run_id"])].assign(
        run_id=lambda f: f["run_id"] + "-seed1")], ignore_index=True)
    runs = runs.assign(budget=runs["budget_flops"])
    td = transfer.transfer_points(curves, runs, "mlm")
    fit = transfer.fit_transfer(td.points, n_boot=100, pairs=td.pairs)
    for order in (2, 3):                               # orders that listed another scratch run first
        td2 = transfer.transfer_points(curves, runs.sample(frac=1, random_state=order), "mlm")
        assert {p["run_id"]: p["scratch_run_id"] for p in td2.pairs} == {p["run_id"]: p["scratch_run_id"]
                                                                          for p in td.pairs}
        fit2 = transfer.fit_transfer(td2.points, n_boot=100, pairs=td2.pairs)
        assert [fit2[k] for k in ("k", "a", "b")] == pytest.approx([fit[k] for k in ("k", "a", "b")], rel=1e-12)
        assert all(fit2[k] == fit[k] for k in ("a_ci95", "b_ci95", "efficiency_ci95"))
        assert td2.pairs == td.pairs                   # listed in one order too


@pytest.mark.parametrize("coef,C", [(5.0, 1e21), (20.0, 1e20)])
def test_split_matches_the_planted_optimum(coef, C):
    rule = {"coefficient": coef, "exponent": 1.0}
    fit = _fitted(rule)
    got = allocation.transfer_split(_results(fit), C)
    n, f, loss = _true_split(rule, C)
    assert got["n"] == pytest.approx(n, rel=0.06)
    assert got["source_fraction"] == pytest.approx(f, rel=0.12)
    assert got["loss"] == pytest.approx(loss, abs=2e-4)
    # the pre-training is priced by the source rule, and the rest of C trains the target
    assert got["source_tokens"] == pytest.approx(coef * got["n"], rel=1e-9)
    assert got["source_flops"] + got["target_flops"] == pytest.approx(C)
    assert got["transfer_pays"] and got["loss"] < got["scratch_loss"]


def test_split_is_not_zeroed_by_an_efficiency_below_one():
    # The old model capped D_t at η·D_source and so answered f = 0 whenever η <= 1. With sources of
    # 20 tokens per parameter, η (D_t / D_source at the runs' ends) is about 0.6, yet at 1e20 FLOPs the
    # planted law makes pre-training pay: the split must say so.
    fit = _fitted({"coefficient": 20.0, "exponent": 1.0})
    assert fit["efficiency"] < 1
    got = plan.plan(_results(fit), 1e20, "both")["split"]
    assert got["source_fraction"] > 0.03 and got["transfer_pays"]
    # ... and at a larger budget the same law says scratch wins, and the plan says that too
    big = allocation.transfer_split(_results(fit), 1e24)
    assert not big["transfer_pays"] and big["scratch_loss"] < big["loss"]
    assert "training from scratch is better" in plan.format_plan(plan.plan(_results(fit), 1e24, "both"))


def test_split_intervals_come_from_paired_bootstrap_samples():
    rule = {"coefficient": 5.0, "exponent": 1.0}
    runs, curves = synthetic.transfer_runs(law=MLM_LAW, k=K, a=A, b=B, sizes=(3e7, 1e8, 3e8, 1e9), source_rule=rule,
                                           noise=0.002, seed=4)
    td = transfer.transfer_points(curves, runs.assign(budget=runs["budget_flops"]), "mlm")
    fit = transfer.fit_transfer(td.points, n_boot=100, pairs=td.pairs)
    res = _results(fit)
    boot = fit["_boot"]
    res["objectives"]["mlm"]["transfer"]["bootstrap_samples"] = {
        s: np.column_stack([boot[s]["log_k"], boot[s]["a"], boot[s]["b"]]).tolist() for s in boot}
    law = [MLM_LAW[k] for k in ("E", "A", "B", "alpha", "beta")]
    res["objectives"]["mlm"]["parametric"]["bootstrap_samples"] = {s: [law] * 100 for s in boot}
    got = allocation.transfer_split(res, 1e21)
    lo, hi = got["n_ci95"]
    assert lo <= got["n"] <= hi
    flo, fhi = got["source_fraction_ci95"]
    assert flo <= got["source_fraction"] <= fhi


def test_split_without_a_source_budget_is_a_clear_error():
    fit = _fitted({"coefficient": 5.0, "exponent": 1.0})
    res = _results(fit)
    res["objectives"]["mlm"]["transfer"]["source_rule"] = None
    with pytest.raises(KeyError, match="no source rule"):
        allocation.transfer_split(res, 1e21)
