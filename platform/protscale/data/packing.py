"""Tokenised sequences -> packed rows -> one Parquet shard: the writer side of ``shards.py``'s format.

One implementation serves everyone: ``pack`` (token arrays, as the model tests build them) and data
preparation (``tokenise_pack`` on raw residue bytes) both end in ``pack_tokens``, which cuts the
concatenated token stream with array operations rather than a Python loop per sequence.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .shards import SCHEMA, PackedRows
from .tokenizer import PAD, encode_many

# Rows per Parquet row group: the unit a trial reads on demand (1 MiB of tokens at seq_len 1024).
ROW_GROUP_ROWS = 1024


def pack_tokens(stream: np.ndarray, lengths: np.ndarray, seq_len: int) -> PackedRows:
    """Cut ``stream`` (sequences of ``lengths`` tokens, concatenated) into rows of ``seq_len``; no token is
    dropped, the last row is right-padded. A sequence crossing a row boundary becomes two segments."""
    total = int(stream.size)
    n_rows = -(-total // seq_len)
    tokens = np.full(n_rows * seq_len, PAD, dtype=np.uint8)
    tokens[:total] = stream
    if total == 0:
        return PackedRows(tokens.reshape(0, seq_len), [])
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    cuts = np.union1d(ends, np.arange(seq_len, total, seq_len, dtype=np.int64))  # sorted, unique
    starts = np.concatenate(([0], cuts[:-1]))
    seg = (cuts - starts).astype(np.int32)
    per_row = np.bincount(starts // seq_len, minlength=n_rows)
    return PackedRows(tokens.reshape(n_rows, seq_len), np.split(seg, np.cumsum(per_row)[:-1]))


def pack(sequences: Iterable[np.ndarray], seq_len: int) -> PackedRows:
    """Pack already tokenised sequences (``tokenizer.encode`` outputs)."""
    seqs = [np.asarray(s, dtype=np.uint8) for s in sequences]
    stream = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.uint8)
    return pack_tokens(stream, np.array([s.size for s in seqs], dtype=np.int64), seq_len)


def tokenise_pack(seqs: Sequence[bytes], seq_len: int) -> PackedRows:
    """Validated residue strings -> packed rows."""
    stream, lengths = encode_many(seqs)
    return pack_tokens(stream, lengths, seq_len)


def shard_table(rows: PackedRows) -> pa.Table:
    """``rows`` as a table of ``shards.SCHEMA``, built from flat buffers (no per-row Python objects)."""
    n, seq_len = rows.tokens.shape
    tok_offsets = pa.array(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32))
    tokens = pa.ListArray.from_arrays(tok_offsets, pa.array(rows.tokens.reshape(-1), type=pa.uint8()))
    counts = np.fromiter((s.size for s in rows.seq_lens), dtype=np.int32, count=n)
    seg_offsets = pa.array(np.concatenate(([0], np.cumsum(counts))).astype(np.int32))
    flat = np.concatenate(rows.seq_lens).astype(np.int32) if n else np.zeros(0, np.int32)
    seq_lens = pa.ListArray.from_arrays(seg_offsets, pa.array(flat, type=pa.int32()))
    return pa.Table.from_arrays([tokens, seq_lens], schema=SCHEMA)


def write_shard(fs, path: str, rows: PackedRows, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Write ``rows`` as one zstd Parquet file at ``path`` of the pyarrow filesystem ``fs``."""
    pq.write_table(shard_table(rows), path, filesystem=fs, compression="zstd", row_group_size=row_group_rows)
