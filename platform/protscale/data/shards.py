"""The packed-row shard format shared by ``data prepare`` (writer) and training (reader).

A prepared dataset is a directory::

    DIR/manifest.json               counts, input hashes, seq_len, ``hash`` (identifies the dataset)
    DIR/<split>/part-00000.parquet  split in {train, val, test}

Each Parquet row is one packed row of exactly ``seq_len`` tokens:

    tokens    list<uint8>   ``<cls> residues <eos>`` of consecutive sequences, cut at ``seq_len``; the
                            last row of a split is right-padded with ``<pad>``
    seq_lens  list<int32>   lengths of the segments that make up the row, in order; they sum to the
                            number of real (non-pad) tokens. A sequence cut by a row boundary becomes
                            two segments. Attention and loss never cross a segment boundary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .tokenizer import PAD

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
SCHEMA = pa.schema([("tokens", pa.list_(pa.uint8())), ("seq_lens", pa.list_(pa.int32()))])


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
    """Concatenate tokenised sequences and cut the stream into rows of ``seq_len`` (no token dropped)."""
    rows: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    buf = np.full(seq_len, PAD, dtype=np.uint8)
    fill, cur = 0, []
    for seq in sequences:
        start = 0
        while start < seq.size:
            take = min(seq_len - fill, seq.size - start)
            buf[fill:fill + take] = seq[start:start + take]
            cur.append(take)
            fill += take
            start += take
            if fill == seq_len:
                rows.append(buf)
                lens.append(np.asarray(cur, dtype=np.int32))
                buf, fill, cur = np.full(seq_len, PAD, dtype=np.uint8), 0, []
    if fill:
        rows.append(buf)
        lens.append(np.asarray(cur, dtype=np.int32))
    tokens = np.stack(rows) if rows else np.zeros((0, seq_len), dtype=np.uint8)
    return PackedRows(tokens, lens)


def write_split(root: Path, split: str, rows: PackedRows, rows_per_shard: int = 8192) -> list[str]:
    """Write one split as Parquet shards under ``root/split``; returns the relative file names."""
    out = Path(root) / split
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, start in enumerate(range(0, max(len(rows), 1), rows_per_shard)):
        stop = min(start + rows_per_shard, len(rows))
        flat = pa.array(rows.tokens[start:stop].reshape(-1), type=pa.uint8())
        offsets = pa.array(np.arange(0, (stop - start + 1) * rows.seq_len, rows.seq_len, dtype=np.int32))
        tokens = pa.ListArray.from_arrays(offsets, flat)
        seq_lens = pa.array([s.tolist() for s in rows.seq_lens[start:stop]], type=pa.list_(pa.int32()))
        name = f"{split}/part-{i:05d}.parquet"
        pq.write_table(pa.Table.from_arrays([tokens, seq_lens], schema=SCHEMA), Path(root) / name,
                       compression="zstd")
        names.append(name)
    return names


def read_split(root: str | Path, split: str) -> PackedRows:
    """Load every shard of a split. Raises FileNotFoundError with what to run when it is missing."""
    root = Path(root)
    files = sorted((root / split).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"{root / split}: no Parquet shards; prepare the data first: protscale data prepare --help")
    tables = [pq.read_table(f, schema=SCHEMA) for f in files]
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        return PackedRows(np.zeros((0, 0), dtype=np.uint8), [])
    tok_col = table.column("tokens").combine_chunks()
    seq_len = len(tok_col[0])
    tokens = tok_col.values.to_numpy(zero_copy_only=False).reshape(-1, seq_len)
    seq_lens = [np.asarray(x, dtype=np.int32) for x in table.column("seq_lens").to_pylist()]
    return PackedRows(tokens.astype(np.uint8, copy=False), seq_lens)


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not a prepared dataset (no {MANIFEST}); run: protscale data prepare --help")
    return json.loads(path.read_text())
