"""``protscale data prepare`` on the shared corpus: the Ray Data pipeline against the single-process
implementation it replaced, at 1 shard and at the full corpus.

    .venv/bin/python benchmarks/data_prepare.py [--sizes 1,all] [--seq-len 1024] [--no-baseline]
    .venv/bin/python benchmarks/data_prepare.py --sizes 1,2,all,2x --no-baseline   # memory per process

Each run is a fresh child process (``--child``) that prepares into a temporary directory; this process
samples, every 0.2 s with psutil, the resident memory of the child (the driver) and of the child plus
all its descendants (the local Ray it starts: GCS, raylet, workers; shared object-store pages count once
per process that maps them, so the tree figure is an upper bound). Printed per run: wall time of
``prepare()`` (Ray already started and warmed by a tiny prepare; Ray start-up printed separately), input
residues/s, CPU seconds (user + system of every process in the tree, from the start to the end of the
measured run; the less load-sensitive figure on a shared machine) per million residues and the rate they
imply on all cores, and peak RSS of the driver and of the tree, plus the tree's PSS (shared pages counted
once: the honest total) and, at its peak, by process kind (Ray's daemons and agents, Ray Data's actors,
workers, driver), with the pages of Ray's object store (plasma's shared memory, which every worker maps:
the shuffle's data in flight) counted apart, once, rather than as the memory of whichever worker touched
them. The largest single process (the driver or a worker, its own pages, named) is the figure a node's
memory per worker rests on; a last line checks the targets of issue 10 against it (a worker's first few
tasks grow it to a plateau whatever the corpus, so a 1-shard run, whose workers run 1-3 tasks each, may
read a few tens of MB lower). Baseline: ``platform/protscale/data/prepare.py`` at
git ``HEAD~N`` that still holds the whole corpus in one process (``--baseline-rev``), loaded from git
into a temporary module, same inputs, same machine, same run.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("PROTSCALE_CORPUS", REPO.parent / "shared" / "data" / "proteins"))
BASELINE_REV = "9901735"  # the last commit with the single-process prepare.py


def corpus(size: str) -> list[str]:
    shards = sorted(str(p) for p in CORPUS.glob("uniprot-go2014-part-*.fasta.gz"))
    if size == "all":  # sample-2k repeats sequences of the shards: weight 0, it only feeds de-duplication
        return shards + [f"{CORPUS / 'sample-2k.fasta'}:0"]
    if size == "2x":  # twice the records: copies of the shards at weight 0, read, shuffled and de-duplicated away
        copies = Path(tempfile.mkdtemp(prefix="protscale-bench-2x-"))
        atexit.register(shutil.rmtree, copies, True)
        for s in shards:
            shutil.copyfile(s, copies / Path(s).name)
        return shards + [f"{copies / Path(s).name}:0" for s in shards]
    return shards[:int(size)]


def load_baseline(rev: str):
    """The single-process ``prepare`` of git ``rev``, as module ``protscale.data._baseline_prepare``."""
    src = subprocess.run(["git", "show", f"{rev}:platform/protscale/data/prepare.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="protscale-baseline-")) / "_baseline_prepare.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("protscale.data._baseline_prepare", tmp)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def child(args) -> None:
    """One measured run (in its own process); prints one RESULT line of JSON."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    files = json.loads(args.child)
    from protscale.data.bundled import OOD

    with tempfile.TemporaryDirectory(prefix="protscale-bench-") as tmp:
        t_ray = 0.0
        if args.impl == "baseline":
            prepare = load_baseline(args.baseline_rev).prepare
        else:
            import ray

            from protscale.data.prepare import prepare

            t0 = time.perf_counter()
            for attempt in range(6):  # a loaded 2-core machine can miss Ray's 30 s raylet start-up limit
                try:
                    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                             logging_level="WARNING", object_store_memory=args.object_store_mb * 2**20 or None)
                    break
                except Exception:
                    ray.shutdown()
                    if attempt == 5:
                        raise
            prepare([OOD], Path(tmp) / "warm", progress=False)  # start the workers, warm their imports
            t_ray = time.perf_counter() - t0
        print("MARK start", flush=True)
        t0 = time.perf_counter()
        m = prepare(files, Path(tmp) / "out", seq_len=args.seq_len, progress=False)
        wall = time.perf_counter() - t0
        print("MARK end", flush=True)
        time.sleep(1.0)  # the parent reads every process's CPU time now
    residues = sum(s["residues"] for s in m["sources"])
    print("RESULT " + json.dumps({"wall_s": wall, "ray_start_s": t_ray, "residues": residues,
                                  "rows": m["totals"]["rows"], "hash": m["hash"],
                                  "stages_s": m["_run"]["stages_s"]}), flush=True)


