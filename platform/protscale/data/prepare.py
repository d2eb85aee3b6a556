"""``protscale data prepare``: FASTA(.gz) sources -> validated, de-duplicated, mixed, split, tokenised,
packed Parquet shards plus ``manifest.json`` (see ``shards.py`` for the format), as a Ray Data pipeline.

Nothing holds the corpus in one process; every stage works on a bounded piece of it:

1. **Read** (one Ray Data task per file, streaming ~4 MiB blocks of records): parse and validate a whole
   block with array operations (``fasta.read_fasta_blocks``: the first invalid record stops the run with
   its ``FILE:LINE``, or is skipped and counted), hash each sequence (64-bit BLAKE2b) and give it a
   bucket: ``hash % n_buckets``. A block becomes an Arrow table on its own buffers (no per-row objects).
2. **De-duplicate** by hash partitioning: Ray Data's hash shuffle (``repartition(keys=["bucket"])``,
   ``ShuffleStrategy.SHUFFLE_V2``) brings every copy of a sequence to the same partition, whose task
   keeps the first occurrence (sources in the order given, then the ``--ood`` file), one bucket at a
   time: rows sorted by hash, the sequences themselves compared where hashes tie. It writes each bucket's
   unique rows to one intermediate Parquet file. Partitions are sized from the input
   (``_shuffle_sizes``: ~8 MiB of records each up to 2,048 partitions), so memory per task is bounded
   whatever the corpus size; the shuffle's compressed pieces wait in Ray's object store, which spills
   them to disk when it is full. Every task ends by handing the memory it freed back to the system
   (``_hand_back_memory``), so a long-lived worker stays at its largest task's working set.
3. **OOD test split**: the ``--ood`` file's unique sequences not found in any source; or with
   ``--ood-clusters``, whole ``mmseqs easy-cluster`` clusters holding that fraction of the residues
   (mmseqs reads one FASTA streamed from the buckets); else none.
4. **Mix and split**, decided in each bucket from the sequence hashes alone (deterministic given ``seed``;
   the driver only hands out per-source fractions): each source uses ``target / available`` of its
   residues, taken in hash order (the scarcest source relative to its weight is used in full, so
   nothing repeats), and that fraction of the used sequences that gives ``val_fraction`` (at least
   ``val_min``) goes to IID validation. Per bucket this is exact to one sequence.
5. **Tokenise and pack** each bucket's splits (``packing.py``: one table lookup over the split's residue
   bytes, rows cut by array offsets) into ``<split>/part-<bucket>.parquet``.

Outputs go to a local path or a URI (``s3://``, ``gs://``; see ``storage.py``). A local dataset is built
in a temporary sibling directory and renamed into place; a remote one is written under its prefix with the
intermediate files in a temporary prefix. Either way ``manifest.json`` is written last, and readers refuse
a directory without it, so a failed or interrupted run never leaves a dataset that looks complete.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow.fs as pafs

from ..errors import UserError
from . import shards
from .storage import Location, is_uri, locate
from .tokenizer import VOCAB_SIZE

FORMAT_VERSION = 3  # 3: tokens as fixed_size_binary(seq_len) (see shards.py); 2: list<uint8>
TOKENIZER = "esm2"
FIRST_PROBLEMS = 5  # rejected-record locations kept per source
RESIDUES_PER_COMPRESSED_BYTE = 1.7  # estimate for gzip FASTA (1.0 for plain text), to size the buckets
MAX_BUCKETS = 1 << 16  # ~8M tokens each at the defaults: 0.5T tokens before buckets grow
MAX_PARTITIONS = 2048  # shuffle partitions (a task de-duplicates the few buckets of one)
PARTITION_BYTES = 8 << 20  # records per shuffle partition (see _shuffle_sizes)
MAP_BYTES = (16 << 20, 1 << 30)  # records a shuffle map task partitions at once: [min, max] (_shuffle_sizes)
RECORD_BYTES_PER_RESIDUE = 1.15  # an Arrow record row per residue: the letter + offset, hash, ids per sequence
BLOCK_BYTES = 16 << 20  # Ray Data block size (see connect_ray)
INTERMEDIATE_COMPRESSION = "lz4"  # de-duplicated buckets, read back once: fast beats small
SHUFFLE_COMPRESSION = "lz4"  # the shuffle's pieces in the object store, read back once
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


# --------------------------------------------------------------------------------------------- inputs
@dataclass
class Source:
    path: str
    weight: float = 1.0


def parse_source(spec: str) -> Source:
    """``PATH[:WEIGHT]``; a suffix that is not a number belongs to the path (so ``s3://b/x`` is a path)."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return Source(path, float(tail))
        except ValueError:
            pass
    return Source(spec, 1.0)


def _as_source(s) -> Source:
    if isinstance(s, Source):
        return s
    if isinstance(s, (tuple, list)):
        return Source(str(s[0]), float(s[1]))
    return parse_source(str(s)) if not (is_uri(s) or Path(str(s)).exists()) else Source(str(s), 1.0)


def _display_path(path: str) -> str:
    """The path recorded in the manifest: bundled files by name, so the hash does not depend on where
    the package is installed; everything else as given."""
    if not is_uri(path):
        try:
            p = Path(path).resolve()
            if p.parent == BUNDLED_DIR:
                return f"bundled:{p.name}"
        except OSError:
            pass
    return str(path)


# ------------------------------------------------------------------------------------ hashing helpers
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def seq_hash(seq: bytes) -> int:
    """64-bit identity of a sequence (bucket, sampling); de-duplication still compares the bytes."""
    return int.from_bytes(hashlib.blake2b(seq, digest_size=8).digest(), "little")


def seq_hashes(residues: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``seq_hash`` of every sequence of a block (``residues[offsets[i]:offsets[i + 1]]``), as uint64."""
    mv, b2 = memoryview(np.ascontiguousarray(residues)), hashlib.blake2b
    off = offsets.tolist()
    digests = b"".join([b2(mv[s:e], digest_size=8).digest() for s, e in zip(off[:-1], off[1:])])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def uniform(h: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A deterministic number in [0, 1) per sequence hash, independent across (seed, stream)."""
    with np.errstate(over="ignore"):
        salt = np.uint64((seed * 0x9E3779B97F4A7C15 + stream * 0xD6E8FEB86659FD93) % (1 << 64))
        z = np.asarray(h, dtype=np.uint64) ^ salt
        z = (z ^ (z >> np.uint64(30))) * _M1  # splitmix64 finaliser
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ------------------------------------------------------------------------------------- Ray plumbing
def connect_ray(address: str | None = None, progress: bool = True):
    """Use the Ray this process is connected to; else join ``address`` / ``$RAY_ADDRESS``; else start a
    local one (with the dashboard, which trials started later in the same process rely on)."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=address, include_dashboard=None if address else True, logging_level="WARNING")
        except Exception as exc:     # no Ray to run on: one line
            if isinstance(exc, UserError):
                raise
            raise UserError(f"Ray {'at ' + address if address else '(local)'} did not start or answer: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; run again (a loaded "
                            "machine can miss Ray's start-up timeout) or give --address of a running cluster") from None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    # Ray Data's hash shuffle (tasks, no actors): map tasks hash-partition the records by bucket into
    # compressed pieces in the object store (which spills to disk when full); one reduce task per partition
    # gathers its pieces. Its pieces are map tasks x partitions, not blocks^2 as in the sort shuffle.
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SHUFFLE_V2
    ctx.use_disk_based_hash_shuffle = False
    ctx.shuffle_compression = SHUFFLE_COMPRESSION
    # Blocks of ~16 MiB rather than Ray's default 128 MiB (a whole input file here) keep the records
    # streaming from the read tasks into the shuffle in small pieces.
    ctx.target_max_block_size = BLOCK_BYTES
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.ERROR)
    return ray


def _one_worker_pool() -> dict:
    """Ray remote args that put our tasks in the worker pool of the shuffle's reduce tasks. Ray Data gives
    the hash shuffle's map and reduce tasks worker pools of their own (a runtime env of one variable
    each); on a small machine a third pool for the read and write tasks means Python workers killed
    and restarted between stages (~2 CPU-s each here) and more of them alive at once."""
    try:
        from ray.data._internal.execution.operators.shuffle_operators.shuffle_reduce_operator import (
            _SHUFFLE_REDUCE_RUNTIME_ENV as env)
    except ImportError:       # another Ray: its own pools, correct but slower to start
        return {}
    return {"runtime_env": {"env_vars": dict(env.get("env_vars", {}))}}


def _user_error(exc: BaseException) -> UserError | None:
    """The ``UserError`` raised inside a Ray task, found under the exception Ray Data re-raises (whose
    own text is a remote traceback)."""
    from ray.exceptions import RayError

    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError) and not isinstance(e, RayError):
            return type(e)(str(e).strip().splitlines()[0])  # Ray Data appends lines about retries
        stack.extend([e.__context__, e.__cause__, getattr(e, "cause", None)])
    return None


def _run(fn):
    """Run a Ray Data execution. A problem with the input (a ``UserError`` raised in a task) comes back
    as that one line: Ray Data's own error log of the failed task, a traceback, is silenced meanwhile;
    any other error is re-raised as it came."""
    log = logging.getLogger("ray.data")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return fn()
    except Exception as exc:
        err = _user_error(exc)
        if err is not None:
            raise err from None
        raise
    finally:
        log.setLevel(level)


def _each_note(ds, add) -> None:
    """Run a stage whose tasks return JSON notes (column ``note``) and hand each note to ``add`` as it
    arrives; the driver keeps only what ``add`` keeps."""
    def consume() -> None:
        for row in ds.iter_rows():
            if row["note"]:
                add(json.loads(row["note"]))

    _run(consume)


def _hand_back_memory() -> None:
    """A worker runs many tasks, one after another: at the end of each, return the memory it freed to the
    system (Arrow's allocator, and glibc's heap, where numpy's arrays live), so that a worker holds about
    the working set of its largest task rather than a high-water mark that creeps up task after task."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return None


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


# ----------------------------------------------------------------------------------- 1. read (tasks)
def _read_files(batch: dict, *, inputs: list[tuple], n_buckets: int, on_invalid: str) -> Iterator:
    """Ray Data UDF: for each file index in ``batch``, stream its records as Arrow tables of (bucket, src,
    ord, seq, h), one per block of ~4 MiB of text, then one row with ``bucket = -1`` whose ``seq`` is the
    file's statistics as JSON."""
    import pyarrow as pa

    from .fasta import Digest, read_fasta_blocks

    for i in batch["file"]:
        i = int(i)
        fs, path, name = inputs[i]
        digest, rejected, first = Digest(), Counter(), []

        def skip(problem) -> None:
            rejected[problem.kind] += 1
            if len(first) < FIRST_PROBLEMS:
                first.append(str(problem))

        n_records = n_residues = 0
        for blk in read_fasta_blocks(path, skip if on_invalid == "skip" else None, fs=fs, digest=digest,
                                     name=name):
            yield _records_table(pa, i, n_records, blk, n_buckets)
            n_records += len(blk)
            n_residues += int(blk.offsets[-1])
        stats = {"file": i, "node": _node_id(), "records": n_records + sum(rejected.values()), "residues": n_residues,
                 "sha256": digest.sha256, "bytes": digest.bytes, "rejected": dict(rejected), "first": first}
        yield pa.table({"bucket": pa.array([-1], pa.int32()), "src": pa.array([i], pa.int32()),
                        "ord": pa.array([-1], pa.int64()), "seq": pa.array([json.dumps(stats).encode()]),
                        "h": pa.array([0], pa.uint64())})
        _hand_back_memory()


def _records_table(pa, src: int, start: int, blk, n_buckets: int):
    """One block of records as an Arrow table; ``seq`` is built on the block's buffers (no per-row objects)."""
    n = len(blk)
    h = seq_hashes(blk.residues, blk.offsets)
    seq = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(blk.offsets.astype(np.int32)),
                                                 pa.py_buffer(blk.residues)])
    return pa.table({"bucket": pa.array((h % np.uint64(n_buckets)).astype(np.int32)),
                     "src": pa.array(np.full(n, src, np.int32)),
                     "ord": pa.array(np.arange(start, start + n, dtype=np.int64)),
                     "seq": seq, "h": pa.array(h)})


