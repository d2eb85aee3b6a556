"""PNG plots of a fit: IsoFLOP profiles, the N_opt(C) / D_opt(C) frontier with its 95% band, loss against
compute with the fitted laws and their 95% bands and, when transfer runs exist, the transfer curves and the
D_t law. Every figure goes through :func:`_save`, which thins tick labels until none overlap."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tidy_log_axis(ax, which: str = "x") -> None:
    """Log axis labels: decades as majors; spans under ~2 decades also label 2× and 5× (plain numbers)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = (ax.get_xlim() if which == "x" else ax.get_ylim())
    if not (lo > 0 and hi > lo):
        return
    fmt = FuncFormatter(lambda v, _: f"{v:.2g}")
    if np.log10(hi / lo) < 2:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(fmt)
    else:
        axis.set_major_locator(LogLocator(base=10, numticks=8))
    axis.set_minor_formatter(NullFormatter())


def _renderer(fig):
    """Draw the figure and return its renderer (an Agg canvas is attached to a figure pyplot has closed)."""
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _overlaps(boxes) -> bool:
    return any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))


def _thin_tick_labels(fig) -> None:
    """Hide every other tick label of an axis until its visible labels do not overlap. Call after
    ``tight_layout`` (which has placed the ticks and set their labels): no extra draw is needed."""
    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else _renderer(fig)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            axis.get_tightbbox(renderer)          # ticks and labels up to date, without drawing the figure
            for _ in range(4):
                labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
                boxes = [t.get_window_extent(renderer) for t in labels]
                key = (lambda b: b.x0) if axis is ax.xaxis else (lambda b: b.y0)
                order = sorted(range(len(boxes)), key=lambda i: key(boxes[i]))
                if not _overlaps([boxes[i] for i in order]):
                    break
                for k, i in enumerate(order):
                    if k % 2:
                        labels[i].set_visible(False)


def overlapping_tick_labels(fig) -> list[str]:
    """Texts of visible tick labels that overlap a neighbour on the same axis (for tests)."""
    renderer = _renderer(fig)
    bad = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
            boxes = [(t.get_window_extent(renderer), t.get_text()) for t in labels]
            boxes.sort(key=lambda b: b[0].x0 if axis is ax.xaxis else b[0].y0)
            bad += [f"{a[1]} / {b[1]}" for a, b in zip(boxes, boxes[1:]) if a[0].overlaps(b[0])]
    return bad


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    _thin_tick_labels(fig)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _band(samples: dict, grid: np.ndarray):
    """Pointwise 95% band of N_opt over a compute grid: hull of the per-scheme percentile bands."""
    lo, hi = np.full(grid.size, np.inf), np.full(grid.size, -np.inf)
    for smp in samples.values():
        s = np.asarray(smp, float).reshape(-1, 2)
        if len(s) < 10:
            continue
        pred = s[:, 1][:, None] + s[:, 0][:, None] * np.log10(grid)[None, :]
        lo = np.minimum(lo, np.percentile(pred, 2.5, axis=0))
        hi = np.maximum(hi, np.percentile(pred, 97.5, axis=0))
    ok = np.isfinite(lo) & np.isfinite(hi)
    return (10 ** lo, 10 ** hi) if ok.all() else (None, None)


