"""The live frontier: the sweep's parent MLflow run, kept up to date while the sweep runs.

After each finished trial (``progress.SweepMonitor`` calls :meth:`LiveFrontier.update`), the parent run
gets, at step = number of trials finished so far:

* ``best_val_loss/<objective>/<budget>`` — the lowest final ``val_loss`` among the completed
  from-scratch trials of that objective and budget (budget written like ``1e11`` or ``2.5e11``);
* ``trials/completed``, ``trials/failed`` (diverged included), ``trials/running``;
* ``n_opt_exponent/<objective>`` with ``n_opt_exponent_ci95_low/<objective>`` and ``..._high/...``
  once the IsoFLOP frontier can be fitted (the analyzer's :func:`~protscale.analysis.isoflop.fit_isoflop`,
  with a small bootstrap: it runs once per finished trial);
* the figures ``live/isoflop_<objective>.png`` and, once fitted, ``live/frontier_<objective>.png``
  (the analyzer's plots; each upload overwrites the previous one), redrawn at most once a minute and at
  the end: a figure costs about a CPU-second, which trials on a small machine would otherwise lose.

The points are the trials' final ``val_loss`` (the latest value of each run: a completed trial's last
evaluation is at the end of its own schedule), read with one ``search_runs`` call — the same on a
SQLite store and a tracking server. Transfer trials (``init_from`` set) are not IsoFLOP points.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..tracking import contract as c

N_BOOT = 200                 # bootstrap replicates of the live fit (the analyzer's default is 1000)
FIGURE_EVERY_S = 60.0        # figures are redrawn at most this often (and at the end of the sweep)
BEST = "best_val_loss"
COMPLETED, FAILED, RUNNING = "trials/completed", "trials/failed", "trials/running"
EXPONENT, EXPONENT_LO, EXPONENT_HI = "n_opt_exponent", "n_opt_exponent_ci95_low", "n_opt_exponent_ci95_high"
FIGURES = "live"             # artifact folder of the figures


def budget_key(budget: float) -> str:
    """A budget as it appears in metric keys: ``1e11``, ``2.5e11`` (MLflow keys allow no ``+``)."""
    return f"{budget:.3g}".replace("e+", "e").replace("e0", "e")


def best_key(objective: str, budget: float) -> str:
    return f"{BEST}/{objective}/{budget_key(budget)}"


@dataclass
class TrialOutcome:
    name: str
    status: str
    objective: str
    size: str
    budget_flops: float
    n_params: float
    val_loss: float
    transfer: bool


@dataclass
class Snapshot:
    """What the sweep looks like now: every trial run read, the best loss per (objective, budget) as
    (val_loss, trial name, size), and per objective the fitted N_opt exponent (value, low, high, budgets
    used) or why there is none."""

    trials: dict[str, TrialOutcome] = field(default_factory=dict)
    best: dict[tuple[str, float], tuple[float, str, str]] = field(default_factory=dict)
    exponents: dict[str, tuple[float, float, float, int]] = field(default_factory=dict)
    no_frontier: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class LiveFrontier:
    """Reads the sweep's finished trials and writes the live frontier to its parent run."""

    def __init__(self, tracking_uri: str, experiment: str, run_id: str, hashes: dict[str, str] | None = None,
                 n_boot: int = N_BOOT, seed: int = 0, figure_every_s: float = FIGURE_EVERY_S):
        self.tracking_uri, self.experiment, self.run_id = tracking_uri, experiment, run_id
        self.hashes = hashes or {}
        self.n_boot, self.seed = n_boot, seed
        self.figure_every_s = figure_every_s
        self._drawn: dict[str, tuple] = {}       # objective -> the trials its figures show
        self._drawn_at = -float("inf")

    def read(self) -> Snapshot:
        """The trial runs of the experiment (of their current identity when ``hashes`` knows them)."""
        from ..tracking import runs

        cl = runs.client(self.tracking_uri)
        exp = cl.get_experiment_by_name(self.experiment)
        snap = Snapshot()
        if exp is None:
            return snap
        for r in cl.search_runs([exp.experiment_id], filter_string=f"tags.{c.KIND} = 'trial'", max_results=50000):
            name, p = r.data.tags.get(c.TRIAL), r.data.params
            if name is None or (name in self.hashes and p.get(c.TRIAL_HASH) != self.hashes[name]):
                continue
            try:
                out = TrialOutcome(name, r.data.tags.get(c.STATUS, ""), p.get(c.OBJECTIVE, ""), p.get(c.SIZE, ""),
                                   float(p.get(c.BUDGET_FLOPS, "nan")), float(p.get(c.N_PARAMS_NON_EMBEDDING, "nan")),
                                   float(r.data.metrics.get(c.VAL_LOSS, float("nan"))), bool(p.get(c.INIT_FROM)))
            except ValueError:
                continue
            old = snap.trials.get(name)
            if old is None or (old.status != c.STATUS_COMPLETED and out.status == c.STATUS_COMPLETED):
                snap.trials[name] = out
        for t in snap.trials.values():
            if t.status != c.STATUS_COMPLETED or t.transfer or not t.val_loss == t.val_loss:
                continue
            key = (t.objective, t.budget_flops)
            if key not in snap.best or t.val_loss < snap.best[key][0]:
                snap.best[key] = (t.val_loss, t.name, t.size)
        return snap

    def update(self, counts: dict[str, int], step: int, snap: Snapshot | None = None,
               final: bool = False) -> Snapshot:
        """Fit and log metrics, and figures, to the parent run (from ``snap``, read now when not given).
        Figures are drawn (about a CPU-second each) for objectives with new points, at most every
        ``figure_every_s`` seconds and on the ``final`` update. A fit not possible yet (the normal state
        early in a sweep) is noted in ``snap.no_frontier``, a failing fit or plot in ``snap.warnings``;
        store errors propagate to the caller, which logs them and carries on."""
        import pandas as pd
        from mlflow.entities import Metric

        from ..tracking import runs

        snap = snap if snap is not None else self.read()
        metrics = {best_key(o, b): v[0] for (o, b), v in snap.best.items()}
        metrics.update({COMPLETED: counts.get("completed", 0), FAILED: counts.get("failed", 0),
                        RUNNING: counts.get("running", 0)})
        draw = final or time.monotonic() - self._drawn_at >= self.figure_every_s
        figures = []
        tmp = Path(tempfile.mkdtemp(prefix="protscale-frontier-"))
        for obj in sorted({t.objective for t in snap.trials.values() if t.objective}):
            pts = pd.DataFrame([{"run_id": t.name, "n_params": t.n_params, "loss": t.val_loss, "budget": t.budget_flops}
                                for t in snap.trials.values()
                                if t.objective == obj and t.status == c.STATUS_COMPLETED and not t.transfer])
            if pts.empty:
                continue
            try:
                fit = self._fit(obj, pts, snap, metrics)
                key = tuple(sorted(pts["run_id"]))
                if draw and self._drawn.get(obj) != key:
                    figures += self._draw(obj, pts, fit, snap, tmp)
                    self._drawn[obj] = key
            except Exception as exc:        # a plot or fit problem must not stop the rest
                snap.warnings.append(f"{obj}: {type(exc).__name__}: {exc}")
        if figures:
            self._drawn_at = time.monotonic()
        cl = runs.client(self.tracking_uri)
        now = int(time.time() * 1000)
        cl.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        for path in figures:
            cl.log_artifact(self.run_id, str(path), FIGURES)
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()
        return snap

    def _fit(self, obj: str, pts, snap: Snapshot, metrics: dict):
        """The IsoFLOP fit of ``obj`` (None when there is no frontier yet, with the reason in ``snap``)."""
        from ..analysis import isoflop

        try:
            fit = isoflop.fit_isoflop(pts, n_boot=self.n_boot, seed=self.seed, objective=obj)
        except isoflop.FrontierNotFitted as exc:
            snap.no_frontier[obj] = str(exc)
            return exc
        res = fit.result
        lo, hi = res.get("n_exponent_ci95") or (float("nan"), float("nan"))
        used = sum(1 for b in res["budgets"] if b["used"])
        snap.exponents[obj] = (res["n_exponent"], lo, hi, used)
        metrics[f"{EXPONENT}/{obj}"] = res["n_exponent"]
        if lo == lo and hi == hi:
            metrics[f"{EXPONENT_LO}/{obj}"], metrics[f"{EXPONENT_HI}/{obj}"] = lo, hi
        return fit

    def _draw(self, obj: str, pts, fit, snap: Snapshot, tmp: Path) -> list[Path]:
        from types import SimpleNamespace

        from ..analysis import isoflop, plots

        profiles = SimpleNamespace(profiles=_with_points(fit.profiles, pts))
        if obj not in snap.exponents:       # no frontier yet: the profiles and points so far
            return [plots.plot_isoflop(obj, {}, profiles, tmp / f"isoflop_{obj}.png")]
        res = fit.result
        samples = {k: v.tolist() for k, v in isoflop.frontier_samples(fit).items()}
        return [plots.plot_isoflop(obj, res, profiles, tmp / f"isoflop_{obj}.png"),
                plots.plot_frontier(obj, {**res, "bootstrap_samples": samples}, tmp / f"frontier_{obj}.png")]


def _with_points(profiles: list, pts) -> list:
    """The fitted budgets' profiles plus, as points only, the budgets too sparse for a parabola yet, so
    the figure shows every finished trial from the first one on."""
    import numpy as np

    have = {e["budget"] for e in profiles}
    extra = []
    for b, g in pts[np.isfinite(pts["loss"])].groupby("budget"):
        if float(b) not in have:
            x = np.log10(g["n_params"].to_numpy(float))
            extra.append({"budget": float(b), "x": x, "y": g["loss"].to_numpy(float), "coef": np.full(3, np.nan),
                          "center": float(x.mean()), "xv": float("nan"), "lv": float("nan"), "used": False})
    return sorted([*profiles, *extra], key=lambda e: e["budget"])