# --------------------------------------------------------------------------------- 2. de-duplicate
def _dedup_partition(table, *, work: Location, n_files: int, ood_index: int):
    """Ray Data UDF for one partition of the hash shuffle (every row of the buckets it holds): de-duplicate
    it bucket by bucket (``_dedup_bucket``), and return one JSON note of counts per bucket. Rows of
    ``bucket = -1`` hold the read tasks' file statistics and are passed through as notes.

    A partition holds a few buckets, and how many varies (the shuffle hashes bucket ids to partitions: at
    23 buckets in 24 partitions, one holds 3), so one bucket at a time keeps a task's working set at the
    partition's records plus one bucket's sort, whichever partition it gets."""
    import pyarrow as pa

    bucket = table["bucket"].to_numpy()
    notes = [x for x in table["seq"].filter(pa.array(bucket < 0)).to_pylist()]
    by_bucket = np.argsort(bucket, kind="stable")
    by_bucket = by_bucket[bucket[by_bucket] >= 0]
    cuts = np.flatnonzero(np.diff(bucket[by_bucket])) + 1
    for rows in np.split(by_bucket, cuts) if by_bucket.size else []:
        note = _dedup_bucket(table.take(pa.array(rows)), int(bucket[rows[0]]), work=work, n_files=n_files,
                             ood_index=ood_index)
        notes.append(json.dumps(note).encode())
    del table
    _hand_back_memory()
    return pa.table({"note": pa.array(notes, pa.binary())})


