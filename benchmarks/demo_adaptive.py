"""The demo's adaptive IsoFLOP placement against its full grid, on real demo trials.

1. Runs the **full grid** of the demo's search space (every candidate size at every budget, with the
   space's other trials) as ``protscale demo`` would, into ``--dir`` (resumable: finished trials are reused,
   so a second run only replays);
2. fits the full grid's N_opt exponent from the tracking store (``isoflop.fit_isoflop``, the bootstrap
   placement uses);
3. **replays the demo's adaptive sweep** on those trials: the space's fixed trials first, then the waves
   ``adaptive.next_wave`` asks for (the same function, seed and stopping rule the live sweep uses), where
   "training" a trial reveals its loss from the store. CPU training is deterministic, so a live
   ``protscale demo`` trains the same trials and stops at the same wave.

It prints each wave, then trials, compute (Σ budget_flops) and the exponent's 95% interval of both, and
the adaptive/full ratios.

    .venv/bin/python benchmarks/demo_adaptive.py                    # full grid into .demo-grid, then replay
    .venv/bin/python benchmarks/demo_adaptive.py --space my_space.py --dir /tmp/grid
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd

from protscale.analysis import isoflop, placement
from protscale.analysis.stats import single_thread_blas
from protscale.model.sizes import get_size
from protscale.sweep import adaptive
from protscale.sweep.demo import DEFAULT_SPACE, prepare_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptive_replay import _fmt  # noqa: E402


def run_full_grid(space_file: str, root: Path):
    """The space with every candidate trial, swept into ``root`` (finished trials reused); its space."""
    from protscale.sweep.cli import _load
    from protscale.sweep.tune import run_sweep
    from protscale.train.trial import connect_ray

    data = prepare_data(root)
    space, _ = _load(space_file, data_override=str(data))
    full = dataclasses.replace(space, trials=list(dict.fromkeys(space.adaptive.grid() + list(space.trials))),
                               adaptive=None)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    print(f"full grid: {len(full.trials)} trials -> {uri}", flush=True)
    connect_ray(None)
    t0 = time.perf_counter()
    statuses = run_sweep(full, uri, str(root / "runs"), resume=True)
    print(f"full grid: {sum(s == 'completed' for s in statuses.values())}/{len(statuses)} completed "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    return space, uri


def fit(points: list[tuple]) -> tuple | None:
    df = pd.DataFrame([{"run_id": f"p{i}", "budget": b, "n_params": n, "loss": v}
                       for i, (b, n, v) in enumerate(points)])
    res = isoflop.fit_isoflop(df, n_boot=placement.N_BOOT, seed=0).result
    return (res["n_exponent"], *res["n_exponent_ci95"]) if res["n_exponent_ci95"] else None


def replay(space, uri: str) -> int:
    a = space.adaptive
    by_n = a.by_n()
    store = adaptive.read_points(uri, space.name, a)
    loss = {(o, b, by_n.get(n)): v for o, pts in store.items() for b, n, v in pts}
    status = 0
    for obj in a.objectives:
        grid = [t for t in a.grid() if t.objective == obj]
        missing = [t.name for t in grid if (obj, t.budget_flops, t.size) not in loss]
        if missing:
            print(f"{obj}: the store lacks {len(missing)} grid trial(s) ({', '.join(missing[:4])}...): "
                  "run the full grid first", file=sys.stderr)
            status = 2
            continue
        full_pts = [(t.budget_flops, float(get_size(t.size).n_params_non_embedding),
                     loss[(obj, t.budget_flops, t.size)]) for t in grid]
        full = fit(full_pts)
        attempted = {t.name for t in space.trials}
        index = 0
        while True:
            pts = {obj: [(t.budget_flops, float(get_size(t.size).n_params_non_embedding),
                          loss[(obj, t.budget_flops, t.size)]) for t in grid if t.name in attempted]}
            wave = next(w for w in adaptive.next_wave(a, pts, attempted) if w.objective == obj)
            print(f"after wave {index}: {adaptive.describe(wave)}", flush=True)
            if not wave.trials:
                break
            attempted |= {t.name for t in wave.trials}
            index += 1
        used = [t for t in grid if t.name in attempted]
        exp = fit([p for t, p in zip(grid, full_pts) if t.name in attempted])
        grid_c, used_c = sum(t.budget_flops for t in grid), sum(t.budget_flops for t in used)
        print()
        print(f"{obj:10s} {'trials':>6s} {'compute (FLOPs)':>16s}  N_opt exponent, 95% interval")
        print(f"{'full grid':10s} {len(grid):6d} {grid_c:16.3e}  {_fmt(full)}")
        print(f"{'adaptive':10s} {len(used):6d} {used_c:16.3e}  {_fmt(exp)}")
        if full and exp:
            print(f"ratio adaptive/full: trials {len(used) / len(grid):.2f}, compute {used_c / grid_c:.2f}; "
                  f"width ratio {(exp[2] - exp[1]) / (full[2] - full[1]):.2f}")
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default=str(DEFAULT_SPACE), help="a search space with an Adaptive (default: the demo's)")
    ap.add_argument("--dir", type=Path, default=Path(".demo-grid"),
                    help="where the full grid's data, store and checkpoints go (default .demo-grid)")
    ap.add_argument("--replay-only", action="store_true", help="do not train: replay on the trials in --dir")
    args = ap.parse_args(argv)
    root = args.dir.resolve()
    if args.replay_only:
        from protscale.sweep.cli import _load

        space, _ = _load(args.space, data_override=str(root / "data"))
        uri = f"sqlite:///{root / 'mlflow.db'}"
    else:
        space, uri = run_full_grid(args.space, root)
    if space.adaptive is None:
        print(f"{args.space}: the search space has no Adaptive", file=sys.stderr)
        return 2
    with single_thread_blas():
        return replay(space, uri)


if __name__ == "__main__":
    sys.exit(main())
