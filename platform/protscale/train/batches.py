"""From packed rows to model inputs, one batch at a time: the row schedule, per-batch ids and labels,
and a background prefetcher.

**Schedule** (``Schedule``): a pure function of (seed, step) → the global row ids of optimizer step
``step``, independent of the world size, so a resumed or resized trial sees exactly the rows it would
have seen. Step s takes positions [(s-1)·G, s·G) of an endless stream of epochs; each epoch is a
permutation of every row of the split, built in two levels so that no step needs a permutation of every
row and every step reads only a few blocks (Parquet row groups, see ``shards.SplitReader``):

1. the blocks are put in a seeded random order (one permutation of the *blocks* per epoch);
2. that order is cut into windows of ``window_blocks`` consecutive blocks, and the rows of each window
   are shuffled together (a permutation of one window's rows).

The trade-off: within an epoch every row is seen exactly once, in a random order at the block level and
uniformly shuffled within a window, but the rows of one batch come from one window (two at a boundary),
i.e. from a few blocks rather than from the whole split. That is what makes the reads sequential and
cacheable — a window's blocks are read once and serve about ``window rows / G`` steps — and it costs no
statistical quality as long as blocks are themselves random samples of the split, which ``data prepare``
guarantees by shuffling the sequences before packing them. A split of at most ``window_blocks`` blocks
(the demo data) is one window: a uniform permutation of every row, as before. Work per step is
O(G) plus, once per epoch, O(blocks) and once per window, O(window rows).

**Batches** (``build_batch``): segment ids, positions, CLM labels or MLM masking computed from the
``seq_lens`` of the batch's rows only. MLM masks are keyed on (seed, step, position of the row in the
global batch), so they do not depend on the world size or the micro-batch split either.

**Prefetcher**: a thread that builds the next micro-batches, pins them and copies them to the GPU on a
side CUDA stream (a plain thread on CPU), so the training thread never waits for the host.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np

from ..data.tokenizer import MASK, PAD, RESIDUE_IDS
from ..model.transformer import IGNORE_INDEX

MASK_RATIO = 0.15          # of residue tokens; of those 80% -> <mask>, 10% -> random residue, 10% kept
WINDOW_BLOCKS = 4          # blocks shuffled together (see the module docstring)
EVAL_STEP = 0              # the "step" of evaluation masks (training steps start at 1)


# --- per-batch ids and labels -----------------------------------------------------------------------

def segment_ids(seq_lens: Sequence[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids, pos_ids), each (rows, seq_len) int64, for the rows whose segment lengths are given.
    Padding forms one extra segment per row; positions restart in every segment."""
    n = len(seq_lens)
    if n == 0:
        return np.zeros((0, seq_len), np.int64), np.zeros((0, seq_len), np.int64)
    counts = np.fromiter((len(s) for s in seq_lens), dtype=np.int64, count=n)
    lens = np.concatenate([np.asarray(s, dtype=np.int64) for s in seq_lens])
    row_of = np.repeat(np.arange(n), counts)
    pad = seq_len - np.bincount(row_of, weights=lens, minlength=n).astype(np.int64)
    # append each row's padding segment after its last real one (zero-length when there is no padding)
    ends = np.cumsum(counts)
    lens = np.insert(lens, ends, pad)
    counts = counts + 1
    starts_row = np.concatenate(([0], np.cumsum(counts)[:-1]))
    index_in_row = np.arange(lens.size) - np.repeat(starts_row, counts)
    doc = np.repeat(index_in_row, lens).reshape(n, seq_len)
    seg_start = np.cumsum(lens) - lens                                   # in the flattened batch
    pos = (np.arange(n * seq_len) - np.repeat(seg_start, lens)).reshape(n, seq_len)
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


