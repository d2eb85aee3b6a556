"""Adaptive IsoFLOP sweeps: a coarse first pass, then waves of sizes placed where they tell the most.

    from protscale.sweep.adaptive import Adaptive

    GRID = Adaptive(budgets=[3e9, 1e10, 3e10], sizes=["micro-1", ..., "micro-7"], objectives=["mlm"],
                    coarse=["micro-1", "micro-4", "micro-7"], max_trials=14, target_width=0.1)
    SPACE = SearchSpace(name=..., data=..., trials=GRID.first_pass(), adaptive=GRID)

``sizes`` is either one list for every budget or, as in an IsoFLOP grid whose sizes move up with the budget,
a mapping ``{budget_flops: [sizes]}``.

``run_sweep`` trains the first pass (with any other trial of the space), then, per objective, reads the
finished trials' final ``val_loss`` from the tracking store, asks
:func:`protscale.analysis.placement.place` which candidate sizes to train next at each budget, and runs
them as the next wave, until placement is done (the N_opt exponent's 95% interval is at most
``target_width`` wide, or nothing informative is left) or ``max_trials`` IsoFLOP trials of that objective
have been trained. Trial names are the fixed grid's (``objective-size-budget-seed``), and placement is a
deterministic function of the finished trials, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..model.sizes import get_size, tokens_for_budget
from .space import Trial

BUDGET_RTOL = 0.05       # a finished run belongs to a budget of the design when within 5% of it (analysis snap)


@dataclass(frozen=True)
class Adaptive:
    budgets: tuple[float, ...]
    sizes: tuple[str, ...]                # candidate sizes (the full grid's), any order; or {budget: sizes}
    objectives: tuple[str, ...] = ("mlm",)
    coarse: tuple[str, ...] | int = 3     # first pass: these sizes, or this many spread over each budget's
    max_trials: int = 0                   # IsoFLOP trials per objective, first pass included; 0 = the full grid
    target_width: float = 0.1             # stop when the N_opt exponent's 95% interval is at most this wide
    per_budget: int = 2                   # sizes a budget gets per wave at most
    min_tokens: int = 0                   # a (size, budget) is a candidate when D = C/(6N) is within
    max_tokens: int = 0                   # [min_tokens, max_tokens] (0: no bound), e.g. max = unique tokens
    seed: int = 0
    budget_sizes: tuple[tuple[float, tuple[str, ...]], ...] = field(default=(), init=False)  # from a mapping

    def __post_init__(self):
        if isinstance(self.sizes, Mapping):
            per = tuple((float(b), tuple(v)) for b, v in self.sizes.items())
            object.__setattr__(self, "budget_sizes", per)
            object.__setattr__(self, "sizes", tuple(dict.fromkeys(s for _, v in per for s in v)))
        for name in ("budgets", "sizes", "objectives"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.coarse, int):
            object.__setattr__(self, "coarse", tuple(self.coarse))
        object.__setattr__(self, "budgets", tuple(float(b) for b in self.budgets))

    def sizes_at(self, budget: float) -> tuple[str, ...]:
        """The sizes listed for ``budget`` (all of ``sizes`` unless it was a mapping)."""
        if not self.budget_sizes:
            return self.sizes
        return next((v for b, v in self.budget_sizes if abs(b / budget - 1.0) <= 1e-9), ())

    def by_n(self) -> dict[float, str]:
        """Candidate sizes by non-embedding N (the N of the IsoFLOP fit), smallest first."""
        return dict(sorted((float(get_size(s).n_params_non_embedding), s) for s in self.sizes))

    def candidates(self, budget: float) -> list[str]:
        """Sizes that may train at ``budget`` (their D within [min_tokens, max_tokens]), smallest first."""
        listed = self.sizes_at(budget)
        return [s for s in self.by_n().values()
                if s in listed and (not self.max_tokens or tokens_for_budget(get_size(s), budget) <= self.max_tokens)
                and tokens_for_budget(get_size(s), budget) >= self.min_tokens]

    def first_sizes(self, budget: float) -> list[str]:
        cands = self.candidates(budget)
        if not isinstance(self.coarse, int):
            return [s for s in cands if s in self.coarse]
        if len(cands) <= self.coarse:
            return cands
        idx = [round(i * (len(cands) - 1) / (self.coarse - 1)) for i in range(self.coarse)] if self.coarse > 1 else [0]
        return list(dict.fromkeys(cands[i] for i in idx))

    def first_pass(self) -> list[Trial]:
        """The coarse pass: per objective and budget, the ``coarse`` sizes."""
        return [Trial(o, s, b, self.seed) for o in self.objectives for b in self.budgets for s in self.first_sizes(b)]

    def grid(self) -> list[Trial]:
        """Every trial placement may choose: per budget, its candidate sizes."""
        return [Trial(o, s, b, self.seed) for o in self.objectives for b in self.budgets for s in self.candidates(b)]

    def limit(self) -> int:
        return self.max_trials or len(self.grid()) // max(1, len(self.objectives))

    def problems(self) -> list[str]:
        out = []
        coarse = () if isinstance(self.coarse, int) else self.coarse
        unknown = [s for s in (*self.sizes, *coarse) if not _known(s)]
        if unknown:
            out.append(f"adaptive: unknown size(s) {', '.join(unknown)}")
        elif len(self.by_n()) < len(set(self.sizes)):
            out.append("adaptive: two candidate sizes have the same non-embedding N")
        if out:
            return out
        stray = [] if isinstance(self.coarse, int) else [s for s in self.coarse if s not in self.sizes]
        if stray:
            out.append(f"adaptive: coarse size(s) {', '.join(stray)} are not among the candidate sizes")
        if len(self.budgets) < 2:
            out.append("adaptive: an N_opt exponent needs at least 2 budgets")
        if self.budget_sizes and sorted(b for b, _ in self.budget_sizes) != sorted(self.budgets):
            out.append(f"adaptive: the budgets of sizes ({', '.join(f'{b:g}' for b, _ in self.budget_sizes)}) are "
                       f"not the budgets ({', '.join(f'{b:g}' for b in self.budgets)})")
        few = [f"{b:.3g}" for b in self.budgets if len(self.candidates(b)) < 3]
        if few:
            out.append(f"adaptive: budget(s) {', '.join(few)} have fewer than 3 candidate sizes within "
                       f"[min_tokens, max_tokens] = [{self.min_tokens:,}, {self.max_tokens:,}] tokens: "
                       "no minimum can be bracketed there; add sizes or widen the bounds")
        if self.max_trials and self.max_trials < len(self.first_pass()) // max(1, len(self.objectives)):
            out.append(f"adaptive: max_trials {self.max_trials} is less than the first pass "
                       f"({len(self.first_pass()) // max(1, len(self.objectives))} trials per objective)")
        if self.target_width <= 0 or self.per_budget < 1:
            out.append("adaptive: target_width must be > 0 and per_budget >= 1")
        return out


def _known(size: str) -> bool:
    try:
        get_size(size)
        return True
    except KeyError:
        return False


@dataclass
class Wave:
    """What placement decided for one objective after a wave."""

    objective: str
    trials: list[Trial]
    exponent: tuple[float, float, float] | None
    done: bool
    reason: str
    n_trained: int       # trials completed to their budget (the points placement fits)
    n_attempted: int = 0  # trials of the grid started so far (failed or unfinished ones included)


def design_budget(adaptive: Adaptive, budget: float) -> float | None:
    """The design budget a finished run's budget belongs to (None: another budget)."""
    return next((b for b in adaptive.budgets if abs(budget / b - 1.0) <= BUDGET_RTOL), None)


