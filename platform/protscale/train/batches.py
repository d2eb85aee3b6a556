"""From packed rows to model inputs: segment ids, positions, CLM/MLM labels, and the row schedule.

The schedule is a pure function of (seed, step): step s uses rows [(s-1)·B, s·B) of an endless stream
of per-epoch permutations, and rank r takes every world-th of them. A trial resumed at step k therefore
sees exactly the rows it would have seen without the interruption, at any world size.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.shards import PackedRows
from ..data.tokenizer import MASK, PAD, RESIDUE_IDS
from ..model.transformer import IGNORE_INDEX

MASK_RATIO = 0.15          # of residue tokens; of those 80% -> <mask>, 10% -> random residue, 10% kept


def segment_ids(seq_lens: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids, pos_ids), each (rows, seq_len) int64. Padding forms one extra segment per row."""
    doc = np.empty((len(seq_lens), seq_len), dtype=np.int64)
    pos = np.empty_like(doc)
    for i, lens in enumerate(seq_lens):
        pad = seq_len - int(lens.sum())
        full = np.append(lens, pad) if pad else lens
        doc[i] = np.repeat(np.arange(full.size), full)
        starts = np.repeat(np.cumsum(full) - full, full)
        pos[i] = np.arange(seq_len) - starts
    return doc, pos


def clm_labels(tokens: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
    """Next token within the same segment; IGNORE at segment ends and on padding."""
    tokens = tokens.astype(np.int64)          # uint8 would wrap IGNORE_INDEX (-100) to 156
    labels = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
    same = doc_ids[:, 1:] == doc_ids[:, :-1]
    labels[:, :-1] = np.where(same, tokens[:, 1:], IGNORE_INDEX)
    labels[tokens == PAD] = IGNORE_INDEX
    return labels


def mlm_inputs(tokens: np.ndarray, rng: np.random.Generator, ratio: float = MASK_RATIO):
    """BERT/ESM masking of residue tokens: returns (inputs, labels)."""
    tokens = tokens.astype(np.int64)          # uint8 would wrap IGNORE_INDEX (-100) to 156
    is_residue = np.isin(tokens, RESIDUE_IDS)
    chosen = is_residue & (rng.random(tokens.shape) < ratio)
    labels = np.where(chosen, tokens, IGNORE_INDEX)
    inputs = tokens.copy()
    roll = rng.random(tokens.shape)
    inputs[chosen & (roll < 0.8)] = MASK
    randomize = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[randomize] = rng.choice(RESIDUE_IDS, size=int(randomize.sum()))
    return inputs, labels


class Batches:
    """Deterministic batches of one split for one objective."""

    def __init__(self, rows: PackedRows, objective: str, seed: int):
        self.rows, self.objective, self.seed = rows, objective, seed
        self.doc_ids, self.pos_ids = segment_ids(rows.seq_lens, rows.seq_len)
        self.row_tokens = np.array([int(s.sum()) for s in rows.seq_lens], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def schedule(self, step: int, global_rows: int) -> np.ndarray:
        """Row indices of optimizer step ``step`` (1-based), all ranks together."""
        n = len(self.rows)
        start = (step - 1) * global_rows
        idx = np.arange(start, start + global_rows)
        out = np.empty(global_rows, dtype=np.int64)
        for epoch in np.unique(idx // n):
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            sel = idx // n == epoch
            out[sel] = perm[idx[sel] % n]
        return out

    def make(self, rows: np.ndarray, mask_seed: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
        tokens = self.rows.tokens[rows]
        doc_ids, pos_ids = self.doc_ids[rows], self.pos_ids[rows]
        if self.objective == "clm":
            inputs, labels = tokens.astype(np.int64), clm_labels(tokens, doc_ids)
        else:
            inputs, labels = mlm_inputs(tokens, np.random.default_rng(list(mask_seed)))
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)  # noqa: E731
        return {"tokens": as_t(inputs), "labels": as_t(labels), "doc_ids": as_t(doc_ids), "pos_ids": as_t(pos_ids)}
