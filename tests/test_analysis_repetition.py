"""The data-constrained law (Muennighoff et al. 2023) recovers a planted R* from a repeated/fresh pair."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from protscale.analysis import repetition


def _pair(unique: float, r_star: float, noise: float = 0.0, seed: int = 0) -> dict:
    # the fresh run follows L(D) = 1.9 + 40/D^0.28; the repeated run reaches L(D′(D)) at D tokens
    rng = np.random.default_rng(seed)
    t = np.geomspace(unique / 20, unique * 12, 120)
    dp = repetition.effective_tokens(t, unique, r_star)
    rep = (1.9 + 40 / dp ** 0.28) * np.exp(noise * rng.standard_normal(t.size))
    return {"rep_tokens": t, "rep_loss": rep, "fresh_tokens": t * 1.5, "fresh_loss": 1.9 + 40 / (t * 1.5) ** 0.28}


def test_effective_tokens_follow_the_law():
    u = 1e9
    d = np.array([5e8, 1e9, 2e9, 1e11])
    dp = repetition.effective_tokens(d, u, 5.0)
    assert dp[:2] == pytest.approx(d[:2])                          # first epoch: every token counts
    assert dp[2] == pytest.approx(u + u * 5.0 * (1 - np.exp(-1 / 5.0)))
    assert dp[3] < u * 6.0 and dp[3] == pytest.approx(u * 6.0, rel=1e-3)   # saturates at U·(1 + R*)


def test_planted_r_star_and_unique_tokens_are_recovered():
    res = repetition.fit_repetition([_pair(2e9, 4.0, noise=0.001, seed=1), _pair(2e9, 4.0, noise=0.001, seed=2)],
                                    n_boot=20)
    assert res["r_star"] == pytest.approx(4.0, rel=0.15)
    assert res["unique_tokens"] == pytest.approx(2e9, rel=0.1)
    lo, hi = res["r_star_ci95"]
    assert lo <= res["r_star"] <= hi
    # with U known from a manifest, only R* is fitted
    fixed = repetition.fit_repetition([_pair(2e9, 4.0)], n_boot=10, unique=2e9)
    assert fixed["r_star"] == pytest.approx(4.0, rel=0.02) and fixed["unique_tokens_fixed"]


def test_repetition_warning_only_beyond_what_the_law_supports():
    assert repetition.repetition_warning(5e8, 1e9, 5.0) is None          # less than one epoch
    assert repetition.repetition_warning(1.5e9, 1e9, 5.0) is None        # a few repeats still pay
    msg = repetition.repetition_warning(2e10, 1e9, 2.0)
    assert msg and "repeat the data 20.0 times" in msg and "more unique data" in msg


def test_plan_warns_when_the_answer_repeats_the_dataset(tmp_path):
    import json

    from protscale.analysis import plan

    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": {"tokens": 1e9}}}))
    law = {"E": 2.0, "A": 100.0, "B": 1e4, "alpha": 0.35, "beta": 0.4}
    res = {"objectives": {"clm": {"parametric": {"best": law}, "repetition": {"r_star": 2.0}}}}
    def repeats(p):   # the repetition warnings ("clm: ..."), not the law's own ("clm parametric: ...")
        return [w for w in p["warnings"] if w.startswith("clm: ")]

    small = plan.plan(res, 1e14, "clm", data=tmp_path)
    assert small["unique_tokens"] == 1e9 and repeats(small) == []          # D < U: nothing to say
    big = plan.plan(res, 1e22, "clm", data=tmp_path)
    assert big["parametric"]["d"] > 1e10
    assert repeats(big) and "R* = 2" in repeats(big)[0]
    assert "warning: clm:" in plan.format_plan(big)
    with pytest.raises(Exception, match="not a prepared dataset"):
        plan.plan(res, 1e22, "clm", data=tmp_path / "nope")


def _tagged_runs(unique: float, r_star: float, sizes=(1e8, 1e9), seed: int = 0):
    """Per size, a run on a repeated dataset (tag data=rep) and one on data seen once (data=all, epochs=1),
    as `protscale import tb-csv` tags the paper's ur50_* / all1ep_* curves."""
    from protscale.analysis.data import make_runs

    rng = np.random.default_rng(seed)
    runs, curves = [], []
    for n in sizes:
        t = np.geomspace(unique / 20, unique * 12, 120)
        for kind, d_eff, tags in (("fresh", t, {"data": "all", "epochs": 1.0}),
                                  ("rep", repetition.effective_tokens(t, unique, r_star), {"data": "rep"})):
            rid = f"{kind}-{n:.0e}"
            loss = (1.9 + 100 / n ** 0.35 + 40 / d_eff ** 0.28) * np.exp(0.001 * rng.standard_normal(t.size))
            runs.append({"run_id": rid, "run_name": rid, "objective": "clm", "n_params": n, "status": "completed",
                         "kind": "trial", **tags})
            curves.append(pd.DataFrame({"run_id": rid, "step": np.arange(t.size), "tokens": t, "flops": 6 * n * t,
                                        "loss": loss}))
    return make_runs(pd.DataFrame(runs)), pd.concat(curves, ignore_index=True)