def build_batch(tokens: np.ndarray, seq_lens: Sequence[np.ndarray], objective: str,
                mask_keys: Sequence[tuple[int, ...]] = ()) -> dict[str, np.ndarray]:
    """Model inputs of one micro-batch (int64 arrays): ``tokens``, ``labels``, ``doc_ids``, ``pos_ids``.
    MLM: row i is masked with its own generator seeded by ``mask_keys[i]``."""
    doc_ids, pos_ids = segment_ids(seq_lens, tokens.shape[1])
    if objective == "clm":
        inputs, labels = tokens.astype(np.int64), clm_labels(tokens, doc_ids)
    else:
        if len(mask_keys) != len(tokens):
            raise ValueError(f"MLM needs one mask key per row: {len(mask_keys)} keys for {len(tokens)} rows")
        inputs = np.empty(tokens.shape, dtype=np.int64)
        labels = np.empty(tokens.shape, dtype=np.int64)
        for i, key in enumerate(mask_keys):
            inputs[i], labels[i] = mlm_inputs(tokens[i:i + 1], np.random.default_rng(list(key)))
    return {"tokens": inputs, "labels": labels, "doc_ids": doc_ids, "pos_ids": pos_ids}


# --- the schedule --------------------------------------------------------------------------------------

class Schedule:
    """(seed, step) → global row ids; see the module docstring. ``block_len``: rows of each block."""

    def __init__(self, block_len: np.ndarray, seed: int, window_blocks: int = WINDOW_BLOCKS):
        self.block_len = np.asarray(block_len, dtype=np.int64)
        self.block_start = np.concatenate(([0], np.cumsum(self.block_len)))
        self.n_rows = int(self.block_start[-1])
        self.seed, self.window_blocks = seed, max(1, window_blocks)
        self._epoch = lru_cache(maxsize=2)(self._epoch_layout)
        self._window = lru_cache(maxsize=4)(self._window_rows)

    @classmethod
    def for_reader(cls, reader, seed: int, global_rows: int) -> "Schedule":
        """Windows of at least WINDOW_BLOCKS blocks and at least two batches."""
        need = -(-2 * global_rows // max(1, reader.block_rows))
        return cls(reader.block_len, seed, max(WINDOW_BLOCKS, need))

    def rows(self, step: int, global_rows: int) -> np.ndarray:
        """Row ids of optimizer step ``step`` (1-based), all ranks together, in batch order."""
        if self.n_rows == 0:
            raise ValueError("the split has no rows")
        pos = np.arange((step - 1) * global_rows, step * global_rows, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.n_rows)
        out = np.empty(global_rows, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            window_end = self._epoch(int(epoch))[1]
            w = np.searchsorted(window_end, offsets[sel], side="right")
            for win in np.unique(w):
                at = np.flatnonzero(sel)[w == win]
                first = window_end[win - 1] if win else 0
                out[at] = self._window(int(epoch), int(win))[offsets[at] - first]
        return out

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(block order, cumulative rows at the end of each window) of one epoch."""
        order = np.random.default_rng([self.seed, 0, epoch]).permutation(self.block_len.size)
        per_window = np.add.reduceat(self.block_len[order], np.arange(0, order.size, self.window_blocks))
        return order, np.cumsum(per_window)

    def _window_rows(self, epoch: int, win: int) -> np.ndarray:
        order = self._epoch(epoch)[0][win * self.window_blocks:(win + 1) * self.window_blocks]
        ids = np.concatenate([np.arange(self.block_start[b], self.block_start[b + 1]) for b in order])
        return ids[np.random.default_rng([self.seed, 1, epoch, win]).permutation(ids.size)]


# --- a step's micro-batches on one rank ----------------------------------------------------------------

def rank_micro_rows(global_rows: np.ndarray, rank: int, world: int, accumulation: int) -> list[np.ndarray]:
    """Rank ``rank`` takes ``rows[rank::world]`` (one row fewer on some ranks when ``world`` does not
    divide the batch) in ``accumulation`` micro-batches as even as possible. Positions in the global
    batch, not row ids: ``global_rows[i]`` is the row."""
    mine = np.arange(rank, len(global_rows), world)
    return np.array_split(mine, accumulation)


@dataclass
class Micro:
    """One micro-batch ready for the model, plus what the loop needs to weight its loss."""

    batch: dict                 # name -> tensor on the device
    step: int
    index: int                  # micro-batch index within the step
    labels: int                 # labelled positions of this micro-batch (0: a padding micro-batch)
    step_counts: object = None  # first micro-batch of a step: tensor [labels, tokens] of this rank's step


def step_micro_batches(reader, schedule: Schedule, objective: str, seed: int, global_rows: int,
                       accumulation: int, rank: int, world: int, first_step: int,
                       last_step: int) -> Iterator[tuple[int, int, dict, int, np.ndarray | None]]:
    """(step, micro index, numpy batch, labels, step counts or None) for this rank, in training order.

    A rank left with an empty micro-batch (a batch smaller than world × accumulation) still runs a
    forward/backward pass, on one row with weight 0, so collectives stay matched across ranks."""
    for step in range(first_step, last_step + 1):
        rows = schedule.rows(step, global_rows)
        micros = []
        for part in rank_micro_rows(rows, rank, world, accumulation):
            padding = part.size == 0
            part = part if not padding else np.array([rank % len(rows)])
            tokens, lens = reader.rows(rows[part])
            batch = build_batch(tokens, lens, objective, [(seed, step, int(p)) for p in part])
            labelled = batch["labels"] != IGNORE_INDEX
            if padding or not labelled.any():
                if not labelled.any():       # a finite loss (weighted 0) needs one labelled position
                    batch["labels"][0, 0] = batch["tokens"][0, 0]
                micros.append((batch, 0, 0))
            else:
                micros.append((batch, int(labelled.sum()), int(sum(int(s.sum()) for s in lens))))
        counts = np.array([sum(m[1] for m in micros), sum(m[2] for m in micros)], dtype=np.float64)
        for m, (batch, labels, _) in enumerate(micros):
            yield step, m, batch, labels, counts if m == 0 else None


# --- prefetching off the training thread ----------------------------------------------------------------

class Prefetcher:
    """Runs ``source`` (an iterator of (step, micro, numpy batch, labels, counts)) in a thread, turning
    each item into a ``Micro`` whose tensors are already on ``device``.

    CUDA: host arrays are pinned and copied with ``non_blocking=True`` on a side stream; the consumer's
    stream waits on an event recorded after the copy (no host synchronisation), and ``record_stream``
    keeps the caching allocator from reusing the memory too early. CPU: the same thread, no copies.
    At most ``depth`` micro-batches wait in the queue. An error in the thread is raised by ``next``."""

    _END = object()

    def __init__(self, source: Iterator, device, depth: int = 4):
        import torch

        self.device, self.depth = torch.device(device), depth
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(source,), name="protscale-prefetch", daemon=True)
        self.thread.start()

    def _to_device(self, arr: np.ndarray):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(arr))
        if not self.cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _run(self, source: Iterator) -> None:
        import torch

        try:
            for step, index, batch, labels, counts in source:
                if self.cuda:
                    with torch.cuda.stream(self.stream):
                        tensors = {k: self._to_device(v) for k, v in batch.items()}
                        step_counts = self._to_device(counts) if counts is not None else None
                        event = torch.cuda.Event()
                        event.record(self.stream)
                else:
                    tensors = {k: self._to_device(v) for k, v in batch.items()}
                    step_counts = torch.from_numpy(counts) if counts is not None else None
                    event = None
                item = (Micro(tensors, step, index, labels, step_counts), event)
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.queue.put((self._END, None))
        except BaseException as exc:                      # handed to the training thread
            self.queue.put((exc, None))

    def __iter__(self):
        return self

    def __next__(self) -> Micro:
        item, event = self.queue.get()
        if item is self._END:
            self.queue.put((item, None))
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        if event is not None:
            import torch

            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in [*item.batch.values(), *([item.step_counts] if item.step_counts is not None else [])]:
                t.record_stream(current)
        return item

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)