def read_points(tracking_uri: str, experiment: str, adaptive: Adaptive,
                hashes: dict[str, str] | None = None) -> dict[str, list[tuple]]:
    """{objective: [(budget_flops, n_params, val_loss)]} of the finished from-scratch trials of the design
    (completed, trained to their budget, a candidate size) — read from the tracking store with the
    analyzer's reader and final-point rule, so placement sees what ``protscale fit`` will fit. With
    ``hashes`` ({trial name: trial_hash}) only runs of a trial's current identity count."""
    import numpy as np

    from ..analysis.checks import final_points
    from ..analysis.data import from_tables
    from ..tracking import contract as c
    from ..tracking.reader import read_experiments

    out: dict[str, list[tuple]] = {o: [] for o in adaptive.objectives}
    tables = read_experiments(tracking_uri, [experiment], metric_keys=[c.VAL_LOSS, c.TOKENS, c.FLOPS])
    runs, curves = from_tables(tables, c.VAL_LOSS)
    if runs.empty or curves.empty:
        return out
    keep = (runs["kind"] == "trial") & (runs["status"] == c.STATUS_COMPLETED) \
        & (runs["init_from"].fillna("").astype(str) == "")
    if hashes is not None:
        raw = tables.runs.to_pandas().set_index("run_id")
        trial = raw[f"tags.{c.TRIAL}"] if f"tags.{c.TRIAL}" in raw else raw["run_name"]
        ident = raw[f"params.{c.TRIAL_HASH}"] if f"params.{c.TRIAL_HASH}" in raw else trial.map(lambda _: None)
        trial, ident = trial.reindex(runs["run_id"]).to_numpy(), ident.reindex(runs["run_id"]).to_numpy()
        keep &= np.array([hashes.get(t) == h for t, h in zip(trial, ident)], dtype=bool)
    runs = runs[keep]
    pts = final_points(runs, curves)
    for r in pts.itertuples():
        b = design_budget(adaptive, float(r.budget_flops)) if r.budget_flops == r.budget_flops else None
        n = float(r.n_params)
        if r.objective in out and b is not None and n > 0 and r.reached and r.final_loss == r.final_loss:
            out[r.objective].append((b, n, float(r.final_loss)))
    return out


