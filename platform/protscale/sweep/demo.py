"""``protscale demo``: the main job. Prepare the bundled proteins, run the demo sweep (adaptive IsoFLOP
waves and a CLM→MLM transfer pair, ``search_spaces/demo_cpu.py``), fit the scaling laws from the tracking
store, and say what was found and how long each part took."""

from __future__ import annotations

import time
from pathlib import Path

DEFAULT_SPACE = Path(__file__).resolve().parents[3] / "search_spaces" / "demo_cpu.py"
BOOTSTRAP = 400              # IsoFLOP / transfer replicates: seconds on 2 cores
BOOTSTRAP_PARAMETRIC = 40    # parametric refits (each an L-BFGS fit from the coarse grid)


def add_command(sub) -> None:
    import argparse

    d = sub.add_parser("demo", help="the main job: prepare the bundled proteins, run the demo sweep, fit the laws",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--dir", default=".demo", help="where the data, MLflow store, checkpoints and report go")
    d.add_argument("--space", default=None, help=f"search-space file (default: {DEFAULT_SPACE.name})")
    d.add_argument("--verbose", action="store_true",
                   help="show Ray's output (Tune's tables, trial and worker logs) here instead of in "
                   "<dir>/runs/<sweep>/sweep.log")
    d.set_defaults(func=run_demo)


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def prepare_data(root: Path) -> Path:
    """The bundled proteins (``DEMO_SOURCES``: ~9,000 sequences, ~3.0M training tokens) as rows of 128
    tokens with IID validation and an OOD test split (once)."""
    from ..data import OOD
    from ..data.bundled import DEMO_SOURCES
    from ..data.prepare import prepare

    data = root / "data"
    if not (data / "manifest.json").is_file():
        say(f"preparing the bundled proteins -> {data}")
        prepare(list(DEMO_SOURCES), data, ood=OOD, seq_len=128, val_fraction=0.05, progress=False)
    return data


def adaptive_usage(space, statuses: dict[str, str]) -> dict | None:
    """Trials and compute (Σ budget_flops) the adaptive waves trained, against the full grid of the same
    candidate sizes, per objective. None for a fixed grid."""
    if space.adaptive is None:
        return None
    out = {}
    for obj in space.adaptive.objectives:
        grid = [t for t in space.adaptive.grid() if t.objective == obj]
        used = [t for t in grid if statuses.get(t.name) == "completed"]
        out[obj] = {"trials": len(used), "grid_trials": len(grid),
                    "compute": sum(t.budget_flops for t in used), "grid_compute": sum(t.budget_flops for t in grid)}
    return out


def fit(uri: str, experiment: str, out: Path) -> dict:
    """The analysis of ``protscale fit`` (library call), with the demo's bootstrap sizes."""
    from ..analysis.pipeline import Config
    from ..analysis.run import run_fit

    cfg = Config(n_boot=BOOTSTRAP, n_boot_parametric=BOOTSTRAP_PARAMETRIC, parametric_grid="coarse")
    return run_fit(uri, [experiment], out, cfg)


def summary_lines(results: dict) -> list[str]:
    """One line per objective: its N_opt exponent with the 95% interval, or why there is none."""
    lines = []
    for obj, o in results["objectives"].items():
        iso = o.get("isoflop") or {}
        if iso.get("n_exponent") is not None:
            lo, hi = iso.get("n_exponent_ci95") or (float("nan"), float("nan"))
            used = sum(1 for b in iso.get("budgets", []) if b.get("used"))
            lines.append(f"{obj}: N_opt ∝ C^{iso['n_exponent']:.3f} (95% [{lo:.3f}, {hi:.3f}]) from {used} "
                         "budget(s) with a bracketed minimum")
        else:
            lines.append(f"{obj}: no IsoFLOP frontier ({iso.get('reason', 'not fitted')})")
        tr = o.get("transfer") or {}
        if tr.get("k") is not None:
            b = tr["b"] if tr.get("b") is not None else float("nan")
            lines.append(f"{obj}: transfer law D_t = {tr['k']:.3g}·D_F^{tr['a']:.3f}·N^{b:.3f}")
        for p in tr.get("pairs") or []:
            if p.get("d_t_final") is not None:
                lines.append(f"{obj}: transfer pair at N = {p['n_params']:,.0f}: the {p['init_objective']} start is "
                             f"worth {p['d_t_final']:,.0f} tokens of scratch training at the end of its "
                             f"{p['d_f_final']:,.0f} tokens")
    return lines


def transfer_lines(space, uri: str) -> list[str]:
    """Each transfer trial's final val_loss against its scratch baseline (same size, budget, seed)."""
    from ..tracking import contract as c
    from ..tracking import runs
    from .space import Trial

    cl = runs.client(uri)
    exp = cl.get_experiment_by_name(space.name)

    def final(name: str):
        found = cl.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                               filter_string=f"tags.{c.TRIAL} = '{name}' and tags.{c.STATUS} = '{c.STATUS_COMPLETED}'")
        return found[0].data.metrics.get(c.VAL_LOSS) if found else None

    lines = []
    for t in (t for t in space.trials if t.parent) if exp is not None else ():
        base = Trial(t.objective, t.size, t.budget_flops, t.seed, batch_tokens=t.batch_tokens, lr_max=t.lr_max)
        lt, ls = final(t.name), final(base.name)
        if lt is not None and ls is not None:
            lines.append(f"transfer {t.name}: val_loss {lt:.4f} vs {ls:.4f} from scratch ({lt - ls:+.4f} nats)")
    return lines


