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


# ``bytes.translate`` table: residue letters (either case) to ids, plus two sentinel bytes that become
# <cls> and <eos>, so that one C-level pass tokenises many sequences at once.
_CLS_BYTE, _EOS_BYTE = b"\x00", b"\x01"
_TABLE = bytearray(range(256))
for _c in VALID_RESIDUES:
    _TABLE[ord(_c)] = _TABLE[ord(_c.lower())] = TOKEN_ID[_c]
_TABLE[_CLS_BYTE[0]], _TABLE[_EOS_BYTE[0]] = CLS, EOS
_TABLE = bytes(_TABLE)


def encode_many(seqs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``<cls> residues <eos>`` of every (already validated) sequence, concatenated: (uint8 token stream,
    int64 tokens per sequence). The one tokeniser: ``encode`` and data preparation both use it."""
    lengths = np.fromiter((len(s) + 2 for s in seqs), dtype=np.int64, count=len(seqs))
    if not len(seqs):
        return np.zeros(0, dtype=np.uint8), lengths
    text = _CLS_BYTE + (_EOS_BYTE + _CLS_BYTE).join(seqs) + _EOS_BYTE
    return np.frombuffer(text.translate(_TABLE), dtype=np.uint8), lengths


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
