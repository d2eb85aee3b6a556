"""A trial's data path: peak memory and time to the first batch on a 1-shard and an 8-shard dataset,
streaming (what trials do) against the old whole-split loader (the baseline, measured in the same run).

    .venv/bin/python benchmarks/trial_data.py [--steps 20] [--rows 512] [--micro 32] [--objective mlm]
                                              [--cache ~/.cache/protscale/trial-data] [--no-old-8]
                                              [--repeat 3]

Datasets: ``uniprot-go2014-part-00`` (1 shard) and parts 00-07 (8 shards, 187M residues) of
``../shared/data/proteins``, prepared at sequence length 1024 with ``protscale.data.prepare.prepare`` into
the cache directory once and reused. Each measurement runs in a fresh subprocess (peak RSS from
``ru_maxrss``): open the dataset, build the first micro-batch, then ``--steps`` optimizer steps of
``--rows`` rows (the paper's 0.5M tokens) in micro-batches of ``--micro`` rows on one rank.

* streaming: ``SplitReader`` + ``Schedule`` + ``step_micro_batches`` through the ``Prefetcher`` thread.
* old (baseline): the loader trials used before — every shard read into memory, whole-split int64
  segment/position ids, and a permutation of every row regenerated at every step. Kept here only.

Targets: streaming ≤ 0.2 GB resident for the data path and ≤ 2 s to the first batch, growing < 10% from 1
to 8 shards. "above imports" is the peak RSS minus the RSS after importing numpy, pyarrow and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

PROTEINS = Path(__file__).resolve().parents[2] / "shared" / "data" / "proteins"
SEQ_LEN = 1024


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20        # kB on Linux


# --- the old whole-split loader (the baseline; trials no longer use it) ---------------------------------

def _old_load(root: str):
    """What a trial did before streaming: read every shard, ids for every token, lengths per row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((Path(root) / "train").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    tok = table.column("tokens").combine_chunks()
    if pa.types.is_fixed_size_binary(tok.type):                 # format 3
        seq_len = tok.type.byte_width
        tokens = np.frombuffer(tok.buffers()[1], dtype=np.uint8, count=len(tok) * seq_len,
                               offset=tok.offset * seq_len).reshape(-1, seq_len)
    else:
        seq_len = len(tok[0])
        tokens = tok.values.to_numpy(zero_copy_only=False).reshape(-1, seq_len).astype(np.uint8, copy=False)
    seq_lens = [np.asarray(x, dtype=np.int32) for x in table.column("seq_lens").to_pylist()]
    doc = np.empty((len(seq_lens), seq_len), dtype=np.int64)
    pos = np.empty_like(doc)
    for i, lens in enumerate(seq_lens):
        pad = seq_len - int(lens.sum())
        full = np.append(lens, pad) if pad else lens
        doc[i] = np.repeat(np.arange(full.size), full)
        pos[i] = np.arange(seq_len) - np.repeat(np.cumsum(full) - full, full)
    return tokens, seq_lens, doc, pos


def _old_schedule(n: int, seed: int, step: int, global_rows: int):
    import numpy as np

    idx = np.arange((step - 1) * global_rows, step * global_rows)
    out = np.empty(global_rows, dtype=np.int64)
    for epoch in np.unique(idx // n):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = idx // n == epoch
        out[sel] = perm[idx[sel] % n]
    return out


def child(kind: str, data: str, steps: int, rows: int, micro: int, objective: str) -> dict:
    import numpy as np
    import pyarrow.parquet  # noqa: F401
    import torch

    from protscale.data.shards import SplitReader, read_manifest
    from protscale.train.batches import Prefetcher, Schedule, clm_labels, mlm_inputs, step_micro_batches

    rss_imports = _rss_gb()
    accumulation = rows // micro
    start = time.perf_counter()
    if kind == "streaming":
        reader = SplitReader(data, "train", manifest=read_manifest(data))
        schedule = Schedule.for_reader(reader, 0, rows)
        reader.cache_blocks = 2 * schedule.window_blocks + 1
        prefetch = Prefetcher(step_micro_batches(reader, schedule, objective, 0, rows, accumulation, 0, 1, 1, steps),
                              torch.device("cpu"))
        next(prefetch)
        first = time.perf_counter() - start
        for _ in range(steps * accumulation - 1):
            next(prefetch)
        prefetch.close()
        n_rows, blocks_read = reader.n_rows, reader.reads
    else:
        tokens, seq_lens, doc, pos = _old_load(data)
        n_rows, blocks_read = len(tokens), 0
        first = None
        for step in range(1, steps + 1):
            mine = _old_schedule(n_rows, 0, step, rows)
            for m in range(accumulation):
                r = mine[m * micro:(m + 1) * micro]
                t = tokens[r]
                if objective == "clm":
                    batch = {"tokens": t.astype(np.int64), "labels": clm_labels(t, doc[r])}
                else:
                    inputs, labels = mlm_inputs(t, np.random.default_rng([0, step, 0, m]))
                    batch = {"tokens": inputs, "labels": labels}
                batch.update(doc_ids=doc[r], pos_ids=pos[r])
                batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
                if first is None:
                    first = time.perf_counter() - start
    total = time.perf_counter() - start
    return {"rows": n_rows, "first_batch_s": first, "step_ms": 1e3 * (total - first) / max(steps, 1),
            "peak_gb": _rss_gb(), "imports_gb": rss_imports, "blocks_read": blocks_read}


def dataset(cache: Path, shards: int) -> str:
    """Prepared once into the cache (sequence length 1024), reused afterwards."""
    from protscale.data.prepare import prepare

    out = cache / f"go2014-{shards}shard-{SEQ_LEN}"
    if not (out / "manifest.json").exists():
        sources = [str(PROTEINS / f"uniprot-go2014-part-{i:02d}.fasta.gz") for i in range(shards)]
        t = time.perf_counter()
        print(f"preparing {out} from {shards} shard(s) (once) ...", flush=True)
        prepare(sources, out, seq_len=SEQ_LEN, progress=False)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    return str(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=512, help="rows per optimizer step (512 × 1024 = 0.5M tokens)")
    parser.add_argument("--micro", type=int, default=32, help="rows per micro-batch")
    parser.add_argument("--objective", default="mlm", choices=["clm", "mlm"])
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/protscale/trial-data"))
    parser.add_argument("--no-old-8", action="store_true", help="skip the old loader on 8 shards (≈3 GB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each streaming case (medians shown)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps, args.rows, args.micro, args.objective)))
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cache = Path(args.cache)
    data = {n: dataset(cache, n) for n in (1, 8)}
    results = {}
    runs = [("streaming", 1), ("streaming", 8), ("old", 1)] + ([] if args.no_old_8 else [("old", 8)])
    for kind, n in runs:
        cmd = [sys.executable, __file__, "--child", kind, data[n], "--steps", str(args.steps), "--rows",
               str(args.rows), "--micro", str(args.micro), "--objective", args.objective]
        repeats = []
        for _ in range(args.repeat if kind == "streaming" else 1):
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            repeats.append(json.loads(out.stdout.strip().splitlines()[-1]))
        # the median run by time to first batch, and the median peak (both are noisy on a shared machine)
        by_time = sorted(repeats, key=lambda r: r["first_batch_s"])[len(repeats) // 2]
        by_time["peak_gb"] = sorted(r["peak_gb"] for r in repeats)[len(repeats) // 2]
        by_time["imports_gb"] = sorted(r["imports_gb"] for r in repeats)[len(repeats) // 2]
        results[kind, n] = by_time

    print(f"\ntrial data path, {args.objective}, {args.steps} steps of {args.rows} rows × {SEQ_LEN} "
          f"(micro-batches of {args.micro}), one rank, {os.cpu_count()} CPUs")
    print(f"{'loader':12}{'shards':>7}{'train rows':>12}{'first batch s':>15}{'ms/step':>9}{'peak RSS GB':>13}"
          f"{'above imports GB':>18}{'blocks read':>13}")
    for (kind, n), r in results.items():
        print(f"{kind:12}{n:>7}{r['rows']:>12,}{r['first_batch_s']:>15.3f}{r['step_ms']:>9.1f}{r['peak_gb']:>13.3f}"
              f"{r['peak_gb'] - r['imports_gb']:>18.3f}{r['blocks_read']:>13}")
    s1, s8 = results["streaming", 1], results["streaming", 8]
    grow = lambda k: s8[k] / s1[k]  # noqa: E731
    above = lambda r: r["peak_gb"] - r["imports_gb"]  # noqa: E731
    print(f"\nstreaming, 8 shards / 1 shard: first batch ×{grow('first_batch_s'):.2f}, peak RSS ×{grow('peak_gb'):.2f}, "
          f"above imports ×{above(s8) / max(above(s1), 1e-9):.2f}  (target: < 1.10)")
    for n in (1, 8):
        if ("old", n) in results:
            o, s = results["old", n], results["streaming", n]
            print(f"{n} shard(s), old / streaming: first batch ×{o['first_batch_s'] / s['first_batch_s']:.1f}, "
                  f"peak RSS ×{o['peak_gb'] / s['peak_gb']:.1f}, above imports ×{above(o) / max(above(s), 1e-9):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
