"""``protscale data prepare``: FASTA(.gz) sources -> validated, de-duplicated, mixed, split, tokenised,
packed Parquet shards plus ``manifest.json`` (see ``shards.py`` for the format).

Pipeline (deterministic given ``seed``):

1. Read every source (streaming; see ``fasta.py``), validating each record; exact de-duplication across
   sources in the order given (a sequence belongs to the first source it appears in).
2. OOD test split: a separate ``ood`` FASTA (de-duplicated within itself and against the sources; what
   overlaps the sources is dropped from the test set), or, with ``ood_clusters`` and ``mmseqs`` on PATH,
   whole ``mmseqs easy-cluster`` clusters (at ``min_seq_id``) holding that fraction of residues; else none.
3. Mixing: each source's weight is its share of the residues used; the largest mix that repeats nothing
   is taken (the scarcest source relative to its weight is used in full, the others are downsampled by a
   random subset of whole sequences).
4. IID validation: a random subset of the mixed sequences (``val_fraction``, at least ``val_min`` when
   the input allows); the rest is train, so train follows the weights.
5. ``tokenizer.encode`` each sequence, ``shards.pack`` into rows of ``seq_len``, ``shards.write_split``.

Everything is written into a temporary sibling of the output directory that is renamed into place at the
end; on any failure it is removed, so there is never a half-written dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..cli import UserError
from . import shards
from .fasta import Problem, read_fasta
from .tokenizer import CLS, EOS, PAD, TOKEN_ID, VALID_RESIDUES, VOCAB_SIZE

FORMAT_VERSION = 1
TOKENIZER = "esm2"
OOD_METHODS = ("source", "clusters", "none")
FIRST_PROBLEMS = 5  # rejected-record locations kept per source
PROGRESS_EVERY_S = 5.0

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


# --------------------------------------------------------------------------------------------- inputs
@dataclass
class Source:
    path: str
    weight: float = 1.0


def parse_source(spec: str) -> Source:
    """``PATH[:WEIGHT]``; a suffix that is not a number belongs to the path."""
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
    return parse_source(str(s)) if not Path(str(s)).exists() else Source(str(s), 1.0)


def _display_path(path: str) -> str:
    """The path recorded in the manifest: bundled files by name, so the hash does not depend on where
    the package is installed; everything else as given."""
    try:
        p = Path(path).resolve()
        if p.parent == BUNDLED_DIR:
            return f"bundled:{p.name}"
    except OSError:
        pass
    return str(path)


def _sha256(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


# ------------------------------------------------------------------------------------------ progress
class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.last = self.t0
        self.records = 0
        self.residues = 0

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f"data prepare: {msg}", file=sys.stderr, flush=True)

    def tick(self, label: str, records: int, residues: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            dt = max(now - self.t0, 1e-9)
            self.say(f"{label}: {records:,} records, {residues / 1e6:.1f}M residues "
                     f"({(self.records + records) / dt:,.0f} records/s, "
                     f"{(self.residues + residues) / dt / 1e6:.2f}M residues/s overall)")


# ------------------------------------------------------------------------------------------- reading
@dataclass
class _SourceData:
    path: str
    weight: float
    display: str = ""
    sha256: str = ""
    bytes: int = 0
    records: int = 0
    residues: int = 0
    duplicates: int = 0
    duplicate_residues: int = 0
    overlap_with_sources: int = 0  # OOD file only: records dropped because a source holds them
    held_out: int = 0  # OOD clusters: unique records / residues moved to the test split
    held_out_residues: int = 0
    rejected: Counter = field(default_factory=Counter)
    first_problems: list[str] = field(default_factory=list)
    seqs: list[bytes] = field(default_factory=list)  # unique (first occurrence), valid

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


def _read_source(src: _SourceData, seen: set[bytes], on_invalid: str, progress: _Progress,
                 exclude: set[bytes] | None = None) -> None:
    """Fill ``src`` from its file. Sequences in ``seen`` are duplicates; in ``exclude``, overlaps."""
    src.display = _display_path(src.path)
    try:
        src.sha256, src.bytes = _sha256(src.path)
    except OSError:
        pass  # read_fasta gives the one-line reason
    name = Path(src.path).name

    def skip(problem: Problem) -> None:
        src.records += 1
        src.rejected[problem.kind] += 1
        if len(src.first_problems) < FIRST_PROBLEMS:
            src.first_problems.append(str(problem))

    records = residues = 0
    for rec in read_fasta(src.path, skip if on_invalid == "skip" else None):
        records += 1
        n = len(rec.seq)
        residues += n
        if exclude is not None and rec.seq in exclude:
            src.overlap_with_sources += 1
        elif rec.seq in seen:
            src.duplicates += 1
            src.duplicate_residues += n
        else:
            seen.add(rec.seq)
            src.seqs.append(rec.seq)
        if not records & 1023:
            progress.tick(name, records, residues)
    src.records += records
    src.residues += residues
    progress.records += records
    progress.residues += residues
    if src.bytes == 0 and src.records == 0:
        raise UserError(f"{src.path}: empty file (no FASTA records)")
    if not src.seqs and not src.overlap_with_sources and not src.duplicates:
        what = f"all {src.n_rejected} records are invalid" if src.n_rejected else "no FASTA records"
        raise UserError(f"{src.path}: {what}")


# ---------------------------------------------------------------------------------------- OOD clusters
def mmseqs_available() -> bool:
    return shutil.which("mmseqs") is not None


def _mmseqs_clusters(seqs: Sequence[bytes], min_seq_id: float, threads: int) -> np.ndarray:
    """Cluster label (index of the representative) per sequence, from ``mmseqs easy-cluster``."""
    with tempfile.TemporaryDirectory(prefix="protscale-mmseqs-") as tmp:
        fasta = Path(tmp) / "in.fasta"
        with open(fasta, "wb") as f:
            for i, s in enumerate(seqs):
                f.write(b">s%d\n%s\n" % (i, s))
        cmd = ["mmseqs", "easy-cluster", str(fasta), str(Path(tmp) / "res"), str(Path(tmp) / "work"),
               "--min-seq-id", str(min_seq_id), "--threads", str(threads), "-v", "1"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise UserError(f"cannot run mmseqs: {exc}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"mmseqs easy-cluster failed (exit {proc.returncode}): {tail[0]}")
        label = np.full(len(seqs), -1, dtype=np.int64)
        tsv = Path(tmp) / "res_cluster.tsv"
        if not tsv.is_file():
            raise UserError("mmseqs easy-cluster wrote no res_cluster.tsv")
        for row in tsv.read_text().splitlines():
            if row:
                rep, member = row.split("\t")[:2]
                label[int(member[1:])] = int(rep[1:])
    if (label < 0).any():
        raise UserError(f"mmseqs easy-cluster left {int((label < 0).sum())} sequences unclustered")
    return label


def _hold_out_clusters(sources: list[_SourceData], fraction: float, min_seq_id: float,
                       rng: np.random.Generator, progress: _Progress) -> tuple[list[bytes], dict]:
    """Remove whole clusters holding ``fraction`` of the residues from the sources; return them."""
    allseqs = [s for src in sources for s in src.seqs]
    owner = np.concatenate([np.full(len(src.seqs), i) for i, src in enumerate(sources)])
    lengths = np.fromiter((len(s) for s in allseqs), dtype=np.int64, count=len(allseqs))
    progress.say(f"clustering {len(allseqs):,} sequences with mmseqs easy-cluster "
                 f"--min-seq-id {min_seq_id}")
    label = _mmseqs_clusters(allseqs, min_seq_id, threads=os.cpu_count() or 1)
    reps, inverse = np.unique(label, return_inverse=True)
    cluster_res = np.bincount(inverse, weights=lengths, minlength=reps.size)
    order = rng.permutation(reps.size)
    cum = np.cumsum(cluster_res[order])
    n_clusters = int(np.searchsorted(cum, fraction * lengths.sum(), side="left")) + 1
    n_clusters = min(n_clusters, reps.size - 1)  # always leave something to train on
    held = np.zeros(reps.size, dtype=bool)
    held[order[:n_clusters]] = True
    is_test = held[inverse]
    test = [allseqs[i] for i in np.flatnonzero(is_test)]
    for i, src in enumerate(sources):
        mine = np.flatnonzero(owner == i)
        src.held_out = int(is_test[mine].sum())
        src.held_out_residues = int(lengths[mine][is_test[mine]].sum())
        src.seqs = [allseqs[j] for j in mine[~is_test[mine]]]
    info = {"method": "clusters", "tool": "mmseqs easy-cluster", "min_seq_id": min_seq_id,
            "fraction": fraction, "clusters": int(reps.size), "clusters_held_out": n_clusters,
            "residues_held_out_fraction": round(float(cluster_res[held].sum() / lengths.sum()), 6)}
    return test, info


# ------------------------------------------------------------------------------------------- mixing
def mix_targets(residues: Sequence[int], weights: Sequence[float]) -> list[float]:
    """Residues to use per source: shares proportional to ``weights``, as many as possible without
    repeating any source (the one with the least residues per unit weight is used in full)."""
    w = np.asarray(weights, dtype=float)
    r = np.asarray(residues, dtype=float)
    active = w > 0
    total = float(np.min(r[active] * w[active].sum() / w[active]))
    return [float(total * wi / w[active].sum()) if wi > 0 else 0.0 for wi in w]


def _take(seqs: list[bytes], target: float, rng: np.random.Generator) -> tuple[list[bytes], list[bytes]]:
    """A random subset of whole sequences whose residues are closest to ``target``; (used, dropped)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if target >= lengths.sum() - 0.5:
        return seqs, []
    order = rng.permutation(len(seqs))
    mid = np.cumsum(lengths[order]) - lengths[order] / 2.0  # include a sequence if its middle fits
    k = int(np.searchsorted(mid, target, side="right"))
    return [seqs[i] for i in order[:k]], [seqs[i] for i in order[k:]]


