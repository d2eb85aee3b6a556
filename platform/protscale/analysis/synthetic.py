"""Synthetic runs drawn from known laws, for tests and for trying the analyzer without a sweep.

Everything returns the analyzer's inputs (``runs``, ``curves`` frames, see ``data.py``) so the fits can
be checked against the truth that generated them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .data import make_runs

#: A CLM-like law (the paper's published CLM row).
LAW = {"E": 2.1226, "A": 143.98, "B": 22036.5, "alpha": 0.3666, "beta": 0.4956}


def law_loss(law: dict, n, d):
    return law["E"] + law["A"] / np.asarray(n, float) ** law["alpha"] + law["B"] / np.asarray(d, float) ** law["beta"]


def law_n_opt(law: dict, c):
    a, b = law["alpha"], law["beta"]
    G = (a * law["A"] / (b * law["B"])) ** (1 / (a + b))
    return G * (np.asarray(c, float) / 6) ** (b / (a + b))


def _curve(n, d_final, loss_fn, points: int, rng, noise: float):
    t = np.geomspace(d_final / 200, d_final, points)
    L = loss_fn(t) * np.exp(noise * rng.standard_normal(points))
    return t, L


def parametric_runs(law: dict = LAW, budgets=(1e18, 3e18, 1e19, 3e19, 1e20), sizes_per_budget: int = 7,
                    span_decades: float = 1.2, noise: float = 0.005, points: int = 20, seed: int = 0,
                    objective: str = "clm", prefix: str = "", offset_decades: float = 0.0,
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """IsoFLOP-style runs whose loss at (N, tokens) follows ``law`` (multiplicative log-normal noise).

    Sizes are log-spaced over ``span_decades`` centred on the law's N_opt at each budget, shifted by
    ``offset_decades`` (> 0: a grid of too-large models, whose best run is the smallest one); each run's
    curve follows the law along its tokens and ends at D = C/(6N)."""
    rng = np.random.default_rng(seed)
    runs, curves = [], []
    for C in budgets:
        n0 = law_n_opt(law, C) * 10 ** offset_decades
        for n in n0 * np.logspace(-span_decades / 2, span_decades / 2, sizes_per_budget):
            rid = f"{prefix}{objective}-{C:.0e}-{n:.3g}"
            d = C / (6 * n)
            t, L = _curve(n, d, lambda t, n=n: law_loss(law, n, t), points, rng, noise)
            runs.append({"run_id": rid, "run_name": rid, "objective": objective, "n_params": float(n),
                         "budget_flops": float(C), "status": "completed", "kind": "trial"})
            curves.append(pd.DataFrame({"run_id": rid, "step": np.arange(1, points + 1), "tokens": t,
                                        "flops": 6 * n * t, "loss": L}))
    return make_runs(pd.DataFrame(runs)), pd.concat(curves, ignore_index=True)


def isoflop_points(n_exponent: float = 0.6, coef: float = 1e-4, budgets=(1e18, 3e18, 1e19, 3e19, 1e20, 3e20),
                   sizes_per_budget: int = 7, span_decades: float = 1.2, curvature: float = 0.12,
                   noise: float = 0.004, seed: int = 0) -> pd.DataFrame:
    """Final points of IsoFLOP runs with a *known* frontier N_opt = coef·C^n_exponent: loss at a budget is
    a parabola in log10 N around log10 N_opt plus Gaussian noise. Columns run_id, n_params, loss, budget."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        x0 = np.log10(coef) + n_exponent * np.log10(C)
        xs = x0 + np.linspace(-span_decades / 2, span_decades / 2, sizes_per_budget) + rng.uniform(-0.1, 0.1)
        lopt = 3.0 * C ** -0.03
        for x in xs:
            rows.append({"run_id": f"r{C:.0e}-{x:.3f}", "n_params": 10 ** x, "budget": C,
                         "loss": lopt + curvature * (x - x0) ** 2 + noise * rng.standard_normal()})
    return pd.DataFrame(rows)


def transfer_runs(law: dict = LAW, k: float = 2e3, a: float = 0.2, b: float = 0.4, sizes=(3e7, 1e8, 3e8, 1e9),
                  budget_ratio_tokens: float = 20.0, pretrain_fraction: float = 0.2, points: int = 40,
                  noise: float = 0.0, seed: int = 0, source: str = "clm", target: str = "mlm",
                  source_rule: dict | None = None):
    """Scratch and initialised runs of ``target`` with D_t = k·D_F^a·N^b exactly: the initialised run at
    D_F tokens has the scratch loss at D_F + D_t. Each size trains D = budget_ratio_tokens·N tokens.

    The source (pre-training) budget of a run is ``pretrain_fraction`` × its own budget, or with
    ``source_rule`` {coefficient s, exponent q} 6·N·s·N^q FLOPs (D_src = s·N^q tokens)."""
    rng = np.random.default_rng(seed)
    runs, curves = [], []
    for n in sizes:
        d = budget_ratio_tokens * n
        C = 6 * n * d
        t = np.geomspace(d / 300, d, points)
        for kind in ("scratch", "transfer"):
            rid = f"{target}-{kind}-{n:.3g}"
            eff = t + (k * t ** a * n ** b if kind == "transfer" else 0.0)
            L = law_loss(law, n, eff) * np.exp(noise * rng.standard_normal(points))
            row = {"run_id": rid, "run_name": rid, "objective": target, "n_params": float(n), "budget_flops": C,
                   "status": "completed", "kind": "trial"}
            if kind == "transfer":
                row.update(init_from=f"{source}-parent-{n:.3g}", init_objective=source,
                           init_budget_flops=(pretrain_fraction * C if source_rule is None else
                                              6 * n * source_rule["coefficient"] * n ** source_rule["exponent"]))
            runs.append(row)
            curves.append(pd.DataFrame({"run_id": rid, "step": np.arange(1, points + 1), "tokens": t,
                                        "flops": 6 * n * t, "loss": L}))
    return make_runs(pd.DataFrame(runs)), pd.concat(curves, ignore_index=True)
