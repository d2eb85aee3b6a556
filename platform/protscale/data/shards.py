"""The packed-row shard format shared by ``data prepare`` (writer) and training (reader).

A prepared dataset is a directory::

    DIR/manifest.json               counts, input hashes, seq_len, ``hash`` (identifies the dataset)
    DIR/<split>/part-00000.parquet  split in {train, val, test}

Each Parquet row is one packed row of exactly ``seq_len`` tokens:

    tokens    fixed_size_binary(seq_len)  the token ids (one byte each) of ``<cls> residues <eos>`` of
                            consecutive sequences, cut at ``seq_len``; the last row of a split is
                            right-padded with ``<pad>``. (Format 2 stored ``list<uint8>``: the reader reads
                            both; a fixed-size column is written and read as one buffer, without the
                            per-token list levels that made it the largest cost of ``data prepare``.)
    seq_lens  list<int32>   lengths of the segments that make up the row, in order; they sum to the
                            number of real (non-pad) tokens. A sequence cut by a row boundary becomes
                            two segments. Attention and loss never cross a segment boundary.

``DIR`` is a local path or a URI (``file://``, ``s3://``, ``gs://``; see ``storage.locate``). Trials read a
split with ``SplitReader``: blocks of rows (Parquet row groups) on demand through a small bounded cache,
so memory and start-up time do not grow with the corpus. ``read_split`` loads a whole split into memory;
it is for small uses (tests, data checks), never for a trial.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from .storage import locate

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


def shard_schema(seq_len: int) -> pa.Schema:
    return pa.schema([("tokens", pa.binary(seq_len)), ("seq_lens", pa.list_(pa.int32()))])


@dataclass
class PackedRows:
    """All rows of one split in memory: ``tokens`` is (rows, seq_len) uint8."""

    tokens: np.ndarray
    seq_lens: list[np.ndarray]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens."""
        return int(sum(int(s.sum()) for s in self.seq_lens))


def pack(sequences: Iterable[np.ndarray], seq_len: int) -> PackedRows:
    """Concatenate tokenised sequences and cut the stream into rows of ``seq_len`` (see ``packing.py``)."""
    from .packing import pack as _pack

    return _pack(sequences, seq_len)


def write_split(root: Path, split: str, rows: PackedRows, rows_per_shard: int = 8192) -> list[str]:
    """Write one split as Parquet shards under a local ``root/split``; returns the relative file names."""
    import pyarrow.fs as _fs

    from .packing import write_shard

    (Path(root) / split).mkdir(parents=True, exist_ok=True)
    names = []
    for i, start in enumerate(range(0, max(len(rows), 1), rows_per_shard)):
        part = PackedRows(rows.tokens[start:start + rows_per_shard], rows.seq_lens[start:start + rows_per_shard])
        names.append(f"{split}/part-{i:05d}.parquet")
        write_shard(_fs.LocalFileSystem(), str(Path(root).resolve() / names[-1]), part)
    return names


def read_split(root: str | Path, split: str) -> PackedRows:
    """Load every row of a split into memory (small datasets only: tests, data checks)."""
    reader = SplitReader(root, split)
    if reader.n_rows == 0:
        return PackedRows(np.zeros((0, 0), dtype=np.uint8), [])
    blocks = [reader.block(b) for b in range(reader.n_blocks)]
    tokens = np.concatenate([blk.tokens for blk in blocks])
    return PackedRows(tokens, [lens for blk in blocks for lens in blk.row_seq_lens()])


# --- reading: paths and URIs, the manifest, blocks of rows on demand -------------------------------------

class DatasetError(UserError, FileNotFoundError):
    """A dataset that cannot be read as prepared (missing manifest or shards); the message says what to do."""


def read_manifest(root: str | Path) -> dict:
    """The dataset's ``manifest.json`` (written last by ``data prepare``: without it there is no dataset)."""
    loc = locate(root).join(MANIFEST)
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            manifest = json.loads(f.read())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        return manifest
    except ValueError as exc:        # truncated, binary or another program's JSON
        raise DatasetError(f"{root}: {MANIFEST} is corrupt ({str(exc).splitlines()[0][:120]}); prepare the "
                           "dataset again: protscale data prepare --help") from None
    except (FileNotFoundError, OSError) as exc:
        if isinstance(exc, FileNotFoundError) or "not found" in str(exc).lower() or "no such" in str(exc).lower():
            raise DatasetError(f"{root}: not a prepared dataset (no {MANIFEST}); run: protscale data prepare "
                               "--help") from None
        raise DatasetError(f"{root}: cannot read {MANIFEST}: {exc}") from None


@dataclass
class Block:
    """Consecutive packed rows (as read from a shard, or as ``packing.pack_flat`` makes them for one):
    ``tokens`` (rows, seq_len) uint8 and their segment lengths as one flat int32 array (``seg_lens``) with
    row boundaries ``seg_offsets`` (rows + 1)."""

    tokens: np.ndarray
    seg_lens: np.ndarray
    seg_offsets: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.seg_lens.nbytes + self.seg_offsets.nbytes

    def row_seq_lens(self) -> list[np.ndarray]:
        return np.split(self.seg_lens, self.seg_offsets[1:-1])