def _tree(root) -> list:
    import psutil

    try:
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return [root]


def _kind(p) -> str:
    """What a process of the tree is, for the PSS breakdown: Ray's daemons by name, workers as one kind."""
    name = p.name()
    if name in ("ray::_StatsActor", "ray::_AutoscalingCoordinatorActor"):
        return "Ray Data's actors"
    if name in ("ray::DashboardAgent", "ray::RuntimeEnvAgent"):
        return "Ray agents"
    if name.startswith("ray::"):
        return "ray workers"
    cmd = " ".join(p.cmdline()[:3])
    for k in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
        if k in name or k in cmd:
            return k
    return "ray workers" if "default_worker" in cmd else name


OBJECT_STORE = "object store pages"


def _store_pss(p) -> int:
    """The PSS of ``p``'s mapping of Ray's object store (plasma's shared-memory file): pages of objects the
    process wrote or read. Summed over the tree, every resident page of the store counts once; a worker
    keeps its pages mapped after the objects are freed (plasma reuses them), so without this split they
    read as the worker's own memory."""
    return sum(m.pss for m in p.memory_maps(grouped=True) if "plasma" in m.path)


def measure(impl: str, files: list[str], args) -> dict:
    """Run one child; sample its process tree every 0.2 s between its MARK start and MARK end lines."""
    import psutil

    cmd = [sys.executable, __file__, "--child", json.dumps(files), "--impl", impl, "--seq-len",
           str(args.seq_len), "--baseline-rev", args.baseline_rev, "--object-store-mb", str(args.object_store_mb)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    root = psutil.Process(proc.pid)
    peak = {"driver": 0, "tree": 0, "tree_pss": 0, "by_kind": {}}
    cpu0: dict[int, float] = {}  # user+sys per process when the measured run started
    cpu: dict[int, float] = {}  # ... at the latest sample
    started, done, lock = threading.Event(), threading.Event(), threading.Lock()

    def snapshot(into: dict[int, float] | None = None) -> None:
        rss, pss, store, kinds, names = {}, {}, {}, {}, {}
        for p in _tree(root):
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    (into if into is not None else cpu)[p.pid] = t.user + t.system
                    if into is None:
                        mem = p.memory_full_info()
                        rss[p.pid], pss[p.pid] = mem.rss, mem.pss
                        store[p.pid] = _store_pss(p)
                        kinds[p.pid] = "driver" if p.pid == root.pid else _kind(p)
                        names[p.pid] = "driver" if p.pid == root.pid else p.name()
            except psutil.Error:
                pass
        if into is None:
            peak["driver"] = max(peak["driver"], rss.get(root.pid, 0))
            peak["tree"] = max(peak["tree"], sum(rss.values()))
            for pid, k in kinds.items():
                if k in ("driver", "ray workers") and pss[pid] - store[pid] > peak.get("process_own", 0):
                    peak["process_own"], peak["process_name"] = pss[pid] - store[pid], names.get(pid, k)
            if sum(pss.values()) > peak["tree_pss"]:
                peak["tree_pss"] = sum(pss.values())
                by_kind: dict[str, float] = {OBJECT_STORE: sum(store.values())}
                n_workers = sum(k == "ray workers" for k in kinds.values())
                for pid, k in kinds.items():
                    k = f"{n_workers} ray workers" if k == "ray workers" else k
                    by_kind[k] = by_kind.get(k, 0) + pss[pid] - store[pid]
                peak["by_kind"] = by_kind

    def sample() -> None:
        while not done.is_set():
            if started.is_set():
                with lock:
                    if started.is_set():
                        snapshot()
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    result = None
    for line in proc.stdout:
        if line.startswith("MARK start"):
            snapshot(cpu0)
            started.set()
        elif line.startswith("MARK end"):
            with lock:
                snapshot()  # the last CPU figures, while every process still lives
                started.clear()
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    proc.wait()
    done.set()
    t.join()
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"{impl} run failed (exit {proc.returncode})")
    result["peak_driver_gb"] = peak["driver"] / 1e9
    result["peak_tree_gb"] = peak["tree"] / 1e9
    result["peak_tree_pss_gb"] = peak["tree_pss"] / 1e9
    result["peak_process_own_gb"] = peak.get("process_own", 0) / 1e9
    result["peak_process_name"] = peak.get("process_name", "")
    result["pss_by_kind_mb"] = {k: round(v / 1e6) for k, v in sorted(peak["by_kind"].items(), key=lambda kv: -kv[1])}
    result["cpu_s"] = sum(c - cpu0.get(pid, 0.0) for pid, c in cpu.items())
    return result