def n_val_for(n: int, val_fraction: float, val_min: int) -> int:
    """Validation sequences out of ``n``: the fraction, at least ``val_min`` while that leaves 90% for
    training, at least one when any is asked for, and never all."""
    if n < 2 or (val_fraction <= 0 and val_min <= 0):
        return 0
    k = max(round(val_fraction * n), min(val_min, n // 10), 1)
    return min(k, n - 1)


# ------------------------------------------------------------------------------------------- output
def _split_stats(rows: shards.PackedRows, seqs: Sequence[bytes], files: list[str]) -> dict:
    residues = sum(len(s) for s in seqs)
    return {"sequences": len(seqs), "residues": residues, "tokens": residues + 2 * len(seqs),
            "rows": len(rows), "files": files}


# ``bytes.translate`` table equivalent to ``tokenizer.encode`` for validated residues (either case), with
# two sentinel bytes that become <cls> and <eos>: one C-level pass tokenises a whole split.
_CLS_BYTE, _EOS_BYTE = b"\x00", b"\x01"
_TABLE = bytearray(range(256))
for _c in VALID_RESIDUES:
    _TABLE[ord(_c)] = _TABLE[ord(_c.lower())] = TOKEN_ID[_c]
_TABLE[_CLS_BYTE[0]], _TABLE[_EOS_BYTE[0]] = CLS, EOS
_TABLE = bytes(_TABLE)


def tokenise_many(seqs: Sequence[bytes]) -> np.ndarray:
    """The concatenation of ``encode(s)`` for every (validated) sequence, as one uint8 array."""
    if not seqs:
        return np.zeros(0, dtype=np.uint8)
    text = _CLS_BYTE + (_EOS_BYTE + _CLS_BYTE).join(seqs) + _EOS_BYTE
    return np.frombuffer(text.translate(_TABLE), dtype=np.uint8)


def pack_stream(stream: np.ndarray, lengths: np.ndarray, seq_len: int) -> shards.PackedRows:
    """``shards.pack`` of sequences already concatenated in ``stream`` (segment ``lengths`` in tokens):
    the same rows and ``seq_lens``, computed with array operations instead of a loop per sequence."""
    total = int(stream.size)
    n_rows = -(-total // seq_len)
    tokens = np.full(n_rows * seq_len, PAD, dtype=np.uint8)
    tokens[:total] = stream
    if total == 0:
        return shards.PackedRows(tokens.reshape(0, seq_len), [])
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    cuts = np.union1d(ends, np.arange(seq_len, total, seq_len, dtype=np.int64))  # sorted, unique
    starts = np.concatenate(([0], cuts[:-1]))
    seg = (cuts - starts).astype(np.int32)
    per_row = np.bincount(starts // seq_len, minlength=n_rows)
    return shards.PackedRows(tokens.reshape(n_rows, seq_len), np.split(seg, np.cumsum(per_row)[:-1]))


def _tokenise_pack(seqs: Sequence[bytes], seq_len: int) -> shards.PackedRows:
    lengths = np.fromiter((len(s) + 2 for s in seqs), dtype=np.int64, count=len(seqs))
    return pack_stream(tokenise_many(seqs), lengths, seq_len)


def manifest_hash(manifest: dict) -> str:
    """sha256 of the canonical JSON of everything but ``hash`` (and the in-memory ``_run`` timings)."""
    body = {k: v for k, v in manifest.items() if k != "hash" and not k.startswith("_")}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; not overwriting it")
    if not (out / shards.MANIFEST).is_file() and any(out.iterdir()):
        raise UserError(f"{out}: not a prepared dataset (no {shards.MANIFEST}) and not empty; "
                        "not overwriting it")


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    _check_out(out, overwrite)
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------- API
def prepare(sources: Sequence[Source | str | tuple], out: str | Path, *, ood: str | Path | None = None,
            ood_clusters: float | None = None, min_seq_id: float = 0.5, val_fraction: float = 0.01,
            val_min: int = 100, seq_len: int = 1024, seed: int = 0, on_invalid: str = "error",
            overwrite: bool = False, progress: bool = True, rows_per_shard: int = 8192) -> dict:
    """Prepare a dataset in ``out``; returns the manifest (also written as ``out/manifest.json``).

    ``sources``: ``Source``s, ``(path, weight)`` pairs or ``"PATH[:WEIGHT]"`` strings.
    Raises ``protscale.cli.UserError`` for any problem with the input or the arguments.
    """
    t0 = time.monotonic()
    srcs = [_as_source(s) for s in sources]
    out = Path(out)
    _validate_args(srcs, out, ood, ood_clusters, min_seq_id, val_fraction, val_min, seq_len, on_invalid,
                   overwrite)
    prog = _Progress(progress)

    # 1. read, validate, de-duplicate
    seen: set[bytes] = set()
    data = [_SourceData(s.path, s.weight) for s in srcs]
    for d in data:
        _read_source(d, seen, on_invalid, prog)
    ood_data = None
    if ood is not None:
        ood_data = _SourceData(str(ood), 0.0)
        _read_source(ood_data, set(), on_invalid, prog, exclude=seen)
        if not ood_data.seqs:
            raise UserError(f"{ood}: every OOD sequence also occurs in the sources; no test set left")
    rejected = sum(d.n_rejected for d in data) + (ood_data.n_rejected if ood_data else 0)
    if rejected:
        firsts = [p for d in data + ([ood_data] if ood_data else []) for p in d.first_problems]
        kinds = Counter()
        for d in data + ([ood_data] if ood_data else []):
            kinds.update(d.rejected)
        print(f"data prepare: skipped {rejected:,} invalid records ("
              + ", ".join(f"{k}: {v:,}" for k, v in sorted(kinds.items())) + "); first: "
              + "; ".join(firsts[:FIRST_PROBLEMS]), file=sys.stderr, flush=True)

    timings = {"read": time.monotonic() - t0}
    # 2. OOD test split
    if ood_data is not None:
        test = list(ood_data.seqs)
        ood_info = {"method": "source", **_source_entry(ood_data, include_mix=False)}
        ood_info["overlap_with_sources_dropped"] = ood_data.overlap_with_sources
    elif ood_clusters is not None:
        test, ood_info = _hold_out_clusters(data, ood_clusters, min_seq_id,
                                            np.random.default_rng([seed, 1]), prog)
    else:
        test, ood_info = [], {"method": "none", "note": "no --ood source and no --ood-clusters: no test "
                                                        "split; training logs no test loss"}

    timings["ood"] = time.monotonic() - t0 - sum(timings.values())
    # 3. mixing
    avail = [sum(len(s) for s in d.seqs) for d in data]
    for d, a in zip(data, avail):
        if d.weight > 0 and a == 0:
            raise UserError(f"{d.path}: no sequences left after de-duplication"
                            + (" and OOD hold-out" if ood_clusters else "")
                            + f"; cannot give it weight {d.weight:g}")
    targets = mix_targets(avail, [d.weight for d in data])
    pool: list[bytes] = []
    owner: list[int] = []
    used: list[list[bytes]] = []
    for i, (d, target) in enumerate(zip(data, targets)):
        u, _ = _take(d.seqs, target, np.random.default_rng([seed, 2, i]))
        used.append(u)
        pool.extend(u)
        owner.extend([i] * len(u))

    # 4. IID validation out of the mix
    rng = np.random.default_rng([seed, 3])
    order = rng.permutation(len(pool))
    n_val = n_val_for(len(pool), val_fraction, val_min)
    if len(pool) - n_val < 1:
        raise UserError("too few sequences to make a training split")
    is_val = np.zeros(len(pool), dtype=bool)
    is_val[order[:n_val]] = True
    val = [pool[i] for i in order[:n_val]]
    train = [pool[i] for i in order[n_val:]]
    test = [test[i] for i in np.random.default_rng([seed, 4]).permutation(len(test))]
    owner_arr = np.asarray(owner, dtype=np.int64)
    pool_len = np.fromiter((len(s) for s in pool), dtype=np.int64, count=len(pool))
    train_res = np.bincount(owner_arr[~is_val], weights=pool_len[~is_val], minlength=len(data))
    val_res = np.bincount(owner_arr[is_val], weights=pool_len[is_val], minlength=len(data))

    splits = {"train": train, "val": val}
    if test:
        splits["test"] = test

    timings["mix_split"] = time.monotonic() - t0 - sum(timings.values())
    # 5. tokenise, pack, write (into a temporary sibling, renamed into place at the end)
    prog.say(f"tokenising and packing {sum(len(v) for v in splits.values()):,} sequences "
             f"into rows of {seq_len}")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        split_info = {}
        for name, seqs in splits.items():
            t1 = time.monotonic()
            rows = _tokenise_pack(seqs, seq_len)
            t2 = time.monotonic()
            files = shards.write_split(tmp, name, rows, rows_per_shard=rows_per_shard)
            timings["tokenise_pack"] = timings.get("tokenise_pack", 0.0) + t2 - t1
            timings["write"] = timings.get("write", 0.0) + time.monotonic() - t2
            split_info[name] = _split_stats(rows, seqs, files)
            del rows
        total_train = float(train_res.sum())
        w_active = sum(d.weight for d in data if d.weight > 0)
        sources_info = []
        for i, d in enumerate(data):
            e = _source_entry(d)
            e.update({
                "records_used": len(used[i]),
                "residues_used": int(sum(len(s) for s in used[i])),
                "residues_dropped_by_mixing": int(avail[i] - sum(len(s) for s in used[i])),
                "train_residues": int(train_res[i]),
                "val_residues": int(val_res[i]),
                "target_share": (d.weight / w_active) if d.weight > 0 else 0.0,
                "train_share": round(float(train_res[i] / total_train), 6) if total_train else 0.0,
            })
            if ood_clusters is not None:
                e["held_out_ood_records"] = d.held_out
                e["held_out_ood_residues"] = d.held_out_residues
            sources_info.append(e)
        all_data = data + ([ood_data] if ood_data else [])
        manifest = {
            "format_version": FORMAT_VERSION,
            "tokenizer": TOKENIZER,
            "vocab_size": VOCAB_SIZE,
            "seq_len": seq_len,
            "settings": {"seed": seed, "val_fraction": val_fraction, "val_min": val_min,
                         "on_invalid": on_invalid, "rows_per_shard": rows_per_shard},
            "sources": sources_info,
            "ood": ood_info,
            "splits": split_info,
            "totals": {
                "records": sum(d.records for d in all_data),
                "records_rejected": sum(d.n_rejected for d in all_data),
                "duplicates_dropped": sum(d.duplicates + d.overlap_with_sources for d in all_data),
                "unique_sequences": len(seen) + (len(ood_data.seqs) if ood_data else 0),
                "sequences": sum(s["sequences"] for s in split_info.values()),
                "residues": sum(s["residues"] for s in split_info.values()),
                "tokens": sum(s["tokens"] for s in split_info.values()),
                "rows": sum(s["rows"] for s in split_info.values()),
            },
        }
        manifest["hash"] = manifest_hash(manifest)
        (tmp / shards.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _install(tmp, out, overwrite)
    except OSError as exc:  # disk full, permissions, ...: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out}: cannot write the dataset: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # In memory only (not in the file, not in the hash): wall time per stage.
    manifest["_run"] = {"elapsed_s": time.monotonic() - t0, "stages_s": timings}
    return manifest


def _source_entry(d: _SourceData, include_mix: bool = True) -> dict:
    e = {
        "path": d.display,
        "sha256": d.sha256,
        "bytes": d.bytes,
        "records": d.records,
        "residues": d.residues,
        "duplicates_dropped": d.duplicates,
        "duplicate_residues_dropped": d.duplicate_residues,
        "records_rejected": d.n_rejected,
        "rejected_by_kind": dict(sorted(d.rejected.items())),
        "rejected_first": list(d.first_problems),
        "unique_records": len(d.seqs) + d.held_out,
        "unique_residues": int(sum(len(s) for s in d.seqs)) + d.held_out_residues,
    }
    if include_mix:
        e = {"path": e.pop("path"), "weight": d.weight, **e}
    return e


def _validate_args(srcs, out, ood, ood_clusters, min_seq_id, val_fraction, val_min, seq_len, on_invalid,
                   overwrite) -> None:
    if not srcs:
        raise UserError("no sources given (--source PATH[:WEIGHT])")
    for s in srcs:
        if not (math.isfinite(s.weight) and s.weight >= 0):
            raise UserError(f"{s.path}: weight must be a finite number >= 0, got {s.weight}")
    if not any(s.weight > 0 for s in srcs):
        raise UserError("every source has weight 0")
    keys = [os.path.realpath(s.path) for s in srcs] + ([os.path.realpath(ood)] if ood is not None else [])
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
            raise UserError("--ood-clusters needs mmseqs (MMseqs2) on PATH; install it or give an OOD "
                            "source with --ood FILE")
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