class SplitReader:
    """One split of a prepared dataset, read a block (a Parquet row group) at a time.

    Rows are numbered 0..n_rows-1 across the shards in manifest order. The rows of every shard come from
    the manifest (``splits[split]["shards"] = [{"file", "rows"}, ...]``); for datasets prepared before
    that entry existed, from the Parquet footers. A block is ``block_rows`` consecutive rows of one shard
    (the manifest's ``row_group_rows``, else the row-group size of the first shard: a block is normally one
    row group; the last block of a shard may be shorter). Nothing is held per row: memory is the block table (a few ints per block), the open
    file footers and a least-recently-used cache of at most ``cache_blocks`` decoded blocks.
    """

    def __init__(self, root: str | Path, split: str, cache_blocks: int = 16, manifest: dict | None = None):
        self.root, self.split, self.cache_blocks = str(root), split, cache_blocks
        self.manifest = manifest if manifest is not None else read_manifest(root)
        self.seq_len = int(self.manifest["seq_len"])
        loc = locate(root)
        self.fs, self.base = loc.fs, loc.path
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._cache: OrderedDict[int, Block] = OrderedDict()
        self.reads = 0                                   # blocks decoded (for tests and benchmarks)
        info = self.manifest.get("splits", {}).get(split)
        if info is None:
            raise DatasetError(f"{root}: the dataset has no {split!r} split (splits: "
                               f"{', '.join(self.manifest.get('splits', {})) or 'none'})")
        if "shards" in info:
            self.files = [s["file"] for s in info["shards"]]
            shard_rows = [int(s["rows"]) for s in info["shards"]]
        else:                                            # prepared before the manifest listed rows per shard
            self.files = list(info.get("files") or [])
            shard_rows = [self._file(i).metadata.num_rows for i in range(len(self.files))]
        if not self.files:
            raise DatasetError(f"{root}: the {split!r} split lists no shards; prepare the data again")
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)
        first = next((i for i, n in enumerate(shard_rows) if n), None)
        recorded = info.get("row_group_rows") or self.manifest.get("settings", {}).get("row_group_rows")
        self.block_rows = int(recorded or
                              (self._file(first).metadata.row_group(0).num_rows if first is not None else 1))
        per_shard = -(-self.shard_rows // self.block_rows)
        self.block_shard = np.repeat(np.arange(len(self.files)), per_shard)
        self.block_in_shard = np.concatenate([np.arange(n) for n in per_shard]) if len(per_shard) else per_shard
        self.block_len = np.minimum(self.block_rows,
                                    self.shard_rows[self.block_shard] - self.block_in_shard * self.block_rows)
        self.block_start = np.concatenate(([0], np.cumsum(self.block_len)))   # global row of each block

    @property
    def n_rows(self) -> int:
        return int(self.block_start[-1])

    @property
    def n_blocks(self) -> int:
        return len(self.block_len)

    def __len__(self) -> int:
        return self.n_rows

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.block_start, rows, side="right") - 1

    def block(self, b: int) -> Block:
        """Block ``b``, from the cache or read now (then the least recently used block is dropped)."""
        blk = self._cache.get(b)
        if blk is not None:
            self._cache.move_to_end(b)
            return blk
        blk = self._read_block(int(b))
        self._cache[b] = blk
        while len(self._cache) > max(1, self.cache_blocks):
            self._cache.popitem(last=False)
        return blk

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(tokens (len(rows), seq_len) uint8, per-row segment lengths) of global row ids, in order."""
        rows = np.asarray(rows, dtype=np.int64)
        blocks = self.block_of(rows)
        tokens = np.empty((rows.size, self.seq_len), dtype=np.uint8)
        lens: list[np.ndarray] = [None] * rows.size            # type: ignore[list-item]
        for b in np.unique(blocks):
            sel = np.flatnonzero(blocks == b)
            blk = self.block(int(b))
            local = rows[sel] - self.block_start[b]
            tokens[sel] = blk.tokens[local]
            for i, r in zip(sel, local):
                lens[i] = blk.seg_lens[blk.seg_offsets[r]:blk.seg_offsets[r + 1]]
        return tokens, lens

    def _file(self, i: int) -> pq.ParquetFile:
        f = self._files.get(i)
        if f is None:
            path = f"{self.base}/{self.files[i]}"
            try:
                f = pq.ParquetFile(self.fs.open_input_file(path))
            except FileNotFoundError:
                raise DatasetError(f"{self.root}: shard {self.files[i]} listed in the manifest is missing; "
                                   "prepare the data again") from None
            self._files[i] = f
            while len(self._files) > max(8, self.cache_blocks):     # a window's blocks may span files
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(i)
        return f

    def _read_block(self, b: int) -> Block:
        shard, start, n = int(self.block_shard[b]), int(self.block_in_shard[b]) * self.block_rows, int(self.block_len[b])
        f = self._file(shard)
        groups, first_row, at = [], None, 0
        for g in range(f.metadata.num_row_groups):
            rows = f.metadata.row_group(g).num_rows
            if at + rows > start and at < start + n:
                groups.append(g)
                first_row = at if first_row is None else first_row
            at += rows
        table = f.read_row_groups(groups, columns=["tokens", "seq_lens"]).slice(start - first_row, n)
        self.reads += 1
        tok = table.column("tokens").combine_chunks()
        lens = table.column("seq_lens").combine_chunks()
        if pa.types.is_fixed_size_binary(tok.type):
            tokens = np.frombuffer(tok.buffers()[1], dtype=np.uint8, count=n * self.seq_len,
                                   offset=tok.offset * self.seq_len).reshape(n, self.seq_len)
        else:                                            # format 2: list<uint8>
            tokens = tok.flatten().to_numpy(zero_copy_only=False).astype(np.uint8, copy=False).reshape(n, self.seq_len)
        seg_lens = lens.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        seg_offsets = np.concatenate(([0], np.cumsum(lens.value_lengths().to_numpy(zero_copy_only=False))))
        return Block(tokens, seg_lens, seg_offsets.astype(np.int64))
