"""The ESM-2 alphabet, so that trained MLMs map one-to-one onto ``EsmForMaskedLM`` vocabularies.

Every sequence becomes ``<cls> residues <eos>``; packed rows are padded with ``<pad>``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Order is ESM-2's (fair-esm ``Alphabet.from_architecture("ESM-1b")``): ids are part of the format.
TOKENS: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O",
    ".", "-",
    "<null_1>", "<mask>",
)
VOCAB_SIZE = len(TOKENS)
TOKEN_ID = {t: i for i, t in enumerate(TOKENS)}
CLS, PAD, EOS, UNK, MASK = (TOKEN_ID[t] for t in ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>"))

STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
# IUPAC protein letters accepted in FASTA input (the 20 standard + ambiguity/rare codes) and gap symbols.
VALID_RESIDUES = frozenset(STANDARD_AMINO_ACIDS + "XBUZO" + ".-")
# Ids that are residues (everything MLM may mask and that counts as a residue token).
RESIDUE_IDS = np.array([TOKEN_ID[c] for c in STANDARD_AMINO_ACIDS + "XBUZO"], dtype=np.int64)

# Byte -> token id lookup; 255 marks an invalid byte.
_LUT = np.full(256, 255, dtype=np.uint8)
for _c in VALID_RESIDUES:
    _LUT[ord(_c)] = TOKEN_ID[_c]
    _LUT[ord(_c.lower())] = TOKEN_ID[_c]


def encode_flat(residues: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one tokeniser: ``<cls> residues <eos>`` of every (already validated) sequence, concatenated.

    ``residues``: the sequences' letters back to back (uint8); ``lengths``: residues per sequence. Returns
    (uint8 token stream, int64 tokens per sequence), by one table lookup over all the bytes."""
    lengths = np.asarray(lengths, dtype=np.int64)
    tok_lens = lengths + 2
    ends = np.cumsum(tok_lens)
    stream = np.empty(int(ends[-1]) if ends.size else 0, dtype=np.uint8)
    if not ends.size:
        return stream, tok_lens
    starts = ends - tok_lens
    body = np.ones(stream.size, dtype=bool)
    body[starts] = False
    body[ends - 1] = False
    stream[body] = _LUT[np.asarray(residues, dtype=np.uint8)]
    stream[starts] = CLS
    stream[ends - 1] = EOS
    return stream, tok_lens


def encode_many(seqs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``encode_flat`` of a list of residue strings."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    return encode_flat(np.frombuffer(b"".join(seqs), dtype=np.uint8), lengths)


def encode(residues: str) -> np.ndarray:
    """``<cls> residues <eos>`` as uint8 ids. Raises ValueError naming the first invalid character."""
    raw = np.frombuffer(residues.encode("ascii", errors="replace"), dtype=np.uint8)
    bad = np.flatnonzero(_LUT[raw] == 255)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"invalid residue {residues[i]!r} at position {i + 1}")
    return encode_many([raw.tobytes()])[0].copy()


def decode(ids) -> str:
    return "".join(TOKENS[int(i)] for i in ids)
