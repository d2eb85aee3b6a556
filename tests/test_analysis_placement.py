"""Adaptive IsoFLOP placement (analysis/placement.py) on a synthetic sweep with a planted frontier."""

from __future__ import annotations

import numpy as np
import pytest

from protscale.analysis import placement

N_EXP, COEF = 0.6, 1e-4                 # planted N_opt = COEF · C^N_EXP
BUDGETS = (1e18, 3e18, 1e19, 3e19, 1e20)
CURVATURE, NOISE = 0.12, 0.004


def _x0(c):
    return np.log10(COEF) + N_EXP * np.log10(c)


def _loss(c, n, rng):
    return 3.0 * c ** -0.03 + CURVATURE * (np.log10(n) - _x0(c)) ** 2 + NOISE * rng.standard_normal()


def _sweep(offset_decades: float, seed: int = 0, max_waves: int = 30):
    """Coarse pass of 3 sizes per budget, shifted by ``offset_decades`` from the optimum, then place() waves."""
    rng = np.random.default_rng(seed)
    candidates = list(np.logspace(5.5, 10.5, 41))           # 1/8-decade grid of trainable sizes
    points, waves = [], []
    for c in BUDGETS:
        x = _x0(c) + offset_decades
        for n in sorted(candidates, key=lambda n: abs(np.log10(n) - x))[:3]:
            points.append((c, n, _loss(c, n, rng)))
    for _ in range(max_waves):
        res = placement.place(points, candidates, per_budget=2, target_width=0.06, seed=seed)
        waves.append(res)
        if res.done:
            break
        for c, ns in res.next_sizes.items():
            tried = [n for b, n, _ in points if b == c]
            assert ns and len(ns) <= 2
            assert all(any(n == k for k in candidates) for n in ns), "proposed a size not among the candidates"
            assert not any(abs(n / t - 1) < 0.01 for n in ns for t in tried), "proposed a size already trained"
            points += [(c, n, _loss(c, n, rng)) for n in ns]
    return points, waves


@pytest.mark.parametrize("offset", [0.9, -0.9])
def test_place_brackets_minima_and_stops(offset):
    points, waves = _sweep(offset)
    first, last = waves[0], waves[-1]
    # the coarse pass sits 0.9 decades off the optimum: no frontier, and every budget is extended
    # towards the side where its minimum lies
    assert first.exponent is None and not first.done
    assert set(first.next_sizes) == set(BUDGETS)
    for c, ns in first.next_sizes.items():
        tried = [n for b, n, _ in points[:15] if b == c]
        assert all(n < min(tried) for n in ns) if offset > 0 else all(n > max(tried) for n in ns)
    # it stops, with every minimum bracketed and the planted exponent inside the interval
    assert last.done, [w.reason for w in waves]
    for c in BUDGETS:
        xs, ls = zip(*[(np.log10(n), loss) for b, n, loss in points if b == c])
        best = xs[int(np.argmin(ls))]
        assert min(xs) < best < max(xs)                        # bracketed by the sizes trained
        assert min(xs) - 0.125 < _x0(c) < max(xs) + 0.125      # around the planted optimum (one grid step)
    n, lo, hi = last.exponent
    assert abs(n - N_EXP) < 0.07, last.exponent
    assert hi - lo <= 0.06 or "nothing informative" in last.reason
    # ... having trained fewer than half of the candidate sizes at each budget
    for c in BUDGETS:
        assert sum(b == c for b, _, _ in points) < 41 / 2


def test_placed_sweeps_intervals_cover_the_planted_exponent():
    """A 95% interval misses the truth in about 1 sweep of 20, so coverage is checked over 20 placed sweeps."""
    covered = []
    for seed in range(10):
        for offset in (0.9, -0.9):
            _, lo, hi = _sweep(offset, seed=seed + 1)[1][-1].exponent
            covered.append(lo <= N_EXP <= hi)
    assert sum(covered) >= 17, covered


def test_place_without_points_or_candidates_is_done():
    assert placement.place([], [1e6, 1e7]).done
    pts = [(1e18, n, 3.0 - 0.01 * i) for i, n in enumerate([1e6, 2e6, 4e6])]   # best at the largest size
    res = placement.place(pts, [1e6, 2e6, 4e6])
    assert res.done and res.exponent is None and "beyond the candidates" in res.reason


def test_best_at_an_edge_the_candidates_cannot_pass_gets_its_inside_neighbour():
    """The smallest (largest) candidate is best and nothing lies beyond it: placement asks for the untried
    size between the best and the next size sampled; once that is tried too, the budget is unbracketable."""
    cands = [1e3, 2e3, 4e3, 8e3, 16e3]
    low = [(1e10, 1e3, 2.70), (1e10, 4e3, 2.85), (1e10, 16e3, 2.90)]     # no vertex: a concave profile
    high = [(1e12, 1e3, 2.90), (1e12, 4e3, 2.85), (1e12, 16e3, 2.70)]
    res = placement.place(low + high, cands)
    assert res.next_sizes == {1e10: [2e3], 1e12: [8e3]} and not res.done
    assert "edge of the candidates" in res.reason
    res = placement.place(low + [(1e10, 2e3, 2.71)], cands)
    assert res.done and res.next_sizes == {} and "beyond the candidates" in res.reason