def _dedup_bucket(table, b: int, *, work: Location, n_files: int, ood_index: int) -> dict:
    """Keep the first occurrence of every sequence of bucket ``b`` (sources in the order given, then the
    OOD file), write those rows sorted by hash to ``work/bucket-<b>.parquet``; return the bucket's counts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    # Copies of a sequence have equal hashes: sorting by hash first compares the bytes only on hash ties.
    table = table.sort_by([("h", "ascending"), ("seq", "ascending"), ("src", "ascending"), ("ord", "ascending")])
    seq = table["seq"].combine_chunks()
    src = table["src"].to_numpy()
    h = table["h"].to_numpy()
    n = len(seq)
    first = np.ones(n, dtype=bool)
    tie = np.flatnonzero(h[1:] == h[:-1])
    if tie.size:
        same = pc.equal(seq.take(pa.array(tie + 1)), seq.take(pa.array(tie)))
        first[tie + 1] = ~same.to_numpy(zero_copy_only=False)
    lengths = pc.binary_length(seq).to_numpy().astype(np.int64)
    owner = src[np.maximum.accumulate(np.where(first, np.arange(n), 0))]  # src of each row's first copy
    dup = ~first
    overlap = dup & (src == ood_index) & (owner != ood_index)  # an OOD record that a source also holds
    plain = dup & ~overlap
    keep = table.filter(pa.array(first)).select(["src", "h", "seq"])
    pq.write_table(keep, work.join(f"bucket-{b:05d}.parquet").path, filesystem=work.fs,
                   compression=INTERMEDIATE_COMPRESSION, use_dictionary=False, write_statistics=False)
    return {"bucket": b, "node": _node_id(), "rows": int(first.sum()),
            "unique": np.bincount(src[first], minlength=n_files).tolist(),
            "unique_residues": np.bincount(src[first], lengths[first], minlength=n_files).astype(int).tolist(),
            "duplicates": np.bincount(src[plain], minlength=n_files).tolist(),
            "duplicate_residues": np.bincount(src[plain], lengths[plain], minlength=n_files).astype(int).tolist(),
            "overlap": int(overlap.sum())}


# -------------------------------------------------------------------------- 5. split, pack, write
@dataclass
class _Plan:
    """Everything a bucket needs to place its sequences: decided on the driver from the counts."""

    seed: int
    seq_len: int
    keep_prob: list[float]  # per source: the fraction of its available residues the mix uses
    val_prob: float  # the fraction of the used sequences that goes to validation
    ood_index: int  # source index of the --ood file (-1: none)
    held_out: np.ndarray  # sorted hashes of the sequences in held-out clusters (--ood-clusters)


def _split_bucket(batch: dict, *, work: Location, out: Location, plan: _Plan, n_files: int):
    """Ray Data UDF: read one bucket's unique rows, give each a split, tokenise, pack, and write
    ``<split>/part-<bucket>.parquet``; returns one JSON note per split written."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .packing import tokenise_pack, write_shard

    notes = []
    for b in batch["bucket"]:
        b = int(b)
        table = pq.read_table(work.join(f"bucket-{b:05d}.parquet").path, filesystem=work.fs, use_threads=False)
        src = table["src"].to_numpy()
        h = table["h"].to_numpy()
        seq = table["seq"].combine_chunks()
        lengths = pc.binary_length(seq).to_numpy().astype(np.int64)
        test = src == plan.ood_index
        if plan.held_out.size:
            test |= np.isin(h, plan.held_out)
        used = _mix(src, lengths, uniform(h, plan.seed, 2), ~test, plan.keep_prob)
        val = np.zeros_like(used)
        cand = np.flatnonzero(used)
        val[cand[np.argsort(uniform(h[cand], plan.seed, 3), kind="stable")][:round(plan.val_prob * cand.size)]] = True
        order = np.argsort(uniform(h, plan.seed, 4), kind="stable")  # a shuffled, reproducible row order
        for split, mask in (("train", used & ~val), ("val", val), ("test", test)):
            idx = order[mask[order]]
            if not idx.size:
                continue
            part = seq.take(pa.array(idx))  # this split's sequences, in row order, back to back
            off = np.frombuffer(part.buffers()[1], dtype=np.int32, count=len(part) + 1, offset=4 * part.offset)
            residues = np.frombuffer(part.buffers()[2], dtype=np.uint8, count=int(off[-1] - off[0]),
                                     offset=int(off[0]))
            rows = tokenise_pack(residues, lengths[idx], plan.seq_len)
            name = f"{split}/part-{b:05d}.parquet"
            if not out.remote:
                Path(out.join(split).path).mkdir(parents=True, exist_ok=True)
            write_shard(out.fs, out.join(name).path, rows)
            notes.append({"split": split, "bucket": b, "node": _node_id(), "file": name, "rows": int(rows.tokens.shape[0]),
                          "sequences": int(idx.size), "residues": int(lengths[idx].sum()),
                          "used": np.bincount(src[idx], minlength=n_files).tolist(),
                          "source_residues": np.bincount(src[idx], lengths[idx], minlength=n_files)
                          .astype(int).tolist()})
    table = seq = part = rows = None  # noqa: F841 (the last bucket's arrays, before handing memory back)
    _hand_back_memory()
    return {"note": [json.dumps(n).encode() for n in notes] or [b""]}