def plot_isoflop(obj: str, iso_res: dict, iso_fit, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    cmap = plt.get_cmap("viridis")
    prof = iso_fit.profiles
    for k, e in enumerate(prof):
        col = cmap(k / max(1, len(prof) - 1))
        ax.scatter(10 ** e["x"], e["y"], color=col, s=18, label=f"{e['budget']:.2g}", zorder=3)
        if np.all(np.isfinite(e["coef"])):
            u = np.linspace(e["x"].min() - 0.1, e["x"].max() + 0.1, 100)
            c0, c1, c2 = e["coef"]
            ax.plot(10 ** u, c0 + c1 * (u - e["center"]) + c2 * (u - e["center"]) ** 2, color=col,
                    lw=1.2, ls="-" if e["used"] else ":")
        if e["used"]:
            ax.scatter([10 ** e["xv"]], [e["lv"]], marker="*", s=90, color=col, edgecolor="k", zorder=4)
    ax.set_xscale("log")
    _tidy_log_axis(ax, "x")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final loss")
    if "n_exponent" in (iso_res or {}):
        ax.set_title(f"{obj.upper()} IsoFLOP profiles")
    else:
        ax.set_title(f"{obj.upper()} IsoFLOP profiles: no frontier (too few bracketed minima)", fontsize=10)
    from matplotlib.lines import Line2D

    colours = ax.legend(title="budget C (FLOPs)", fontsize=7, title_fontsize=8, loc="upper left",
                        bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.add_artist(colours)
    marks = [Line2D([], [], ls="", marker="o", color="0.4", ms=5, label="final loss of one run"),
             Line2D([], [], ls="-", color="0.4", label="parabola in log N\n(budget in the frontier)"),
             Line2D([], [], ls=":", color="0.4", label="parabola, budget left out\n(minimum not bracketed)"),
             Line2D([], [], ls="", marker="*", color="0.4", mec="k", ms=10, label="fitted minimum N_opt(C)")]
    ax.legend(handles=marks, fontsize=7, loc="lower left", bbox_to_anchor=(1.02, 0.0), borderaxespad=0)
    return _save(fig, path, plt)


def plot_frontier(obj: str, iso_res: dict, path: Path) -> Path:
    plt = _plt()
    used = [b for b in iso_res["budgets"] if b["used"]]
    C = np.array([b["budget"] for b in used])
    N = np.array([b["n_opt"] for b in used])
    grid = np.logspace(np.log10(C.min()) - 0.3, np.log10(C.max()) + 1.0, 60)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    nfit = iso_res["n_coefficient"] * grid ** iso_res["n_exponent"]
    lo, hi = _band(iso_res.get("bootstrap_samples") or {}, grid)
    ci = iso_res.get("n_exponent_ci95")
    ax = axes[0]
    if lo is not None:
        ax.fill_between(grid, lo, hi, color="C0", alpha=0.2, label="95% band (bootstrap hull)")
    ax.plot(grid, nfit, color="C0",
            label=f"N_opt ∝ C^{iso_res['n_exponent']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    ax.scatter(C, N, color="k", zorder=3, s=20, label="IsoFLOP minima (bar: 95% run-level)")
    errs = [b.get("n_opt_ci95_run") for b in used]
    for c, n, e in zip(C, N, errs):
        if e:
            ax.plot([c, c], e, color="k", lw=0.8)
    ax.axvline(C.max(), color="0.5", lw=0.8, ls="--", label="largest budget sampled (extrapolation beyond)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("N_opt (parameters)")
    ax.legend(fontsize=7)
    ax = axes[1]
    dfit = grid / (6 * nfit)
    if lo is not None:
        ax.fill_between(grid, grid / (6 * hi), grid / (6 * lo), color="C1", alpha=0.2, label="95% band (bootstrap hull)")
    dci = iso_res.get("d_exponent_ci95")
    ax.plot(grid, dfit, color="C1",
            label=f"D_opt ∝ C^{iso_res['d_exponent']:.3f}" + (f" [{dci[0]:.3f}, {dci[1]:.3f}]" if dci else ""))
    ax.scatter(C, C / (6 * N), color="k", s=20, zorder=3, label="C / (6·N_opt) at the IsoFLOP minima")
    for c, e in zip(C, errs):
        if e:
            ax.plot([c, c], [c / (6 * e[1]), c / (6 * e[0])], color="k", lw=0.8)
    ax.axvline(C.max(), color="0.5", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("D_opt (tokens)")
    ax.legend(fontsize=7)
    fig.suptitle(f"{obj.upper()} compute-optimal frontier")
    return _save(fig, path, plt)


def _loss_band(samples: dict, fn, grid: np.ndarray):
    """Pointwise 95% band of fn(sample row, grid) over the bootstrap samples: hull over the schemes."""
    lo, hi = np.full(grid.size, np.inf), np.full(grid.size, -np.inf)
    for smp in (samples or {}).values():
        s = np.asarray(smp, float)
        if s.ndim != 2 or len(s) < 10:
            continue
        with np.errstate(all="ignore"):
            pred = np.array([fn(row, grid) for row in s])
        pred = pred[np.all(np.isfinite(pred), axis=1)]
        if len(pred) < 10:
            continue
        lo = np.minimum(lo, np.percentile(pred, 2.5, axis=0))
        hi = np.maximum(hi, np.percentile(pred, 97.5, axis=0))
    ok = np.isfinite(lo) & np.isfinite(hi)
    return (lo, hi) if ok.all() else (None, None)


def _optimal_loss(row, grid):
    """Loss of the parametric law at its compute-optimal (N, D) for each C of ``grid``."""
    from .parametric import optimal_n

    E, A, B, al, be = row
    n = optimal_n(A, B, al, be, grid)
    return E + A / n ** al + B / (grid / (6 * n)) ** be


def plot_envelope(obj: str, env: dict, curves, iso_res: dict | None, path: Path, par: dict | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for k, (_, g) in enumerate(curves.groupby("run_id")):
        ax.plot(g["flops"], g["loss"], color="0.78", lw=0.6, label="runs (loss against compute)" if k == 0 else None)
    grid = np.array(env["grid"])
    e = np.array([np.nan if v is None else v for v in env["envelope"]], float)
    ax.plot(grid, e, color="C3", lw=2, label="envelope (lowest loss at C)")
    ci = env.get("b_ci95")
    ax.plot(grid, env["a"] * grid ** env["b"], "k--",
            label=f"L = {env['a']:.3g}·C^{env['b']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
    blo, bhi = _loss_band(env.get("bootstrap_samples"), lambda r, c: np.exp(r[1]) * c ** r[0], grid)
    if blo is not None:
        ax.fill_between(grid, blo, bhi, color="0.3", alpha=0.15, label="95% band of the power law")
    if par and "best" in par and not par.get("degenerate"):
        b = par["best"]
        row = np.array([b["E"], b["A"], b["B"], b["alpha"], b["beta"]], float)
        lstar = _optimal_loss(row, grid)
        if np.all(np.isfinite(lstar)):
            ax.plot(grid, lstar, color="C2", lw=1.4,
                    label="parametric law at its compute-optimal N, D" + (" (unusable)" if par.get("unusable") else ""))
            plo, phi = _loss_band(par.get("bootstrap_samples"), _optimal_loss, grid)
            if plo is not None:
                ax.fill_between(grid, plo, phi, color="C2", alpha=0.15, label="95% band of the parametric law")
    if iso_res and "budgets" in iso_res:
        used = [b for b in iso_res["budgets"] if b["used"] and b.get("loss_opt")]
        ax.scatter([b["budget"] for b in used], [b["loss_opt"] for b in used], color="C0", zorder=3, s=20,
                   label="IsoFLOP minima")
    ax.set_xscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("loss")
    lo = np.nanmin(e) if np.isfinite(e).any() else None
    if lo is not None:
        ax.set_ylim(lo - 0.1, np.nanmax(e) + 0.4)
    _tidy_log_axis(ax, "x")
    ax.set_title(f"{obj.upper()} loss vs compute")
    ax.legend(fontsize=7)
    return _save(fig, path, plt)


def plot_transfer(obj: str, tr: dict, td, curves, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    ax = axes[0]
    by = {rid: g for rid, g in curves.groupby("run_id")}
    for k, p in enumerate(tr.get("pairs", [])):
        col = f"C{k % 10}"
        for rid, ls, lab in ((p["scratch_run_id"], ":", "scratch"), (p["run_id"], "-", "transferred")):
            g = by.get(rid)
            if g is not None:
                ax.plot(g["tokens"], g["loss"], ls=ls, color=col, lw=1,
                        label=f"N={p['n_params']:.3g} {lab}" if k < 6 else None)
    ax.set_xscale("log")
    ax.set_xlabel("tokens of the target objective")
    ax.set_ylabel("loss")
    ax.set_title(f"{obj.upper()}: from scratch (dotted) vs initialised (solid)")
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1]
    pts = td.points
    if len(pts):
        sc = ax.scatter(pts["d_f"], pts["d_t"], c=np.log10(pts["n_params"]), s=10, cmap="viridis")
        fig.colorbar(sc, ax=ax, label="log10 N")
        if "k" in tr:
            b = tr.get("b") or 0.0
            for n in np.unique(pts["n_params"]):
                x = np.logspace(np.log10(pts["d_f"].min()), np.log10(pts["d_f"].max()), 30)
                ax.plot(x, tr["k"] * x ** tr["a"] * n ** b, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("D_F: tokens seen by the initialised run")
    ax.set_ylabel("D_t: effectively transferred tokens")
    if "k" in tr:
        ax.set_title(f"D_t = {tr['k']:.3g}·D_F^{tr['a']:.3f}·N^{(tr.get('b') or 0):.3f}")
    return _save(fig, path, plt)


def make_plots(results: dict, plot_data: dict, out: Path) -> list[Path]:
    out = Path(out)
    paths = []
    for obj, r in results["objectives"].items():
        pdo = plot_data.get(obj, {})
        iso = r.get("isoflop") or {}
        if "n_exponent" in iso and "isoflop" in pdo:
            paths.append(plot_isoflop(obj, iso, pdo["isoflop"], out / f"isoflop_{obj}.png"))
            paths.append(plot_frontier(obj, iso, out / f"frontier_{obj}.png"))
        elif pdo.get("isoflop_profiles"):
            # no frontier, but the per-budget profiles show where the minimum lies relative to the grid
            paths.append(plot_isoflop(obj, iso, SimpleNamespace(profiles=pdo["isoflop_profiles"]),
                                      out / f"isoflop_{obj}.png"))
        env = r.get("envelope") or {}
        if env.get("b") is not None and env.get("a") is not None:
            paths.append(plot_envelope(obj, env, pdo.get("curves"), iso, out / f"loss_vs_compute_{obj}.png",
                                       par=r.get("parametric")))
        tr = r.get("transfer")
        if tr and "transfer" in pdo and tr.get("pairs"):
            paths.append(plot_transfer(obj, tr, pdo["transfer"], pdo.get("all_curves", pdo.get("curves")),
                                       out / f"transfer_{obj}.png"))
    return paths
