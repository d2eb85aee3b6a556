"""Small numerical helpers shared by the fits: batched weighted line fits, percentile intervals,
bootstrap count matrices and a progress printer.

A bootstrap replicate is represented throughout as a vector of *counts* (how many times each unit was
drawn), so that every fit can be written as a weighted fit and run for all replicates at once.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np


@contextlib.contextmanager
def single_thread_blas():
    """Run BLAS single-threaded inside the block: the fits make many tiny BLAS calls (L-BFGS-B on 5
    parameters), for which OpenBLAS's threads only add overhead -- up to 50x on a busy 2-core machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is optional
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def weighted_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares line y = slope·x + intercept, batched.

    ``x``, ``y``: (n,) or (R, n); ``w``: (R, n) non-negative weights (NaN in ``y`` means "no point").
    Returns (slope, intercept), each (R,); NaN where fewer than two distinct x carry weight.
    """
    w = np.atleast_2d(np.asarray(w, dtype=float))
    x = np.broadcast_to(np.asarray(x, dtype=float), w.shape)
    y = np.broadcast_to(np.asarray(y, dtype=float), w.shape)
    ok = np.isfinite(x) & np.isfinite(y) & (w > 0)
    w = np.where(ok, w, 0.0)
    x0 = np.where(ok, x, 0.0)
    y0 = np.where(ok, y, 0.0)
    sw = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = (w * x0).sum(1) / sw
        my = (w * y0).sum(1) / sw
        dx = np.where(ok, x0 - mx[:, None], 0.0)
        sxx = (w * dx * dx).sum(1)
        sxy = (w * dx * (y0 - my[:, None])).sum(1)
        slope = sxy / sxx
    # at least two distinct x values with positive weight
    span = np.where(ok, x0, np.inf).min(1), np.where(ok, x0, -np.inf).max(1)
    good = (sw > 0) & (span[1] - span[0] > 1e-12 * np.maximum(1.0, np.abs(span[1])))
    slope = np.where(good, slope, np.nan)
    intercept = np.where(good, my - slope * mx, np.nan)
    return slope, intercept


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile interval of the finite bootstrap samples, or None when fewer than 10 are finite."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if s.size < 10:
        return None
    lo, hi = np.percentile(s, [50 * (1 - level), 100 - 50 * (1 - level)])
    return [float(lo), float(hi)]


def few_cluster_factor(n_clusters: int, level: float = 0.95) -> float:
    """How much to widen a cluster bootstrap's spread when it rests on few clusters (runs, budgets).

    Resampling G clusters gives a spread that is √((G−1)/G) too small, and a normal-theory 95% range where
    the estimate's error, a mean over G clusters, follows Student's t with G − 1 degrees of freedom. The
    factor t_{G−1}/z·√(G/(G−1)) undoes both (Cameron & Miller 2015, "few clusters"): 1.58 at G = 5,
    1.17 at G = 20, 1 when there is nothing to scale (G < 2)."""
    if n_clusters < 2:
        return 1.0
    from scipy import stats as sps

    q = 0.5 + level / 2
    return float(sps.t.ppf(q, n_clusters - 1) / sps.norm.ppf(q) * np.sqrt(n_clusters / (n_clusters - 1)))


def widen(samples: np.ndarray, estimate: float, factor: float) -> np.ndarray:
    """Bootstrap samples moved away from the point estimate by ``factor`` (NaN stays NaN)."""
    return estimate + factor * (np.asarray(samples, dtype=float) - estimate)


def hull(*intervals: list[float] | None) -> list[float] | None:
    """Smallest interval containing all the given (non-None) intervals."""
    iv = [i for i in intervals if i is not None]
    if not iv:
        return None
    return [float(min(i[0] for i in iv)), float(max(i[1] for i in iv))]


def stratified_counts(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Run-level resampling within strata: (n_boot, n) counts; each stratum keeps its size."""
    groups = np.asarray(groups)
    n = groups.size
    counts = np.zeros((n_boot, n))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        draws = rng.integers(0, idx.size, size=(n_boot, idx.size))
        np.add.at(counts, (np.arange(n_boot)[:, None], idx[draws]), 1.0)
    return counts


def simple_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Run-level resampling over all units: (n_boot, n) counts (multinomial with equal probabilities)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)


def block_counts(blocks: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Block resampling: whole blocks are drawn with replacement; every unit inherits its block's count.

    Returns (n_boot, n) counts.
    """
    blocks = np.asarray(blocks)
    uniq, inv = np.unique(blocks, return_inverse=True)
    k = uniq.size
    bc = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot).astype(float)  # (B, k)
    return bc[:, inv]


class Progress:
    """A progress bar on stderr (rich, as the sweep's display) for slow steps: the bootstrap loops.

    Off when ``enabled`` is false (``protscale fit -q``) or when stderr is not a terminal (logs, CI, pipes):
    a bar redrawn in place is noise in a log file. ``update(done)`` takes the running total."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.total = max(int(total), 1)
        self._bar = None
        if enabled and _stderr_is_tty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn(f"  {label}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(label, total=self.total)

    def update(self, done: int) -> None:
        if self._bar is None:
            return
        self._bar.update(self._task, completed=min(int(done), self.total))
        if done >= self.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