def test_fit_reads_r_star_from_tagged_runs_and_plan_uses_it(tmp_path):
    import json

    from protscale.analysis import plan
    from protscale.analysis.pipeline import Config, analyze

    runs, curves = _tagged_runs(2e9, 4.0)
    cfg = Config(n_boot=50, n_boot_parametric=20, n_boot_repetition=20, unique_tokens={"rep": 2e9},
                 parametric_grid="coarse", progress=False)
    rep = analyze(runs, curves, cfg).results["objectives"]["clm"]["repetition"]
    assert rep["dataset"] == "rep" and rep["r_star_identified"] and rep["unique_tokens_fixed"]
    assert rep["r_star"] == pytest.approx(4.0, rel=0.1)
    lo, hi = rep["r_star_ci95"]
    assert lo <= rep["r_star"] <= hi
    assert sorted(rep["pairs"]) == ["rep-1e+08", "rep-1e+09"] and sorted(rep["fresh_pairs"]) == ["fresh-1e+08",
                                                                                                  "fresh-1e+09"]
    # plan --data warns with the fitted R* once an answer repeats the dataset's unique tokens
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": {"tokens": 2e9}}}))
    law = {"E": 2.0, "A": 100.0, "B": 1e4, "alpha": 0.35, "beta": 0.4}
    res = {"objectives": {"clm": {"parametric": {"best": law}, "repetition": rep}}}
    warned = [w for w in plan.plan(res, 1e23, "clm", data=tmp_path)["warnings"] if w.startswith("clm: ")]
    assert warned and f"R* = {rep['r_star']:.3g}" in warned[0]


def test_r_star_without_unique_tokens_is_not_made_up():
    # The paper's ur50 runs sit above the mixed-data runs from their first epoch (another distribution), so
    # without U the fit runs U to ~0 and R* to infinity: R* must be reported as not identified.
    t = np.geomspace(1e9, 2e11, 40)
    fresh = 1.9 + 40 / t ** 0.28
    pair = {"rep_tokens": t, "rep_loss": 1.9 + 40 / (0.5 * t) ** 0.28, "fresh_tokens": t, "fresh_loss": fresh}
    res = repetition.fit_dataset("ur50", [pair], unique=None, n_boot=10, seed=0)
    assert res["r_star"] is None and not res["r_star_identified"]
    assert "--unique-tokens ur50=N" in res["reason"] and res["saturation_tokens"] > 0


def test_repetition_does_not_depend_on_the_order_of_the_runs():
    """A store lists runs in start order: the same curves in another order give the same R*, U and intervals
    (the block bootstrap draws curve by curve), the same fresh partner among equally long fresh runs, and
    the same dataset first among datasets with as many pairs."""
    pairs = [dict(_pair(2e9, 4.0, noise=0.003, seed=s), label=f"rep-{s}") for s in (1, 2, 3)]
    a = repetition.fit_repetition(pairs, n_boot=10)
    b = repetition.fit_repetition(pairs[::-1], n_boot=10)
    assert [b[k] for k in ("r_star", "unique_tokens")] == pytest.approx([a[k] for k in ("r_star", "unique_tokens")],
                                                                         rel=1e-12)
    assert b["r_star_ci95"] == a["r_star_ci95"] and b["unique_tokens_ci95"] == a["unique_tokens_ci95"]
    # through the pipeline: a second fresh run per size (another seed, as long as the first) and a second
    # repeated dataset with as many pairs as the first
    from protscale.analysis.pipeline import Config, analyze

    runs, curves = _tagged_runs(2e9, 4.0)
    more, more_c = _tagged_runs(2e9, 4.0, seed=1)
    fresh = more[more["run_id"].str.startswith("fresh")]
    runs = pd.concat([runs, fresh.assign(run_id=fresh["run_id"] + "-s1", run_name=fresh["run_name"] + "-s1")],
                     ignore_index=True)
    curves = pd.concat([curves, more_c[more_c["run_id"].isin(fresh["run_id"])].assign(
        run_id=lambda f: f["run_id"] + "-s1")], ignore_index=True)
    runs.loc[runs["run_id"] == "rep-1e+08", "data"] = "rep2"
    cfg = Config(n_boot=20, n_boot_parametric=10, n_boot_repetition=10, unique_tokens={"rep": 2e9, "rep2": 2e9},
                 parametric_grid="coarse", progress=False)
    first = analyze(runs, curves, cfg).results["objectives"]["clm"]["repetition"]
    for order in (1, 2, 3):
        again = analyze(runs.sample(frac=1, random_state=order), curves, cfg).results["objectives"]["clm"]["repetition"]
        assert again == first
