"""Bulk read of an MLflow store vs the per-run ``MlflowClient.get_metric_history`` loop.

Creates RUNS runs × POINTS points of ``val_loss`` (``--all-keys``: also ``tokens`` and ``flops``) in a SQLite
store in a temporary directory (``log_batch``, 1,000 metrics per call), then times in this process

* ``protscale.tracking.reader.read_experiments`` (runs, params, tags and every history, into Arrow), and
* the loop a user would otherwise write: ``search_runs`` then ``get_metric_history(run, key)`` per run and key,

and prints both times and their ratio. ``--http`` also starts ``mlflow server`` on the same store and
times both over HTTP. ``--store DIR`` keeps (and on a later call reuses) the store instead of a temp dir.

    .venv/bin/python benchmarks/bulk_read.py                 # 300 runs x 1,000 points
    .venv/bin/python benchmarks/bulk_read.py --http --all-keys
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

EXPERIMENT = "bench-bulk-read"


def create(uri: str, runs: int, points: int, keys: list[str]) -> float:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(tracking_uri=uri)
    if cl.get_experiment_by_name(EXPERIMENT) is not None:
        return 0.0
    t = time.perf_counter()
    exp = cl.create_experiment(EXPERIMENT)
    for r in range(runs):
        run = cl.create_run(exp, run_name=f"trial-{r:04d}", tags={"kind": "trial", "sweep": EXPERIMENT})
        n = 1e6 * (1 + r % 30)
        ms = []
        for s in range(1, points + 1):
            tokens = 1e6 * s
            vals = {"val_loss": 2.0 + 10.0 / s ** 0.3 + r * 1e-4, "tokens": tokens, "flops": 6 * n * tokens}
            ms.extend(Metric(k, vals[k], 1_700_000_000_000 + 1000 * s, s) for k in keys)
        params = [Param("objective", "clm"), Param("n_params", str(int(n))), Param("budget_flops", "1e18")]
        for i in range(0, len(ms), 1000):
            cl.log_batch(run.info.run_id, metrics=ms[i:i + 1000], params=params if i == 0 else [])
        cl.set_terminated(run.info.run_id)
        if (r + 1) % 50 == 0:
            print(f"  created {r + 1}/{runs} runs ({time.perf_counter() - t:.0f} s)", flush=True)
    return time.perf_counter() - t


def per_run_loop(uri: str) -> tuple[float, int, int]:
    from mlflow.tracking import MlflowClient

    t = time.perf_counter()
    cl = MlflowClient(tracking_uri=uri)
    exp = cl.get_experiment_by_name(EXPERIMENT)
    runs, token, calls = [], None, 1
    while True:
        page = cl.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        calls += 1
        runs.extend(page)
        token = page.token
        if not token:
            break
    points = 0
    for run in runs:
        for key in run.data.metrics:
            points += len(cl.get_metric_history(run.info.run_id, key))
            calls += 1
    return time.perf_counter() - t, points, calls


def bulk(uri: str) -> tuple[float, int, int]:
    from protscale.tracking.reader import read_experiments

    t = time.perf_counter()
    tables = read_experiments(uri, [EXPERIMENT])
    return time.perf_counter() - t, tables.metrics.num_rows, tables.round_trips


def compare(label: str, uri: str, repeats: int) -> None:
    b = min((bulk(uri) for _ in range(repeats)), key=lambda x: x[0])
    p = min((per_run_loop(uri) for _ in range(repeats)), key=lambda x: x[0])
    if b[1] != p[1]:
        raise SystemExit(f"{label}: point counts differ: bulk {b[1]} vs loop {p[1]}")
    print(f"{label}: read_experiments {b[0]:.2f} s ({b[2]} round trips) | per-run get_metric_history loop "
          f"{p[0]:.2f} s ({p[2]} calls) | {p[1]:,} points | ratio {p[0] / b[0]:.1f}x", flush=True)


def start_server(db: Path, work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                             f"sqlite:///{db}", "--default-artifact-root", str(work / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    os.killpg(proc.pid, 9)
    raise SystemExit("mlflow server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--all-keys", action="store_true", help="log tokens and flops too (3x the points)")
    ap.add_argument("--http", action="store_true", help="also time both through a local mlflow server")
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings")
    ap.add_argument("--store", type=Path, help="keep the store in this directory (reused when present)")
    args = ap.parse_args()

    keys = ["val_loss", "tokens", "flops"] if args.all_keys else ["val_loss"]
    tmp = None
    if args.store:
        work = args.store.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bulk_read_")
        work = Path(tmp.name)
    db = work / "mlflow.db"
    uri = f"sqlite:///{db}"
    print(f"store {uri}: {args.runs} runs x {args.points} points x {len(keys)} key(s)", flush=True)
    took = create(uri, args.runs, args.points, keys)
    print(f"created in {took:.0f} s" if took else "reusing the existing store", flush=True)
    compare("sqlite", uri, args.repeats)
    if args.http:
        proc, url = start_server(db, work)
        try:
            compare("http  ", url, args.repeats)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