def _work_mb(r: dict) -> float:
    """PSS (MB) at the tree's peak of the processes that do the preparation: the driver and Ray's workers
    (Ray's daemons, agents and Ray Data's actors are a fixed cost of a Ray node, whatever the data)."""
    return sum(v for k, v in r["pss_by_kind_mb"].items() if k == "driver" or k.endswith("ray workers"))


def _ray_mb(r: dict) -> float:
    """PSS (MB) at the tree's peak of Ray's own processes (daemons, agents, Ray Data's actors)."""
    return sum(r["pss_by_kind_mb"].values()) - _work_mb(r) - r["pss_by_kind_mb"].get(OBJECT_STORE, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,all", help="comma-separated: a number of shards (weight 1 each), "
                    "'all' (the 8 shards plus sample-2k.fasta at weight 0) or '2x' (the 8 shards plus a copy of "
                    "each at weight 0: twice the records to read and shuffle)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--object-store-mb", type=int, default=0,
                    help="cap Ray's object store (MiB; it spills to disk beyond); default: Ray's (30%% of RAM)")
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--impl", default="ray", choices=("ray", "baseline"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0

    n_shards = len(list(CORPUS.glob("uniprot-go2014-part-*.fasta.gz")))
    if not n_shards:
        ap.error(f"no uniprot-go2014-part-*.fasta.gz under {CORPUS}; set PROTSCALE_CORPUS to the shared proteins")
    for size in args.sizes.split(","):
        if size not in ("all", "2x") and not (size.isdigit() and 1 <= int(size) <= n_shards):
            ap.error(f"--sizes: {size!r} is not a number of shards (1 to {n_shards}), 'all' or '2x'")
    print(f"machine: {os.cpu_count()} CPUs; corpus {CORPUS}")
    rows = []
    for size in args.sizes.split(","):
        files = corpus(size)
        for impl in (["ray"] if args.no_baseline else ["ray", "baseline"]):
            r = measure(impl, files, args)
            rows.append((size, impl, r))
            cpu_per_m = r["cpu_s"] / (r["residues"] / 1e6)
            print(f"{impl:8s} {size:>3s} shard(s): {len(files)} files, {r['residues'] / 1e6:.1f}M residues: "
                  f"{r['wall_s']:.1f} s, {r['residues'] / r['wall_s'] / 1e6:.2f}M residues/s; CPU {r['cpu_s']:.1f} s "
                  f"= {cpu_per_m:.3f} CPU-s per M residues, {os.cpu_count() / cpu_per_m:.1f}M residues/s on "
                  f"{os.cpu_count()} fully used cores; peak RSS driver {r['peak_driver_gb']:.2f} GB, process tree "
                  f"{r['peak_tree_gb']:.2f} GB (PSS {r['peak_tree_pss_gb']:.2f} GB); largest process (driver or a "
                  f"worker, its own pages) {r['peak_process_own_gb']:.2f} GB ({r['peak_process_name']})"
                  + "; PSS at its peak (MB): " + ", ".join(f"{k} {v}" for k, v in r["pss_by_kind_mb"].items())
                  + (f" = work (driver + Ray workers, their own pages) {_work_mb(r) / 1e3:.2f} GB + {OBJECT_STORE} "
                     f"{r['pss_by_kind_mb'].get(OBJECT_STORE, 0) / 1e3:.2f} GB + Ray's own processes "
                     f"{_ray_mb(r) / 1e3:.2f} GB" if impl == "ray" else "")
                  + f"; dataset hash {r['hash'][:12]}"
                  + (f"; Ray start + warm-up {r['ray_start_s']:.1f} s; stages (s) "
                     + ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items()) if impl == "ray" else ""),
                  flush=True)
    by = {(s, i): r for s, i, r in rows}
    for size in args.sizes.split(","):
        if (size, "baseline") in by:
            a, b = by[(size, "ray")], by[(size, "baseline")]
            print(f"ratio ray/baseline at {size}: speed {b['wall_s'] / a['wall_s']:.2f}x, "
                  f"CPU per residue {a['cpu_s'] / a['residues'] / (b['cpu_s'] / b['residues']):.2f}x, "
                  f"driver RSS {a['peak_driver_gb'] / max(b['peak_driver_gb'], 1e-9):.2f}x, "
                  f"tree RSS {a['peak_tree_gb'] / max(b['peak_tree_gb'], 1e-9):.2f}x")
    sizes = args.sizes.split(",")
    if len(sizes) >= 2:
        a, b = by[(sizes[0], "ray")], by[(sizes[-1], "ray")]
        store_a, store_b = (x["pss_by_kind_mb"].get(OBJECT_STORE, 0) for x in (a, b))
        print(f"PSS at the peak {sizes[0]} -> {sizes[-1]}: work processes' own pages (driver + Ray workers) "
              f"{_work_mb(a) / 1e3:.2f} -> {_work_mb(b) / 1e3:.2f} GB (x{_work_mb(b) / _work_mb(a):.2f}); {OBJECT_STORE} "
              f"(the shuffle's data in flight, bounded by the store's size, spilled beyond) {store_a / 1e3:.2f} -> "
              f"{store_b / 1e3:.2f} GB; Ray's own processes {_ray_mb(a) / 1e3:.2f} -> {_ray_mb(b) / 1e3:.2f} GB")
        ratio = b["peak_process_own_gb"] / max(a["peak_process_own_gb"], 1e-9)
        print(f"targets: >=10M residues/s at {sizes[-1]}: {b['residues'] / b['wall_s'] / 1e6:.2f}M; peak memory of "
              f"a process (the driver or a worker) <=1 GB and flat (<10%) {sizes[0]} -> {sizes[-1]}: "
              f"{a['peak_process_own_gb']:.2f} -> {b['peak_process_own_gb']:.2f} GB (x{ratio:.2f}); the tree is "
              f"Ray's own processes (a fixed cost per node) + the object store (bounded by its size, spilled "
              f"beyond) + the driver and workers (up to ~2 per CPU here, each bounded as above)")
        print(f"ray scaling {sizes[0]} -> {sizes[-1]}: residues x{b['residues'] / a['residues']:.1f}, "
              f"time x{b['wall_s'] / a['wall_s']:.2f}, CPU x{b['cpu_s'] / a['cpu_s']:.2f}, driver RSS x{b['peak_driver_gb'] / a['peak_driver_gb']:.2f}, "
              f"tree RSS x{b['peak_tree_gb'] / a['peak_tree_gb']:.2f}, tree PSS x{b['peak_tree_pss_gb'] / a['peak_tree_pss_gb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