def run_demo(args) -> int:
    from ..errors import UserError
    from ..train.trial import connect_ray
    from .cli import _load
    from .tune import run_sweep

    from .space import load

    start = time.perf_counter()
    space_file = args.space or str(DEFAULT_SPACE)
    load(space_file)           # a broken search-space file fails here, before anything is written
    root = Path(args.dir).resolve()
    data = prepare_data(root)
    space, _ = _load(space_file, data_override=str(data))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    if space.adaptive is not None:
        a = space.adaptive
        say(f"sweep {space.name}: {len(space.trials)} fixed trial(s), then adaptive IsoFLOP waves for "
            f"{'/'.join(a.objectives)} ({len(a.budgets)} budgets, {len(a.grid()) // max(1, len(a.objectives))} "
            f"candidate trials per objective, at most {a.limit()} trained; stops when the N_opt exponent's "
            f"95% interval is <= {a.target_width:g} wide) -> {uri}")
    else:
        say(f"sweep {space.name}: {len(space.trials)} trials (Ray Tune + Ray Train/DeepSpeed) -> {uri}")
    connect_ray(None)
    t_sweep = time.perf_counter()
    statuses = run_sweep(space, uri, str(root / "runs"), resume=True, verbose=getattr(args, "verbose", False))
    sweep_s = time.perf_counter() - t_sweep
    done = sum(s == "completed" for s in statuses.values())
    say(f"sweep: {done}/{len(statuses)} trials completed in {sweep_s:.0f} s")
    for obj, u in (adaptive_usage(space, statuses) or {}).items():
        say(f"adaptive {obj}: {u['trials']}/{u['grid_trials']} trials of the full grid, "
            f"{u['compute'] / u['grid_compute']:.0%} of its compute "
            f"({u['compute']:.3g} of {u['grid_compute']:.3g} FLOPs)")
    for line in transfer_lines(space, uri):
        say(line)
    report = root / "report"
    say(f"fitting scaling laws from the tracking store -> {report}")
    t_fit = time.perf_counter()
    try:
        res = fit(uri, space.name, report)
    except UserError as exc:
        say(f"fit: nothing could be fitted: {exc}")
        res = None
    fit_s = time.perf_counter() - t_fit
    if res is not None:
        for line in summary_lines(res["results"]):
            say(line)
        say(f"report: {report / 'report.html'} (also report.md, results.json, *.png)")
        say(f"plan a budget: protscale plan --budget-flops 1e10 --objective mlm --results {report / 'results.json'}")
    total = time.perf_counter() - start
    from ..tracking.provenance import experiment_hint

    say(f"done in {total:.0f} s: set-up {t_sweep - start:.0f} s, sweep {sweep_s:.0f} s, fit {fit_s:.0f} s. "
        f"{experiment_hint(uri, space.name)}")
    return 0 if done == len(statuses) and res is not None else 1
