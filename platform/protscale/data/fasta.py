"""Streaming FASTA / FASTA.gz reader with validation.

* gzip is detected by its magic bytes, not by the file name; the text is decompressed in chunks.
* Records may span any number of lines; whitespace inside sequence lines is ignored; residues are
  case-insensitive and come out upper-case.
* Every problem is located as ``FILE:LINE`` (1-based; the line of the offending character, or of the
  header for record-level problems).

The reader works on whole records found with ``bytes.split(b"\\n>")`` and ``bytes.translate`` rather than
per line or per character, which keeps it near the speed of decompression.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from ..errors import UserError
from .tokenizer import VALID_RESIDUES

try:  # ISA-L's gzip reader (package ``isal``): the same format, about 3x faster to decompress
    from isal import igzip as _gzip
    from isal.isal_zlib import error as _GzipError
except ImportError:  # pragma: no cover - isal is a dependency; the standard library reads the same files
    _gzip, _GzipError = gzip, zlib.error

GZIP_MAGIC = b"\x1f\x8b"
_OTHER_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip",
                b"PAR1": "Parquet"}
_WHITESPACE = b" \t\r\n\v\f"
# Everything accepted in a sequence line, both cases, plus whitespace (removed separately).
_ACCEPTED = bytes(sorted({ord(c) for c in VALID_RESIDUES} | {ord(c.lower()) for c in VALID_RESIDUES}))
_ACCEPTED_WS = _ACCEPTED + _WHITESPACE
_ALPHABET_TEXT = "IUPAC protein letters ACDEFGHIKLMNPQRSTVWY, XBUZO and gaps '.' '-'"
CHUNK_SIZE = 1 << 22


class FastaError(UserError):
    """Bad input that stops the run (one line, no traceback)."""


@dataclass(frozen=True)
class Problem:
    """An invalid record (or stray data) at ``path:line``."""

    path: str
    line: int
    message: str
    kind: str  # "invalid character" | "empty sequence" | "malformed header"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class Record:
    id: str
    seq: bytes  # upper-case residues, validated
    line: int  # line of the header


def _describe_byte(b: int) -> str:
    if 32 < b < 127:
        return repr(chr(b))
    return f"byte 0x{b:02x}"


class Digest:
    """The sha256 and size of the raw bytes (compressed, as stored) seen by a reader, filled as it reads."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.bytes = 0

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self.bytes += len(data)

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()


class _Raw(io.RawIOBase):
    """A file object over ``fh`` that feeds every byte read into ``digest``; ``head`` was read already."""

    def __init__(self, fh, head: bytes, digest: Digest):
        self._fh, self._head, self._digest = fh, head, digest
        digest.update(head)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._fh.read(len(b))
        self._digest.update(data)
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._fh.close()
        finally:
            super().close()


def open_fasta(path: str | Path, fs=None, digest: Digest | None = None) -> BinaryIO:
    """Open a FASTA file (local path, or ``path`` in the pyarrow filesystem ``fs``), transparently
    decompressing gzip. Raises FastaError with a one-line reason."""
    name = str(path)
    try:
        if fs is None:
            raw = open(Path(path), "rb")
        else:
            import pyarrow.fs as pafs

            info = fs.get_file_info(str(path))
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(name)
            if info.type == pafs.FileType.Directory:
                raise IsADirectoryError(name)
            raw = fs.open_input_stream(str(path))
    except FileNotFoundError:
        raise FastaError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise FastaError(f"{name}: is a directory, not a FASTA file") from None
    except PermissionError:
        raise FastaError(f"{name}: permission denied") from None
    except OSError as exc:
        raise FastaError(f"{name}: cannot open: {exc.strerror or str(exc).splitlines()[0]}") from None
    try:
        head = raw.read(8)
    except OSError as exc:
        raw.close()
        raise FastaError(f"{name}: cannot read: {exc.strerror or exc}") from None
    for magic, kind in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raw.close()
            raise FastaError(f"{name}: looks like {kind} data; expected FASTA text or gzip-compressed FASTA")
    stream = io.BufferedReader(_Raw(raw, head, digest or Digest()), buffer_size=CHUNK_SIZE)
    if head.startswith(GZIP_MAGIC):
        return _gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    return stream  # type: ignore[return-value]


