"""Tokenised sequences -> packed rows -> one Parquet shard: the writer side of ``shards.py``'s format.

One implementation serves everyone: ``pack`` (token arrays, as the model tests build them) and data
preparation (``tokenise_pack`` on raw residue bytes) both end in ``pack_flat``, which cuts the
concatenated token stream with array operations rather than a Python loop per sequence.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .shards import Block, PackedRows, shard_schema
from .tokenizer import PAD, encode_flat

# Rows per Parquet row group: the unit a trial reads on demand (1 MiB of tokens at seq_len 1024).
ROW_GROUP_ROWS = 1024


def pack_flat(stream: np.ndarray, lengths: np.ndarray, seq_len: int) -> Block:
    """Cut ``stream`` (sequences of ``lengths`` tokens, concatenated) into rows of ``seq_len``; no token is
    dropped, the last row is right-padded. A sequence crossing a row boundary becomes two segments.
    Returns the rows as flat arrays (``shards.Block``: tokens, segment lengths, per-row segment offsets)."""
    total = int(stream.size)
    n_rows = -(-total // seq_len)
    tokens = np.full(n_rows * seq_len, PAD, dtype=np.uint8)
    tokens[:total] = stream
    if total == 0:
        return Block(tokens.reshape(0, seq_len), np.zeros(0, np.int32), np.zeros(1, np.int64))
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    cuts = np.union1d(ends, np.arange(seq_len, total, seq_len, dtype=np.int64))  # sorted, unique
    starts = np.concatenate(([0], cuts[:-1]))
    seg = (cuts - starts).astype(np.int32)
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(starts // seq_len, minlength=n_rows), out=offsets[1:])
    return Block(tokens.reshape(n_rows, seq_len), seg, offsets)


def pack_tokens(stream: np.ndarray, lengths: np.ndarray, seq_len: int) -> PackedRows:
    """``pack_flat`` with one array of segment lengths per row."""
    blk = pack_flat(stream, lengths, seq_len)
    return PackedRows(blk.tokens, blk.row_seq_lens() if len(blk.tokens) else [])


def pack(sequences: Iterable[np.ndarray], seq_len: int) -> PackedRows:
    """Pack already tokenised sequences (``tokenizer.encode`` outputs)."""
    seqs = [np.asarray(s, dtype=np.uint8) for s in sequences]
    stream = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.uint8)
    return pack_tokens(stream, np.array([s.size for s in seqs], dtype=np.int64), seq_len)


def tokenise_pack(residues: np.ndarray, lengths: np.ndarray, seq_len: int) -> Block:
    """Validated residues (letters back to back, ``lengths`` per sequence) -> packed rows."""
    stream, tok_lens = encode_flat(residues, lengths)
    return pack_flat(stream, tok_lens, seq_len)


def shard_table(rows: PackedRows | Block) -> pa.Table:
    """``rows`` as a table of ``shards.shard_schema``, built from flat buffers (no per-row Python objects)."""
    if isinstance(rows, PackedRows):
        n = len(rows)
        counts = np.fromiter((s.size for s in rows.seq_lens), dtype=np.int64, count=n)
        offsets = np.concatenate(([0], np.cumsum(counts)))
        flat = np.concatenate(rows.seq_lens).astype(np.int32) if n else np.zeros(0, np.int32)
        rows = Block(rows.tokens, flat, offsets)
    n, seq_len = rows.tokens.shape
    tokens = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(seq_len), n, [None, pa.py_buffer(np.ascontiguousarray(rows.tokens, dtype=np.uint8))])
    seq_lens = pa.ListArray.from_arrays(pa.array(rows.seg_offsets.astype(np.int32)),
                                        pa.array(rows.seg_lens.astype(np.int32, copy=False), type=pa.int32()))
    return pa.Table.from_arrays([tokens, seq_lens], schema=shard_schema(seq_len))


def write_shard(fs, path: str, rows: PackedRows | Block, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Write ``rows`` as one zstd Parquet file at ``path`` of the pyarrow filesystem ``fs`` (no dictionary
    and no statistics: neither helps a column of whole token rows, and both cost time)."""
    pq.write_table(shard_table(rows), path, filesystem=fs, compression="zstd", row_group_size=row_group_rows,
                   use_dictionary=False, write_statistics=False)
