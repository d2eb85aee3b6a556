"""Adaptive IsoFLOP waves (``sweep/adaptive.py``): the scheduler on recorded losses, its limits and names,
the search-space checks, and one small adaptive sweep end to end (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from protscale.model.sizes import get_size
from protscale.sweep.adaptive import Adaptive, next_wave, wave_name
from protscale.sweep.space import SearchSpace, Trial, all_trials, validate

SIZES = ["tiny-1", "tiny-2", "tiny-3", "tiny-4", "tiny-5", "tiny-6"]
BUDGETS = [1e15, 1e16, 1e17]


def law(n, c, exponent=0.5, coef=0.3, noise=0.0, rng=None):
    """A loss with its IsoFLOP minimum at N = coef·C^exponent (parabola in log N, deeper with C)."""
    x = np.log10(n) - np.log10(coef * c ** exponent)
    out = 3.0 - 0.1 * np.log10(c) + 0.2 * x * x
    return out + (rng.normal(0, noise) if rng is not None and noise else 0.0)


def replay(adaptive: Adaptive, loss=law, rng=None):
    """Run the scheduler as ``run_sweep`` does, 'training' a trial by evaluating ``loss``."""
    trained = {t.name: t for t in adaptive.first_pass()}
    waves = []
    while True:
        points = {o: [(t.budget_flops, get_size(t.size).n_params_non_embedding,
                       loss(get_size(t.size).n_params_non_embedding, t.budget_flops, rng=rng))
                      for t in trained.values() if t.objective == o] for o in adaptive.objectives}
        decided = next_wave(adaptive, points, trained)
        new = [t for w in decided for t in w.trials]
        waves.append(decided)
        if not new:
            return trained, waves
        assert not set(t.name for t in new) & set(trained), "a trial was asked for twice"
        trained.update({t.name: t for t in new})


def test_first_pass_defaults_to_the_ends_and_middle_and_the_grid_has_every_candidate():
    a = Adaptive(budgets=BUDGETS, sizes=list(reversed(SIZES)), objectives=["mlm"])
    assert [t.size for t in a.first_pass()[:3]] == ["tiny-1", "tiny-3", "tiny-6"]
    assert len(a.first_pass()) == 9 and len(a.grid()) == 18 and a.limit() == 18
    assert {t.budget_flops for t in a.grid()} == set(BUDGETS)


def test_token_bounds_give_each_budget_its_own_candidates_and_first_pass():
    # D = C/(6N) within [1e5, 3e6]: at 1e11 tiny-1 (24,576: 678k tokens) .. tiny-3 (147k: 113k tokens)
    a = Adaptive(budgets=[1e11, 1e12], sizes=SIZES, objectives=["mlm", "clm"], min_tokens=100_000,
                 max_tokens=3_000_000)
    assert a.candidates(1e11) == ["tiny-1", "tiny-2", "tiny-3"]
    assert a.candidates(1e12) == ["tiny-3", "tiny-4", "tiny-5"]
    for t in a.grid():
        assert 100_000 <= t.budget_flops / (6 * get_size(t.size).n_params_non_embedding) <= 3_000_000
    assert len(a.grid()) == 12 and a.limit() == 6 and len(a.first_pass()) == 12
    narrow = Adaptive(budgets=[1e11, 1e12], sizes=SIZES, min_tokens=1_000_000, max_tokens=3_000_000)
    assert any("fewer than 3 candidate sizes" in e for e in narrow.problems())


def test_sizes_per_budget_give_each_budget_its_own_grid():
    a = Adaptive(budgets=[1e11, 1e12], sizes={1e11: ["tiny-3", "tiny-1", "tiny-2"], 1e12: ["tiny-4", "tiny-5", "tiny-6",
                                                                                           "tiny-3"]})
    assert a.candidates(1e11) == ["tiny-1", "tiny-2", "tiny-3"]          # smallest first, whatever the order
    assert a.candidates(1e12) == ["tiny-3", "tiny-4", "tiny-5", "tiny-6"]
    assert [t.size for t in a.first_pass() if t.budget_flops == 1e12] == ["tiny-3", "tiny-5", "tiny-6"]
    assert len(a.grid()) == 7 and a.problems() == [] and hash(a)
    wrong = Adaptive(budgets=[1e11, 3e11], sizes={1e11: ["tiny-1", "tiny-2", "tiny-3"], 1e12: ["tiny-4"]})
    assert any("are not the budgets" in e for e in wrong.problems())


def test_replayed_waves_find_the_frontier_with_fewer_trials_than_the_grid():
    def inside(n, c, rng=None):
        return law(n, c, exponent=0.4, coef=10 ** (4.9 - 0.4 * 16), rng=rng)  # N_opt(1e16) = 10^4.9

    a = Adaptive(budgets=BUDGETS, sizes=SIZES, objectives=["mlm"], max_trials=15, target_width=0.05,
                 per_budget=2)
    trained, waves = replay(a, inside)
    last = waves[-1][0]
    assert last.done and last.exponent is not None
    assert last.exponent[1] <= 0.4 <= last.exponent[2] or abs(last.exponent[0] - 0.4) < 0.05
    assert len(trained) < len(a.grid())                  # stopped before the full grid
    assert len(trained) <= a.max_trials


def test_unbracketed_budgets_extend_towards_the_minimum():
    # every budget's best is the smallest sampled size: the next sizes are smaller ones
    def smaller_is_better(n, c, rng=None):
        return 3.0 + 0.1 * np.log10(n)

    a = Adaptive(budgets=BUDGETS, sizes=SIZES, objectives=["clm"], coarse=["tiny-4", "tiny-5", "tiny-6"])
    points = {"clm": [(t.budget_flops, get_size(t.size).n_params_non_embedding,
                       smaller_is_better(get_size(t.size).n_params_non_embedding, t.budget_flops))
                      for t in a.first_pass()]}
    (w,) = next_wave(a, points, {t.name for t in a.first_pass()})
    assert w.trials and not w.done and w.exponent is None
    assert {t.size for t in w.trials} <= {"tiny-2", "tiny-3"}
    assert all(t.objective == "clm" and t.budget_flops in BUDGETS for t in w.trials)


def test_max_trials_cuts_the_wave_and_then_stops():
    a = Adaptive(budgets=BUDGETS, sizes=SIZES, objectives=["mlm"], coarse=["tiny-4", "tiny-5", "tiny-6"],
                 max_trials=10)

    def smaller_is_better(n, c, rng=None):
        return 3.0 + 0.1 * np.log10(n)

    trained, waves = replay(a, smaller_is_better)
    assert len(trained) == 10
    assert "max_trials" in waves[-2][0].reason or "max_trials" in waves[-1][0].reason


def test_failed_trials_are_not_asked_for_again():
    a = Adaptive(budgets=BUDGETS, sizes=SIZES, objectives=["mlm"], coarse=["tiny-4", "tiny-5", "tiny-6"])
    points = {"mlm": [(t.budget_flops, get_size(t.size).n_params_non_embedding, 3.0 + 1e-6 * i)
                      for i, t in enumerate(a.first_pass())]}
    first = next_wave(a, points, {t.name for t in a.first_pass()})[0].trials
    again = next_wave(a, points, {t.name for t in a.first_pass()} | {t.name for t in first})[0]
    assert not {t.name for t in again.trials} & {t.name for t in first}


def test_wave_names_are_deterministic_and_follow_the_trials():
    t1, t2 = Trial("mlm", "tiny-1", 1e15), Trial("mlm", "tiny-2", 1e15)
    assert wave_name(1, [t1, t2]) == wave_name(1, [t2, t1]) != wave_name(1, [t1])


def test_search_space_checks_the_adaptive_design_and_its_whole_grid():
    unknown = SearchSpace("a", "unused", [Trial("mlm", "tiny-1", 1e15)],
                          adaptive=Adaptive(budgets=[1e15, 1e16], sizes=["tiny-1", "tiny-99"]))
    assert any("unknown size(s) tiny-99" in e for e in validate(unknown, None))
    bad = SearchSpace("a", "unused", [Trial("mlm", "tiny-1", 1e15)],
                      adaptive=Adaptive(budgets=[1e15], sizes=["tiny-1", "tiny-2", "tiny-4"], coarse=["tiny-3"]))
    errors = validate(bad, None)
    assert any("at least 2 budgets" in e for e in errors)
    assert any("tiny-3" in e and "not among the candidate" in e for e in errors)
    assert validate(SearchSpace("x", "unused", [Trial("mlm", "tiny-1", 1e15)], adaptive="grid"), None) == [
        "SPACE.adaptive must be an Adaptive(...), not str"]
    # a candidate that would repeat the data is caught before the sweep starts, though no wave chose it yet
    a = Adaptive(budgets=[1e11, 1e12], sizes=["tiny-1", "tiny-2", "tiny-3"], coarse=["tiny-2", "tiny-3"])
    space = SearchSpace("b", "unused", a.first_pass(), adaptive=a)
    manifest = {"seq_len": 128, "splits": {"train": {"tokens": 2_000_000}}}
    errors = validate(space, manifest)
    assert any("mlm-tiny-1-1e12-s0" in e and "epochs" in e for e in errors), errors
    assert len(all_trials(space)) == 6 and all_trials(space)[:4] == space.trials


@pytest.mark.slow
def test_adaptive_sweep_end_to_end_and_resume(ray_local, demo_data, tmp_path, capsys):
    """2 budgets × 3 candidates, a first pass of the 2 larger sizes per budget, at most 5 trials: the
    smaller is better (at this budget tiny-1 beats tiny-3 by 0.08-0.19 nats, measured), so placement asks
    for tiny-1, and max_trials cuts the wave to one trial; a second run trains nothing again."""
    from protscale.sweep.tune import run_sweep

    a = Adaptive(budgets=[1e9, 2e9], sizes=["tiny-1", "tiny-2", "tiny-3"], objectives=["mlm"],
                 coarse=["tiny-2", "tiny-3"], max_trials=5, per_budget=1)
    space = SearchSpace("adaptive-e2e", str(demo_data), a.first_pass(), adaptive=a,
                        defaults={"batch_tokens": 1024, "eval_rows": 32}, max_concurrent=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    statuses = run_sweep(space, uri, str(tmp_path / "runs"))
    out = capsys.readouterr().out
    assert "[adaptive]" in out
    assert len(statuses) == 5 and all(s == "completed" for s in statuses.values()), statuses
    assert set(statuses) <= {t.name for t in a.grid()}
    extra = set(statuses) - {t.name for t in a.first_pass()}
    assert len(extra) == 1 and extra <= {"mlm-tiny-1-1e09-s0", "mlm-tiny-1-2e09-s0"}   # one wave, cut to 1
    again = run_sweep(space, uri, str(tmp_path / "runs"), resume=True)
    assert again == statuses
    from protscale.tracking import runs

    cl = runs.client(uri)
    exp = cl.get_experiment_by_name(space.name)
    trial_runs = cl.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'")
    assert sorted(r.data.tags["trial"] for r in trial_runs) == sorted(statuses)   # none trained twice


def test_demo_space_is_adaptive_and_valid_on_the_bundled_data():
    """The demo's design (search_spaces/demo_cpu.py): every candidate trial trains on fresh tokens of the
    bundled proteins (~3.02M training tokens prepared), and the budget spends fewer trials than the grid."""
    from pathlib import Path

    from protscale.sweep.space import load

    space = load(Path(__file__).resolve().parents[1] / "search_spaces" / "demo_cpu.py")
    a = space.adaptive
    assert isinstance(a, Adaptive) and a.objectives == ("mlm",)
    manifest = {"seq_len": 128, "splits": {"train": {"tokens": 3_019_903}}}
    assert validate(space, manifest) == []
    assert all(len(a.first_sizes(b)) == 3 for b in a.budgets)
    assert len(a.first_pass()) < a.limit() < len(a.grid())
    parents = [t for t in space.trials if t.parent]
    assert parents and all(t.objective == "mlm" for t in parents)
    scratch = {(t.size, t.budget_flops) for t in space.trials if t.objective == "mlm" and not t.parent}
    assert {(t.size, t.budget_flops) for t in parents} <= scratch        # each transfer MLM has its baseline


def test_demo_reports_adaptive_trials_and_compute_against_the_full_grid():
    from protscale.sweep.demo import adaptive_usage

    a = Adaptive(budgets=[1e10, 1e11], sizes=["micro-3", "micro-4", "micro-5"], objectives=["mlm"])
    space = SearchSpace("d", "unused", a.first_pass(), adaptive=a)
    statuses = {t.name: "completed" for t in a.grid() if t.budget_flops == 1e10}
    statuses["mlm-micro-3-1e11-s0"] = "failed"
    u = adaptive_usage(space, statuses)["mlm"]
    assert u == {"trials": 3, "grid_trials": 6, "compute": 3e10, "grid_compute": 3.3e11}
    assert adaptive_usage(SearchSpace("f", "unused", a.first_pass()), statuses) is None


def test_budgets_whose_best_is_an_edge_candidate_get_the_neighbour_inside():
    """Recorded first pass of an earlier demo design (val_loss of the real trials): at 3e10 and 1e11 the best
    run is the smallest size the data allows (no smaller candidate), so the wave refines next to it instead."""
    a = Adaptive(budgets=[1e10, 3e10, 1e11], objectives=["mlm"], min_tokens=60_000, max_tokens=3_000_000,
                 sizes=["micro-1", "micro-2", "micro-3", "micro-4", "micro-5", "tiny-1", "tiny-2", "tiny-3"],
                 max_trials=13, target_width=0.15)

    def n(s):
        return float(get_size(s).n_params_non_embedding)

    pts = {"mlm": [(1e10, n("micro-1"), 2.7142), (1e10, n("micro-3"), 2.7021), (1e10, n("tiny-1"), 2.8949),
                   (3e10, n("micro-2"), 2.6771), (3e10, n("micro-4"), 2.6967), (3e10, n("tiny-2"), 2.8891),
                   (1e11, n("micro-4"), 2.6717), (1e11, n("tiny-1"), 2.6979), (1e11, n("tiny-3"), 2.8969)]}
    (w,) = next_wave(a, pts, {t.name for t in a.first_pass()})
    names = {t.name for t in w.trials}
    assert {"mlm-micro-3-3e10-s0", "mlm-micro-5-1e11-s0"} <= names
    assert len(w.trials) <= a.limit() - 9 and not w.done


def test_wave_line_counts_completed_trials_apart_from_attempted_ones():
    """The driver's `[adaptive]` line says how many trials completed (the points of the fit), and how many
    were attempted when some failed or did not finish."""
    from protscale.sweep.adaptive import Wave, describe

    t = Trial("clm", "micro-2", 1e11, 0)
    assert describe(Wave("clm", [t], None, False, "", 4, 4)).startswith("clm: 4 trained, no exponent yet; next 1")
    assert describe(Wave("clm", [], (0.7, 0.5, 0.9), True, "narrow", 4, 6)) == (
        "clm: 4 trained of 6 attempted, N_opt exponent 0.700 [0.500, 0.900]; done (narrow)")