def _chunks(path: str, fh: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    gz = isinstance(fh, (gzip.GzipFile, _gzip.GzipFile))
    while True:
        try:
            block = fh.read(chunk_size)
        except (EOFError, zlib.error, _GzipError, gzip.BadGzipFile) as exc:
            raise FastaError(f"{path}: corrupt gzip data ({exc})") from None
        except OSError as exc:
            what = "corrupt gzip data" if gz else "read error"
            raise FastaError(f"{path}: {what} ({exc.strerror or exc})") from None
        if not block:
            return
        yield block


def _raise(problem: Problem) -> None:
    hint = "" if problem.kind == "empty file" else " (or drop such records with --on-invalid skip)"
    raise FastaError(f"{problem}{hint}")


def _runs(name: str, fh: BinaryIO, chunk_size: int, report: Callable[[Problem], None]) -> Iterator[tuple[bytes, int]]:
    """``(run, line)``: the file's records as runs of whole records joined by ``b"\\n>"`` (the first record's
    own ``'>'`` stripped, so ``run.split(b"\\n>")`` gives the record texts), and the line of the run's first
    header. Text before the first header is checked here (it must be blank)."""
    line = 1  # line number of the header that starts ``pending`` (once the first header was seen)
    started = False
    pending = b"\n"  # before the first header: an artificial newline, so the first '>' matches b"\n>"
    for block in _chunks(name, fh, chunk_size):
        pending += block
        cut = pending.rfind(b"\n>")
        if cut < 0:
            if not started and len(pending) > chunk_size and pending.strip(_WHITESPACE):
                raise FastaError(f"{name}: not FASTA: no '>' header in the first {len(pending) >> 10} KiB")
            continue
        # Complete records end at the last "\n>"; the text after it starts with a header.
        run, pending = pending[:cut], pending[cut + 2:]
        if not started:
            k = run.find(b"\n>")
            line, started = _preamble(name, run if k < 0 else run[:k], report), True
            if k < 0:
                continue
            run = run[k + 2:]
        yield run, line
        line += run.count(b"\n") + 1  # the run's newlines and the one of the "\n>" cut after it
    if not started:  # no header at all: everything is preamble
        _preamble(name, pending, report)
    else:
        yield pending, line


def read_fasta(path: str | Path, on_invalid: Callable[[Problem], None] | None = None,
               chunk_size: int = CHUNK_SIZE, *, fs=None, digest: Digest | None = None,
               name: str | None = None) -> Iterator[Record]:
    """Yield the valid records of ``path`` in order.

    Each invalid record is passed to ``on_invalid`` (default: raise FastaError) and not yielded; a callback
    that returns normally skips it. ``fs``: a pyarrow filesystem holding ``path`` (default: local);
    ``digest`` collects the sha256 of the raw bytes; ``name``: the file in messages (default ``path``).
    """
    report = on_invalid or _raise
    name = name or str(path)
    with open_fasta(path, fs, digest) as fh:
        for run, line in _runs(name, fh, chunk_size, report):
            yield from _run_records(name, run, line, report)


def _run_records(name: str, run: bytes, line: int, report: Callable[[Problem], None]) -> Iterator[Record]:
    for text in run.split(b"\n>"):
        rec = _record(name, text, line, report)
        line += text.count(b"\n") + 1
        if rec is not None:
            yield rec


# --- whole blocks of records at once ---------------------------------------------------------------------

@dataclass
class SeqBlock:
    """Consecutive valid records as flat arrays: ``residues`` (uint8, upper-case letters, concatenated) and
    ``offsets`` (int64, records + 1): record ``i`` is ``residues[offsets[i]:offsets[i + 1]]``."""

    residues: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return self.offsets.size - 1

    @classmethod
    def from_seqs(cls, seqs: list[bytes]) -> "SeqBlock":
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs)), out=offsets[1:])
        return cls(np.frombuffer(b"".join(seqs), dtype=np.uint8), offsets)

    def seqs(self) -> list[bytes]:
        data, off = self.residues.tobytes(), self.offsets.tolist()
        return [data[a:b] for a, b in zip(off[:-1], off[1:])]


# Byte -> upper-case residue; 0 for whitespace (dropped); 255 for anything not allowed in a sequence line.
_UPPER = np.full(256, 255, dtype=np.uint8)
for _b in _ACCEPTED:
    _UPPER[_b] = ord(chr(_b).upper())
for _b in _WHITESPACE:
    _UPPER[_b] = 0
_IS_SPACE = _UPPER == 0