def _mix(src: np.ndarray, lengths: np.ndarray, u: np.ndarray, eligible: np.ndarray,
         keep: list[float]) -> np.ndarray:
    """Which rows of one bucket the mix uses: per source, the fraction ``keep`` of its residues, as the
    rows first in the hash order ``u`` (a row counts if its middle fits). Exact per bucket up to one
    sequence, so over all buckets the shares match the weights without any global coordination."""
    used = np.zeros(src.size, dtype=bool)
    for i in np.unique(src[eligible]):
        rows = np.flatnonzero(eligible & (src == i))
        p = keep[i] if i < len(keep) else 0.0
        if p >= 1.0:
            used[rows] = True
        elif p > 0.0:
            rows = rows[np.argsort(u[rows], kind="stable")]
            mid = np.cumsum(lengths[rows]) - lengths[rows] / 2.0
            used[rows[mid <= p * lengths[rows].sum()]] = True
    return used


# ---------------------------------------------------------------------------------------- 3. OOD clusters
def mmseqs_available() -> bool:
    return shutil.which("mmseqs") is not None


def _cluster_hold_out(work: Location, buckets: list[int], fraction: float, min_seq_id: float, seed: int,
                      n_files: int, progress) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Whole ``mmseqs easy-cluster`` clusters holding ``fraction`` of the residues, chosen in a seeded
    random order. Returns (sorted held-out hashes, held-out records per source, residues per source, info).
    mmseqs reads one FASTA streamed from the bucket files (it is the one single-machine step)."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="protscale-mmseqs-") as tmp:
        fasta = Path(tmp) / "in.fasta"
        hs, lens, srcs = [], [], []
        with open(fasta, "wb") as f:
            for b in buckets:
                t = pq.read_table(work.join(f"bucket-{b:05d}.parquet").path, filesystem=work.fs)
                h = t["h"].to_numpy()
                seqs = t["seq"].to_pylist()
                base = sum(len(x) for x in hs)
                f.write(b"".join(b">s%d\n%s\n" % (base + j, s) for j, s in enumerate(seqs)))
                hs.append(h)
                lens.append(np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs)))
                srcs.append(t["src"].to_numpy())
        h, lengths, src = np.concatenate(hs), np.concatenate(lens), np.concatenate(srcs)
        progress(f"clustering {h.size:,} sequences with mmseqs easy-cluster --min-seq-id {min_seq_id}")
        cmd = ["mmseqs", "easy-cluster", str(fasta), str(Path(tmp) / "res"), str(Path(tmp) / "work"),
               "--min-seq-id", str(min_seq_id), "--threads", str(os.cpu_count() or 1), "-v", "1"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise UserError(f"cannot run mmseqs: {exc}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"mmseqs easy-cluster failed (exit {proc.returncode}): {tail[0]}")
        tsv = Path(tmp) / "res_cluster.tsv"
        if not tsv.is_file():
            raise UserError("mmseqs easy-cluster wrote no res_cluster.tsv")
        label = np.full(h.size, -1, dtype=np.int64)
        for row in tsv.read_text().splitlines():
            if row:
                rep, member = row.split("\t")[:2]
                label[int(member[1:])] = int(rep[1:])
    if (label < 0).any():
        raise UserError(f"mmseqs easy-cluster left {int((label < 0).sum())} sequences unclustered")
    reps, inverse = np.unique(label, return_inverse=True)
    cluster_res = np.bincount(inverse, weights=lengths, minlength=reps.size)
    order = np.random.default_rng([seed, 1]).permutation(reps.size)
    cum = np.cumsum(cluster_res[order])
    n_clusters = int(np.searchsorted(cum, fraction * lengths.sum(), side="left")) + 1
    n_clusters = min(n_clusters, reps.size - 1)  # always leave something to train on
    held = np.zeros(reps.size, dtype=bool)
    held[order[:n_clusters]] = True
    is_test = held[inverse]
    info = {"method": "clusters", "tool": "mmseqs easy-cluster", "min_seq_id": min_seq_id,
            "fraction": fraction, "clusters": int(reps.size), "clusters_held_out": n_clusters,
            "residues_held_out_fraction": round(float(cluster_res[held].sum() / lengths.sum()), 6)}
    return (np.sort(h[is_test]), np.bincount(src[is_test], minlength=n_files),
            np.bincount(src[is_test], lengths[is_test], minlength=n_files).astype(np.int64), info)


# -------------------------------------------------------------------------------------------- mixing
def mix_targets(residues: Sequence[int], weights: Sequence[float]) -> list[float]:
    """Residues to use per source: shares proportional to ``weights``, as many as possible without
    repeating any source (the one with the least residues per unit weight is used in full)."""
    w = np.asarray(weights, dtype=float)
    r = np.asarray(residues, dtype=float)
    active = w > 0
    total = float(np.min(r[active] * w[active].sum() / w[active]))
    return [float(total * wi / w[active].sum()) if wi > 0 else 0.0 for wi in w]


def n_val_for(n: int, val_fraction: float, val_min: int) -> int:
    """Validation sequences out of ``n``: the fraction, at least ``val_min`` while that leaves 90% for
    training, at least one when any is asked for, and never all."""
    if n < 2 or (val_fraction <= 0 and val_min <= 0):
        return 0
    k = max(round(val_fraction * n), min(val_min, n // 10), 1)
    return min(k, n - 1)


# ------------------------------------------------------------------------------------------- output
def manifest_hash(manifest: dict) -> str:
    """sha256 of the canonical JSON of everything but ``hash`` (and the in-memory ``_run`` timings)."""
    body = {k: v for k, v in manifest.items() if k != "hash" and not k.startswith("_")}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def _check_out(out: Location, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    if not out.remote and not Path(out.path).is_dir():
        raise UserError(f"{out}: exists and is not a directory; not overwriting it")
    if not out.join(shards.MANIFEST).is_file() and out.listdir():
        raise UserError(f"{out}: not a prepared dataset (no {shards.MANIFEST}) and not empty; "
                        "not overwriting it")


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Local output: rename the finished temporary directory into place (replacing an old dataset)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _estimate_residues(inputs: list[Location]) -> float:
    """Residues in the inputs, estimated from their sizes (checks first that every input is a file)."""
    est = 0.0
    for loc in inputs:
        info = loc.info()
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"{loc}: no such file")
        if info.type == pafs.FileType.Directory:
            raise UserError(f"{loc}: is a directory, not a FASTA file")
        size = info.size or 0
        est += size * (RESIDUES_PER_COMPRESSED_BYTE if str(loc).endswith(".gz") else 1.0)
    return est


def _n_buckets(est_residues: float, seq_len: int, rows_per_shard: int) -> int:
    """Buckets (= shards of the train split) so that one holds about ``rows_per_shard`` packed rows."""
    return int(min(MAX_BUCKETS, max(1, math.ceil(est_residues / (seq_len * rows_per_shard)))))


def _shuffle_sizes(est_residues: float, n_buckets: int, cpus: int) -> tuple[int, int]:
    """(partitions, map input bytes) of the de-duplication's hash shuffle. A partition (the rows of the
    buckets that hash to it) is one de-duplication task, so it holds about ``PARTITION_BYTES`` whatever
    the corpus size, and there are at least two per CPU while buckets allow. A map task partitions
    ``map input bytes`` of records at once: 1/256 of the corpus, within ``MAP_BYTES`` [16 MiB, 1 GiB],
    which keeps the shuffle's pieces (map tasks x partitions, all owned by the driver) below ~0.5M at the
    paper's size. Up to 2,048 x 8 MiB (~14B residues) a task's share of the records is the same whatever
    the corpus (the worker memory of ``benchmarks/data_prepare.py`` flat from 1 to 8 shards); beyond, the
    partitions grow (~108 MiB at the paper's 194B tokens)."""
    est_bytes = est_residues * RECORD_BYTES_PER_RESIDUE
    parts = max(math.ceil(est_bytes / PARTITION_BYTES), 2 * max(1, cpus))
    parts = int(min(parts, n_buckets + 1, MAX_PARTITIONS))
    map_bytes = int(min(MAP_BYTES[1], max(MAP_BYTES[0], est_bytes / 256)))
    return parts, map_bytes


# ---------------------------------------------------------------------------------------------- API
def prepare(sources: Sequence[Source | str | tuple], out: str | Path, *, ood: str | Path | None = None,
            ood_clusters: float | None = None, min_seq_id: float = 0.5, val_fraction: float = 0.01,
            val_min: int = 100, seq_len: int = 1024, seed: int = 0, on_invalid: str = "error",
            overwrite: bool = False, progress: bool = True, rows_per_shard: int = 8192,
            address: str | None = None) -> dict:
    """Prepare a dataset in ``out`` (a path or URI); returns the manifest (also ``out/manifest.json``).

    ``sources``: ``Source``s, ``(path, weight)`` pairs or ``"PATH[:WEIGHT]"`` strings (paths or URIs).
    Runs on the Ray this process is connected to, else on ``address`` / ``$RAY_ADDRESS``, else on a new
    local one. Raises ``protscale.cli.UserError`` for any problem with the input or the arguments.
    """
    t0 = time.monotonic()
    srcs = [_as_source(s) for s in sources]
    out_loc = locate(out)
    _validate_args(srcs, out_loc, ood, ood_clusters, min_seq_id, val_fraction, val_min, seq_len, on_invalid,
                   overwrite)

    def say(msg: str) -> None:
        if progress:
            print(f"data prepare: {msg}", file=sys.stderr, flush=True)

    paths = [s.path for s in srcs] + ([str(ood)] if ood is not None else [])
    inputs = [locate(p) for p in paths]
    n_files = len(inputs)
    ood_index = len(srcs) if ood is not None else -1
    if rows_per_shard < 1:
        raise UserError(f"--rows-per-shard must be at least 1, got {rows_per_shard}")
    for path, loc in zip(paths, inputs):      # an empty input fails here, before Ray starts
        if loc.fs.get_file_info(loc.path).size == 0:
            raise UserError(f"{path}: empty file (no FASTA records)")
    est_residues = _estimate_residues(inputs)
    n_buckets = _n_buckets(est_residues, seq_len, rows_per_shard)
    ray = connect_ray(address, progress)

    # Where the pieces go: local -> a temporary sibling renamed at the end; remote -> under the prefix.
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    if out_loc.remote:
        if out_loc.exists():  # --overwrite (checked): first make it stop looking like a dataset
            out_loc.join(shards.MANIFEST).remove()
            for name in out_loc.listdir():
                out_loc.join(name).remove()
        build = out_loc
        # Intermediate files under the bucket's root: deleting them leaves no directory marker behind.
        bucket, scheme = out_loc.path.split("/")[0], out_loc.uri.split("://")[0]
        work = Location(out_loc.fs, f"{bucket}/.protscale-tmp-{token}", f"{scheme}://{bucket}/.protscale-tmp-{token}")
    else:
        build = locate(Path(out_loc.path).parent / f".{out_loc.name}.tmp-{token}")
        work = build.join(f"_buckets-{token}")
    timings: dict[str, float] = {}
    try:
        if not out_loc.remote:  # object stores have no directories (and need no marker objects)
            build.mkdir()
            work.mkdir()
        manifest = _pipeline(ray, srcs, inputs, n_files, ood_index, n_buckets, est_residues, build, work, out_loc,
                             ood_clusters=ood_clusters, min_seq_id=min_seq_id, val_fraction=val_fraction,
                             val_min=val_min, seq_len=seq_len, seed=seed, on_invalid=on_invalid,
                             rows_per_shard=rows_per_shard, say=say, timings=timings, t0=t0)
        work.remove()
        build.join(shards.MANIFEST).write_bytes((json.dumps(manifest, indent=2) + "\n").encode())
        if not out_loc.remote:
            _install(Path(build.path), Path(out_loc.path), overwrite)
    except BaseException as exc:
        try:  # nothing half-written stays behind
            if out_loc.remote:
                work.remove()
                build.remove()
            else:
                shutil.rmtree(build.path, ignore_errors=True)
        except Exception:
            pass
        if isinstance(exc, OSError):  # disk full, permissions, ...: one line
            raise UserError(f"{out}: cannot write the dataset: {exc.strerror or exc}") from exc
        raise
    # In memory only (not in the file, not in the hash): wall time per stage.
    nodes = timings.pop("nodes", [])
    manifest["_run"] = {"elapsed_s": time.monotonic() - t0, "stages_s": timings, "nodes": nodes}
    return manifest


def _pipeline(ray, srcs, inputs, n_files, ood_index, n_buckets, est_residues, build: Location, work: Location,
              out_loc: Location, *, ood_clusters, min_seq_id, val_fraction, val_min, seq_len, seed,
              on_invalid, rows_per_shard, say, timings, t0) -> dict:
    # 1-2. read + validate in parallel, hash-partition, de-duplicate per bucket
    n_partitions, map_bytes = _shuffle_sizes(est_residues, n_buckets, int(ray.cluster_resources().get("CPU", 1)))
    ray.data.DataContext.get_current().shuffle_input_batch_bytes = map_bytes
    say(f"reading {n_files} file(s) into {n_buckets} hash bucket(s) in {n_partitions} shuffle partition(s)")
    names = [str(s.path) for s in srcs] + ([str(inputs[-1])] if ood_index >= 0 else [])
    files = ray.data.from_items([{"file": i} for i in range(n_files)], override_num_blocks=n_files)
    records = files.map_batches(
        _read_files, batch_size=1, batch_format="numpy",
        fn_kwargs={"inputs": [(loc.fs, loc.path, name) for loc, name in zip(inputs, names)],
                   "n_buckets": n_buckets, "on_invalid": on_invalid}, **_one_worker_pool())
    deduped = records.repartition(n_partitions, keys=["bucket"]).map_batches(
        _dedup_partition, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"work": work, "n_files": n_files, "ood_index": ood_index}, **_one_worker_pool())
    # The notes stream into totals: a bucket's note carries counts per input file, and the paper's corpus
    # has ~22k buckets, so keeping every parsed note would grow the driver with buckets x files.
    file_stats, todo, nodes = {}, [], set()
    unique, unique_res, dups, dup_res = (np.zeros(n_files, np.int64) for _ in range(4))
    n_overlap = [0]  # OOD records that a source also holds (dropped)

    def add_bucket(n: dict) -> None:
        nodes.add(n["node"])
        if "file" in n:
            file_stats[n["file"]] = n
            return
        if n["rows"]:
            todo.append(n["bucket"])
        for total, k in ((unique, "unique"), (unique_res, "unique_residues"), (dups, "duplicates"),
                         (dup_res, "duplicate_residues")):
            total += n[k]
        n_overlap[0] += n["overlap"]

    _each_note(deduped, add_bucket)
    timings["read_dedup"] = time.monotonic() - t0
    todo.sort()
    overlap = n_overlap[0]
    for i, loc in enumerate(inputs):
        st = file_stats[i]
        if st["bytes"] == 0:
            raise UserError(f"{names[i]}: empty file (no FASTA records)")
        if st["records"] == sum(st["rejected"].values()):
            what = f"all {st['records']} records are invalid" if st["records"] else "no FASTA records"
            raise UserError(f"{names[i]}: {what}")
    rejected = sum(sum(s["rejected"].values()) for s in file_stats.values())
    if rejected:
        kinds = Counter()
        for s in file_stats.values():
            kinds.update(s["rejected"])
        firsts = [p for i in range(n_files) for p in file_stats[i]["first"]]
        print(f"data prepare: skipped {rejected:,} invalid records ("
              + ", ".join(f"{k}: {v:,}" for k, v in sorted(kinds.items())) + "); first: "
              + "; ".join(firsts[:FIRST_PROBLEMS]), file=sys.stderr, flush=True)
    if ood_index >= 0 and unique[ood_index] == 0:
        raise UserError(f"{names[ood_index]}: every OOD sequence also occurs in the sources; no test set left")

    # 3. OOD test split
    n_src = len(srcs)
    held = np.zeros(0, dtype=np.uint64)
    held_n, held_res = np.zeros(n_files, np.int64), np.zeros(n_files, np.int64)
    if ood_index >= 0:
        ood_info = {"method": "source", **_source_entry(names[ood_index], None, file_stats[ood_index],
                                                        unique[ood_index], unique_res[ood_index],
                                                        dups[ood_index], dup_res[ood_index])}
        ood_info["overlap_with_sources_dropped"] = overlap
    elif ood_clusters is not None:
        held, held_n, held_res, ood_info = _cluster_hold_out(
            work, todo, ood_clusters, min_seq_id, seed, n_files, say)
    else:
        ood_info = {"method": "none", "note": "no --ood source and no --ood-clusters: no test split; "
                                              "training logs no test loss"}
    timings["ood"] = time.monotonic() - t0 - sum(timings.values())

    # 4. mixing and validation, as per-sequence probabilities
    avail = (unique_res - held_res)[:n_src]
    avail_n = (unique - held_n)[:n_src]
    for s, a in zip(srcs, avail):
        if s.weight > 0 and a == 0:
            raise UserError(f"{s.path}: no sequences left after de-duplication"
                            + (" and OOD hold-out" if ood_clusters else "") + f"; cannot give it weight {s.weight:g}")
    targets = mix_targets(avail, [s.weight for s in srcs])
    keep = [min(1.0, t / a) if a else 0.0 for t, a in zip(targets, avail)]
    n_mix = float(np.dot(keep, avail_n))
    n_val = n_val_for(int(round(n_mix)), val_fraction, val_min)
    plan = _Plan(seed=seed, seq_len=seq_len, keep_prob=keep, val_prob=n_val / n_mix if n_mix else 0.0,
                 ood_index=ood_index, held_out=held)

    # 5. split, tokenise, pack, write
    say(f"mixing, splitting, tokenising and packing into rows of {seq_len}")
    parts = ray.data.from_items([{"bucket": b} for b in todo], override_num_blocks=max(1, len(todo)))
    written = parts.map_batches(_split_bucket, batch_size=1, batch_format="numpy",
                                fn_kwargs={"work": work, "out": build, "plan": plan, "n_files": n_files},
                                **_one_worker_pool())
    shard_notes, used, used_res = [], {}, {}  # per shard: a few numbers; per split: counts per input file

    def add_shard(n: dict) -> None:
        nodes.add(n["node"])
        split = n["split"]
        used[split] = used.get(split, 0) + np.asarray(n.pop("used"), np.int64)
        used_res[split] = used_res.get(split, 0) + np.asarray(n.pop("source_residues"), np.int64)
        shard_notes.append(n)

    _each_note(written, add_shard)
    timings["split_pack_write"] = time.monotonic() - t0 - sum(timings.values())

    split_info = {}
    for split in shards.SPLITS:
        mine = sorted((n for n in shard_notes if n["split"] == split), key=lambda n: n["bucket"])
        if not mine:
            continue
        seqs = sum(n["sequences"] for n in mine)
        res = sum(n["residues"] for n in mine)
        split_info[split] = {"sequences": seqs, "residues": res, "tokens": res + 2 * seqs,
                             "rows": sum(n["rows"] for n in mine), "files": [n["file"] for n in mine],
                             "shards": [{"file": n["file"], "rows": n["rows"]} for n in mine],
                             "row_group_rows": _row_group_rows()}
    if "train" not in split_info:
        raise UserError("too few sequences to make a training split")
    used_records = used["train"] + used.get("val", 0)  # records used by the mix (the test split is apart)
    train_res = used_res["train"]
    val_res = used_res.get("val", np.zeros(n_files, np.int64))
    total_train = float(train_res[:n_src].sum())
    w_active = sum(s.weight for s in srcs if s.weight > 0)
    sources_info = []
    for i, s in enumerate(srcs):
        e = _source_entry(names[i], s.weight, file_stats[i], unique[i], unique_res[i], dups[i], dup_res[i])
        r_used = int(train_res[i] + val_res[i])
        e.update({"records_used": int(used_records[i]), "residues_used": r_used,
                  "residues_dropped_by_mixing": int(avail[i] - r_used),
                  "train_residues": int(train_res[i]), "val_residues": int(val_res[i]),
                  "target_share": (s.weight / w_active) if s.weight > 0 else 0.0,
                  "train_share": round(float(train_res[i] / total_train), 6) if total_train else 0.0})
        if ood_clusters is not None:
            e["held_out_ood_records"] = int(held_n[i])
            e["held_out_ood_residues"] = int(held_res[i])
        sources_info.append(e)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": TOKENIZER,
        "vocab_size": VOCAB_SIZE,
        "seq_len": seq_len,
        "settings": {"seed": seed, "val_fraction": val_fraction, "val_min": val_min, "on_invalid": on_invalid,
                     "rows_per_shard": rows_per_shard, "buckets": n_buckets,
                     "row_group_rows": _row_group_rows()},
        "sources": sources_info,
        "ood": ood_info,
        "splits": split_info,
        "totals": {
            "records": sum(file_stats[i]["records"] for i in range(n_files)),
            "records_rejected": rejected,
            "duplicates_dropped": int(dups.sum()) + overlap,
            "unique_sequences": int(unique.sum()),
            "sequences": sum(s["sequences"] for s in split_info.values()),
            "residues": sum(s["residues"] for s in split_info.values()),
            "tokens": sum(s["tokens"] for s in split_info.values()),
            "rows": sum(s["rows"] for s in split_info.values()),
        },
    }
    manifest["hash"] = manifest_hash(manifest)
    timings["nodes"] = sorted(nodes)  # where tasks ran (not saved)
    return manifest


def _row_group_rows() -> int:
    from .packing import ROW_GROUP_ROWS

    return ROW_GROUP_ROWS


def _source_entry(name: str, weight: float | None, st: dict, unique: int, unique_res: int, dups: int,
                  dup_res: int) -> dict:
    e = {
        "path": _display_path(name),
        "sha256": st["sha256"],
        "bytes": st["bytes"],
        "records": st["records"],
        "residues": st["residues"],
        "duplicates_dropped": int(dups),
        "duplicate_residues_dropped": int(dup_res),
        "records_rejected": sum(st["rejected"].values()),
        "rejected_by_kind": dict(sorted(st["rejected"].items())),
        "rejected_first": list(st["first"]),
        "unique_records": int(unique),
        "unique_residues": int(unique_res),
    }
    if weight is not None:
        e = {"path": e.pop("path"), "weight": weight, **e}
    return e


def _validate_args(srcs, out: Location, ood, ood_clusters, min_seq_id, val_fraction, val_min, seq_len,
                   on_invalid, overwrite) -> None:
    if not srcs:
        raise UserError("no sources given (--source PATH[:WEIGHT])")
    for s in srcs:
        if not (math.isfinite(s.weight) and s.weight >= 0):
            raise UserError(f"{s.path}: weight must be a finite number >= 0, got {s.weight}")
    if not any(s.weight > 0 for s in srcs):
        raise UserError("every source has weight 0")
    keys = [s.path if is_uri(s.path) else os.path.realpath(s.path) for s in srcs]
    if ood is not None:
        keys.append(str(ood) if is_uri(ood) else os.path.realpath(ood))
    dup = [k for k, v in Counter(keys).items() if v > 1]
    if dup:
        raise UserError(f"{dup[0]}: given more than once (as a source or as --ood)")
    if on_invalid not in ("error", "skip"):
        raise UserError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_min < 0:
        raise UserError(f"--val-min must be >= 0, got {val_min}")
    if ood is not None and ood_clusters is not None:
        raise UserError("--ood and --ood-clusters are alternatives; give one")
    if ood_clusters is not None:
        if not 0 < ood_clusters < 1:
            raise UserError(f"--ood-clusters must be a fraction in (0, 1), got {ood_clusters}")
        if not 0 < min_seq_id <= 1:
            raise UserError(f"--min-seq-id must be in (0, 1], got {min_seq_id}")
        if not mmseqs_available():
            raise UserError("--ood-clusters needs mmseqs (MMseqs2) on PATH; install it (Debian/Ubuntu: "
                            "apt-get install mmseqs2) or give an OOD source with --ood FILE")
    _check_out(out, overwrite)


def summary_line(manifest: dict, out: str | Path) -> str:
    sp = manifest["splits"]
    parts = [f"{k} {v['sequences']:,} seqs / {v['residues'] / 1e6:.2f}M residues / {v['rows']:,} rows"
             for k, v in sp.items()]
    t = manifest["totals"]
    el = manifest.get("_run", {}).get("elapsed_s")
    speed = (f" in {el:.1f}s ({sum(s['residues'] for s in manifest['sources']) / el / 1e6:.2f}M input "
             "residues/s)") if el else ""
    test = "" if "test" in sp else "; no test split"
    return (f"prepared {out}: " + "; ".join(parts) + test + f"; {t['duplicates_dropped']:,} duplicates "
            f"dropped, {t['records_rejected']:,} records rejected; hash {manifest['hash'][:12]}" + speed)