def next_wave(adaptive: Adaptive, points: dict[str, list[tuple]], attempted: Iterable[str],
              place: Callable | None = None) -> list[Wave]:
    """Per objective: the next trials placement asks for (none when it is done or out of trials).

    ``attempted``: names of trials already trained or tried (failed ones are not asked for again)."""
    if place is None:
        from ..analysis.placement import place
    attempted = set(attempted)
    by_n = adaptive.by_n()
    waves = []
    for obj in adaptive.objectives:
        pts = points.get(obj, [])
        mine = {t.name for t in adaptive.grid() if t.objective == obj} & attempted
        left = adaptive.limit() - len(mine)
        cands = {b: [float(get_size(s).n_params_non_embedding) for s in adaptive.candidates(b)]
                 for b in adaptive.budgets}
        p = place(pts, cands, per_budget=adaptive.per_budget, target_width=adaptive.target_width,
                  seed=adaptive.seed)
        trials = []
        for b, ns in sorted(p.next_sizes.items()):
            budget = design_budget(adaptive, float(b))
            for n in ns:
                size = by_n.get(float(n))
                if budget is None or size not in adaptive.candidates(budget):
                    continue
                t = Trial(obj, size, budget, adaptive.seed)
                if t.name not in attempted and t not in trials:
                    trials.append(t)
        reason = p.reason
        if left <= 0 and trials:
            trials, reason = [], f"{reason}; stopped: the {adaptive.limit()} trials of max_trials are spent"
        elif len(trials) > left:
            trials = _fair_cut(trials, left)
            reason = f"{reason}; last wave cut to {left} trial(s) by max_trials {adaptive.limit()}"
        elif not trials and not p.done:
            reason = f"{reason}; stopped: every size placement asks for was tried already"
        waves.append(Wave(obj, trials, p.exponent, p.done or not trials, reason, len(pts), len(mine)))
    return waves


def _fair_cut(trials: list[Trial], k: int) -> list[Trial]:
    """k trials taking one per budget in turn (a cut wave still helps every budget it can)."""
    by_budget: dict[float, list[Trial]] = {}
    for t in trials:
        by_budget.setdefault(t.budget_flops, []).append(t)
    out: list[Trial] = []
    while len(out) < k:
        for ts in by_budget.values():
            if ts and len(out) < k:
                out.append(ts.pop(0))
    return out


def trials_digest(trials: Iterable[Trial]) -> str:
    """A short hash of a set of trials (their names, in any order)."""
    return hashlib.sha1(",".join(sorted(t.name for t in trials)).encode()).hexdigest()[:8]


def wave_name(index: int, trials: list[Trial]) -> str:
    """Ray Tune experiment name of an adaptive wave: its index and a hash of its trials, so that a resumed
    sweep restores a wave only when placement asks for the same trials again."""
    return f"adaptive{index}-{trials_digest(trials)}"


def describe(w: Wave) -> str:
    done = f"{w.n_trained} trained" + (f" of {w.n_attempted} attempted" if w.n_attempted > w.n_trained else "")
    exp = (f"N_opt exponent {w.exponent[0]:.3f} [{w.exponent[1]:.3f}, {w.exponent[2]:.3f}]"
           if w.exponent else "no exponent yet")
    if w.trials:
        where = "; ".join(f"{b:.3g}: {', '.join(t.size for t in w.trials if t.budget_flops == b)}"
                          for b in sorted({t.budget_flops for t in w.trials}))
        return f"{w.objective}: {done}, {exp}; next {len(w.trials)}: {where}"
    return f"{w.objective}: {done}, {exp}; done ({w.reason})"