def read_fasta_blocks(path: str | Path, on_invalid: Callable[[Problem], None] | None = None,
                      chunk_size: int = CHUNK_SIZE, *, fs=None, digest: Digest | None = None,
                      name: str | None = None) -> Iterator[SeqBlock]:
    """The valid records of ``path`` in order, as ``SeqBlock``s of about ``chunk_size`` text bytes each.

    Same records, validation and ``FILE:LINE`` messages as ``read_fasta``: a block is parsed with array
    operations over all its bytes at once; a block holding any problem is parsed again record by record,
    which reports the problem exactly (or skips the record, as ``on_invalid`` says)."""
    report = on_invalid or _raise
    name = name or str(path)
    with open_fasta(path, fs, digest) as fh:
        for run, line in _runs(name, fh, chunk_size, report):
            blk = _parse_run(run)
            if blk is None:
                blk = SeqBlock.from_seqs([rec.seq for rec in _run_records(name, run, line, report)])
            if len(blk):
                yield blk


def _parse_run(run: bytes) -> SeqBlock | None:
    """The records of ``run`` (see ``_runs``) with array operations; None when any record has a problem
    (an invalid character, an empty sequence, a header without identifier), for the exact path to report."""
    a = np.frombuffer(run, dtype=np.uint8)
    nl = np.flatnonzero(a == 10)
    after = nl[nl + 1 < a.size] + 1
    hs = np.concatenate(([0], after[a[after] == 62]))  # header starts: 0 and every '>' after a newline
    j = np.searchsorted(nl, hs)
    if j[-1] >= nl.size:
        return None  # the last header has no sequence line
    he = nl[j]  # the newline ending each header
    text0 = hs + (hs > 0)  # the header text after its '>' (the first record's '>' was stripped)
    if (text0 >= he).any() or _IS_SPACE[a[text0]].any():
        return None  # an empty header (or one starting with a blank): the exact path decides
    u = _UPPER[a]
    hl = he - hs
    u[np.repeat(hs - (np.cumsum(hl) - hl), hl) + np.arange(int(hl.sum()))] = 0  # blank the header lines
    if u.max() == 255:
        return None  # an invalid character somewhere
    keep = u != 0
    counts = np.add.reduceat(keep, hs, dtype=np.int64)
    if not counts.all():
        return None  # an empty sequence
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return SeqBlock(u[keep], offsets)


def _preamble(path: str, text: bytes, report: Callable[[Problem], None]) -> int:
    """Text before the first header: must be blank. Returns the line number of the first header.

    ``text`` is empty when the file starts with '>', else the artificial newline plus the lines before the
    first header (without the newline that ends the last of them).
    """
    if not text:
        return 1
    body = text[1:]
    if body.strip(_WHITESPACE):
        off = len(body) - len(body.lstrip(_WHITESPACE))
        ln = 1 + body.count(b"\n", 0, off)
        report(Problem(path, ln, "malformed FASTA: data before the first '>' header"
                       + (" (is this a FASTA file?)" if ln == 1 else ""), "malformed header"))
    return body.count(b"\n") + 2


def _record(path: str, text: bytes, line: int, report: Callable[[Problem], None]) -> Record | None:
    """``text`` is one record without its leading '>'; ``line`` is its header's line number."""
    nl = text.find(b"\n")
    header, body = (text, b"") if nl < 0 else (text[:nl], text[nl + 1:])
    header = header.strip(_WHITESPACE)
    if not header:
        report(Problem(path, line, "malformed header: empty '>' line (no identifier)", "malformed header"))
        return None
    rid = header.split(None, 1)[0].decode("utf-8", "replace")
    bad = body.translate(None, _ACCEPTED_WS)
    if bad:
        idx = body.find(bad[:1])
        ln = line + 1 + body.count(b"\n", 0, idx)
        col = idx - (body.rfind(b"\n", 0, idx) + 1) + 1
        what = "'>' inside a sequence line" if bad[0] == ord(">") else f"invalid character {_describe_byte(bad[0])}"
        report(Problem(path, ln, f"{what} at column {col} in record >{rid}; allowed: {_ALPHABET_TEXT}",
                       "invalid character"))
        return None
    seq = body.translate(None, _WHITESPACE).upper()
    if not seq:
        report(Problem(path, line, f"empty sequence in record >{rid}", "empty sequence"))
        return None
    return Record(rid, seq, line)
