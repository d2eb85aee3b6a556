"""Warnings a user can trust (analysis/trust.py): identifiability, extrapolation, the unigram baseline, and
`protscale plan`'s exit status when the law it answers from is unusable."""

from __future__ import annotations

import json

import pytest

from protscale.analysis import synthetic, trust
from protscale.analysis.pipeline import Config, analyze
from protscale.analysis.results import clean_json
from protscale.cli import main


def test_default_baseline_is_the_amino_acid_entropy():
    assert trust.UNIGRAM_BASELINE_NATS == pytest.approx(2.888, abs=0.002)


def test_near_equal_basins_that_disagree_make_the_law_unidentifiable():
    basins = [{"E": 0.34, "alpha": 0.0005, "beta": 0.30, "allocation_exponent": 0.998},
              {"E": 2.88, "alpha": 0.20, "beta": 0.25, "allocation_exponent": 0.556}]
    msgs, unusable = trust.parametric_identifiability({"basins": basins, "alpha_ci95": [0.0001, 0.3],
                                                        "beta_ci95": [0.2, 0.4]})
    assert unusable
    assert any("E from 0.34 to 2.88" in m and "α from 0.0005 to 0.2" in m for m in msgs)
    assert any("β/(α+β) 0.556 to 0.998" in m for m in msgs)
    # one basin, but α's interval reaches below 0
    msgs, unusable = trust.parametric_identifiability({"basins": basins[1:], "alpha_ci95": [-0.02, 0.3]})
    assert unusable and "interval of α, [-0.02, 0.3], reaches 0" in msgs[0]
    # a well-determined law: nothing to say
    assert trust.parametric_identifiability({"basins": basins[1:], "alpha_ci95": [0.15, 0.25],
                                             "beta_ci95": [0.2, 0.3]}) == ([], False)


def test_extrapolation_says_by_how_far():
    assert "4.0× above the largest budget sampled (2.5e+11)" in trust.extrapolation_warning(1e12, [1e10, 2.5e11])
    assert "10.0× below the smallest" in trust.extrapolation_warning(1e9, [1e10, 2.5e11])
    assert trust.extrapolation_warning(1e11, [1e10, 2.5e11]) is None


def test_answer_with_an_absurd_interval_is_unusable():
    w, bad = trust.answer_warnings({}, {"n": 1.06e5, "n_ci95": [1.16e-63, 6.25e5]}, 1e11)
    assert bad and "spans" in w[0]


@pytest.fixture(scope="module")
def near_baseline(tmp_path_factory):
    """A real fit of synthetic CLM runs (final losses 2.3-2.8 nats) against a baseline of 2.25 nats: no loss
    is more than 3% below it, so no model learnt more than residue frequencies."""
    runs, curves = synthetic.parametric_runs(budgets=(1e18, 1e19, 1e20), sizes_per_budget=5, points=8, seed=41)
    cfg = Config(n_boot=100, n_boot_parametric=20, parametric_grid="coarse", unigram_baseline=2.25, progress=False)
    analysis = analyze(runs, curves, cfg)
    res = analysis.results
    path = tmp_path_factory.mktemp("trust") / "results.json"
    path.write_text(json.dumps(clean_json(res)))
    return res, path, analysis


def test_fitted_laws_carry_baseline_warnings(near_baseline):
    res, _, _ = near_baseline
    assert res["unigram_baseline"]["nats"] == 2.25
    clm = res["objectives"]["clm"]
    for law in ("isoflop", "parametric", "envelope"):
        assert any("unigram baseline 2.250 nats" in w for w in clm[law]["warnings"]), (law, clm[law]["warnings"])
        assert clm[law]["unusable"] is True
    assert clm["isoflop"]["budget_range"] == [1e18, 1e20]


def test_plan_prints_warnings_and_exits_3_on_an_unusable_law(near_baseline, capsys):
    _, path, _ = near_baseline
    rc = main(["plan", "--budget-flops", "1e21", "--objective", "clm", "--results", str(path)])
    out = capsys.readouterr().out
    assert rc == trust.EXIT_UNUSABLE == 3
    assert "UNUSABLE" in out and "unigram baseline 2.250" in out
    assert "10.0× above the largest budget sampled (1e+20)" in out
    rc = main(["plan", "--budget-flops", "1e19", "--objective", "clm", "--results", str(path), "--json"])
    p = json.loads(capsys.readouterr().out)
    assert rc == 3 and p["usable"] is False and p["warnings"]
    assert p["isoflop"]["usable"] is False and any("baseline" in w for w in p["isoflop"]["warnings"])
    assert not any("extrapolation" in w for w in p["warnings"])        # 1e19 is inside the budgets fitted


def test_plots_explain_their_marks_and_no_tick_labels_overlap(near_baseline, tmp_path, monkeypatch):
    from protscale.analysis import plots

    _, _, analysis = near_baseline
    figs = {}
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path, plt: figs.setdefault(path.name, fig) and save(fig, path, plt))
    paths = plots.make_plots(analysis.results, analysis.plot_data, tmp_path)
    assert {p.name for p in paths} == {"isoflop_clm.png", "frontier_clm.png", "loss_vs_compute_clm.png"}
    for name, fig in figs.items():
        assert plots.overlapping_tick_labels(fig) == [], name
    legend = [t.get_text() for ax in figs["isoflop_clm.png"].axes for lg in ax.findobj(lambda o: hasattr(o, "get_texts"))
              for t in lg.get_texts()]
    assert "fitted minimum N_opt(C)" in legend and "final loss of one run" in legend and "1e+18" in legend
    labels = [t.get_label() for ax in figs["loss_vs_compute_clm.png"].axes for t in ax.get_children()]
    assert "95% band of the parametric law" in labels and "95% band of the power law" in labels
    frontier = [t.get_label() for ax in figs["frontier_clm.png"].axes for t in ax.get_children()]
    assert frontier.count("95% band (bootstrap hull)") == 2          # N_opt(C) and D_opt(C) both have bands


def test_crowded_log_axis_labels_are_thinned():
    from protscale.analysis import plots

    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(2.5, 2))
    ax.plot([1.1e7, 9.5e7], [1, 2])
    ax.set_xscale("log")
    plots._tidy_log_axis(ax, "x")
    fig.tight_layout()
    crowded = plots.overlapping_tick_labels(fig)
    plots._thin_tick_labels(fig)
    assert plots.overlapping_tick_labels(fig) == []
    assert crowded, "the test figure should start with overlapping labels"
    plt.close(fig)
