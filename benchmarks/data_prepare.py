"""Throughput of ``protscale data prepare`` on one full shard of the shared corpus, against a naive baseline.

    .venv/bin/python benchmarks/data_prepare.py [FASTA.gz] [--seq-len 1024] [--profile]

Pipeline: the real ``prepare()`` (read + validate + de-duplicate + split + tokenise + pack + write Parquet)
into a temporary directory. Baseline, measured in the same process on the same file: a naive reader that
does only a subset of that work — gzip text lines, then pure-Python per-character validation and
tokenisation into a list of ids (no de-duplication, no packing, no writing). The figure for both is input
residues per second of wall time; imports (pyarrow, pandas) are warmed up first so they are not counted.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import pstats
import sys
import tempfile
import time
from pathlib import Path

SHARD = "/work/shared/data/proteins/uniprot-go2014-part-00.fasta.gz"


def naive(path: str) -> tuple[int, int]:
    """Per-character validation + tokenisation in pure Python; returns (records, residues)."""
    from protscale.data.tokenizer import CLS, EOS, TOKEN_ID, VALID_RESIDUES

    records = residues = 0
    ids: list[int] = []
    seq: list[str] = []

    def flush() -> None:
        nonlocal records, residues
        if seq:
            s = "".join(seq)
            toks = [CLS]
            for ch in s:
                c = ch.upper()
                if c not in VALID_RESIDUES:
                    raise ValueError(f"invalid residue {ch!r}")
                toks.append(TOKEN_ID[c])
            toks.append(EOS)
            ids.extend(toks)
            records += 1
            residues += len(s)
            seq.clear()

    with gzip.open(path, "rt") as f:
        for line in f:
            if line.startswith(">"):
                flush()
            else:
                seq.append(line.strip())
        flush()
    return records, residues


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fasta", nargs="?", default=SHARD)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the pipeline run")
    args = ap.parse_args()

    from protscale.data.bundled import OOD
    from protscale.data.prepare import prepare

    with tempfile.TemporaryDirectory(prefix="protscale-bench-") as tmp:
        prepare([OOD], Path(tmp) / "warm", progress=False)  # warm imports (pyarrow.parquet pulls pandas)
        prof = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        m = prepare([args.fasta], Path(tmp) / "out", seq_len=args.seq_len, progress=True)
        if prof:
            prof.disable()
        t_pipe = time.perf_counter() - t0
    res_in = m["sources"][0]["residues"]
    t0 = time.perf_counter()
    n_rec, n_res = naive(args.fasta)
    t_naive = time.perf_counter() - t0
    assert n_res == res_in, (n_res, res_in)

    rp, rn = res_in / t_pipe, n_res / t_naive
    print(f"input: {args.fasta}: {m['sources'][0]['records']:,} records, {res_in:,} residues, "
          f"{m['sources'][0]['duplicates_dropped']:,} duplicates")
    print(f"pipeline (prepare: validate+dedup+split+tokenise+pack+write, seq_len {args.seq_len}): "
          f"{t_pipe:.2f} s, {rp / 1e6:.2f}M residues/s; rows {m['totals']['rows']:,}")
    print("pipeline stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in m["_run"]["stages_s"].items()))
    print(f"naive baseline (pure-Python per-character validate+tokenise only): {t_naive:.2f} s, "
          f"{rn / 1e6:.2f}M residues/s")
    print(f"ratio pipeline/naive: {rp / rn:.1f}x")
    st = m["_run"]["stages_s"]
    t_same = st["read"] + st["tokenise_pack"]  # the part of the pipeline that does the baseline's work
    print(f"like for like (pipeline read+validate+dedup+tokenise+pack only, {t_same:.2f} s): "
          f"{res_in / t_same / 1e6:.2f}M residues/s, {res_in / t_same / rn:.1f}x the naive baseline")
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
