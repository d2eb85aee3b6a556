"""Trial data: the streaming split reader, the (seed, step) → rows schedule, per-batch ids and labels, the
prefetcher, and one optimizer step that is the same at every world size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from protscale.data import shards
from protscale.data.shards import DatasetError, SplitReader
from protscale.model.transformer import IGNORE_INDEX
from protscale.train.batches import (Prefetcher, Schedule, build_batch, rank_micro_rows, segment_ids,
                                     step_micro_batches)


@pytest.fixture(scope="module")
def many_shards(demo_data, tmp_path_factory) -> Path:
    """The prepared bundled proteins with the train split rewritten as 16 shards of 1,000 rows in row
    groups of 500 (32 blocks), so that blocks, windows and shard boundaries all matter."""
    import pyarrow as pa

    out = tmp_path_factory.mktemp("data") / "bundled-128-small-shards"
    shutil.copytree(demo_data, out)
    manifest = json.loads((out / shards.MANIFEST).read_text())
    table = pa.concat_tables([pq.read_table(f) for f in sorted((out / "train").glob("part-*.parquet"))])
    shutil.rmtree(out / "train")
    (out / "train").mkdir()
    entries = []
    for i, start in enumerate(range(0, table.num_rows, 1000)):
        name = f"train/part-{i:05d}.parquet"
        part = table.slice(start, 1000)
        pq.write_table(part, out / name, row_group_size=500)
        entries.append({"file": name, "rows": part.num_rows})
    manifest["splits"]["train"].update(shards=entries, files=[e["file"] for e in entries], row_group_rows=500)
    (out / shards.MANIFEST).write_text(json.dumps(manifest))
    return out


def _all_rows(root: Path, split: str):
    """Every row straight from the Parquet files (an independent reference for the reader)."""
    files = sorted((root / split).glob("part-*.parquet"))
    tokens, lens = [], []
    for f in files:
        t = pq.read_table(f)
        tokens += [list(x) for x in t.column("tokens").to_pylist()]   # fixed_size_binary rows (format 3)
        lens += t.column("seq_lens").to_pylist()
    return np.asarray(tokens, dtype=np.uint8), [np.asarray(x, dtype=np.int32) for x in lens]


def _reference_ids(seq_lens, seq_len):
    """Segment and position ids row by row, the obvious way."""
    doc = np.zeros((len(seq_lens), seq_len), np.int64)
    pos = np.zeros_like(doc)
    for i, lens in enumerate(seq_lens):
        at = 0
        for j, n in enumerate([*lens, seq_len - int(np.sum(lens))]):
            doc[i, at:at + n], pos[i, at:at + n] = j, np.arange(n)
            at += n
    return doc, pos


# --- the reader ------------------------------------------------------------------------------------------

def test_reader_rows_and_ids_equal_the_whole_split(many_shards):
    tokens, lens = _all_rows(many_shards, "train")
    reader = SplitReader(many_shards, "train", cache_blocks=3)
    assert reader.n_rows == len(tokens) and reader.n_blocks >= 10 and reader.seq_len == 128
    rows = np.random.default_rng(0).permutation(reader.n_rows)[:300]
    got_tokens, got_lens = reader.rows(rows)
    assert np.array_equal(got_tokens, tokens[rows])
    assert all(np.array_equal(a, lens[r]) for a, r in zip(got_lens, rows))
    assert len(reader._cache) <= 3                          # bounded, whatever was asked
    doc, pos = segment_ids(got_lens, 128)
    ref_doc, ref_pos = _reference_ids([lens[r] for r in rows], 128)
    assert np.array_equal(doc, ref_doc) and np.array_equal(pos, ref_pos)


def test_reader_falls_back_to_parquet_footers_and_reads_file_uris(many_shards, tmp_path):
    """A dataset prepared before the manifest listed rows per shard still reads the same, also as a URI."""
    old = tmp_path / "old"
    shutil.copytree(many_shards, old)
    manifest = json.loads((old / shards.MANIFEST).read_text())
    manifest.get("settings", {}).pop("row_group_rows", None)
    for split, info in manifest["splits"].items():
        info.pop("shards", None)
        info.pop("row_group_rows", None)
        info["files"] = [f"{split}/{p.name}" for p in sorted((old / split).glob("part-*.parquet"))]
    (old / shards.MANIFEST).write_text(json.dumps(manifest))
    tokens, lens = _all_rows(many_shards, "train")
    for root in (old, f"file://{old}"):
        reader = SplitReader(root, "train")
        assert reader.n_rows == len(tokens)
        rows = np.arange(0, reader.n_rows, 97)
        got, got_lens = reader.rows(rows)
        assert np.array_equal(got, tokens[rows]) and all(np.array_equal(a, lens[r]) for a, r in zip(got_lens, rows))
    assert shards.read_manifest(f"file://{old}")["seq_len"] == 128


def test_reader_refuses_a_dataset_without_its_manifest(many_shards, tmp_path):
    half = tmp_path / "half-written"
    shutil.copytree(many_shards, half)
    (half / shards.MANIFEST).unlink()
    with pytest.raises(DatasetError, match="not a prepared dataset.*manifest.json.*protscale data prepare"):
        SplitReader(half, "train")
    with pytest.raises(DatasetError, match="manifest.json"):
        shards.read_manifest(f"file://{half}")


# --- the schedule ----------------------------------------------------------------------------------------

def test_schedule_is_a_function_of_seed_and_step_and_each_epoch_is_a_permutation(many_shards):
    reader = SplitReader(many_shards, "train")
    n, batch = reader.n_rows, 97                            # 97 does not divide n: steps straddle epochs
    schedule = Schedule(reader.block_len, seed=3, window_blocks=4)
    stream = np.concatenate([schedule.rows(s, batch) for s in range(1, 3 * n // batch + 2)])
    for epoch in range(3):
        assert np.array_equal(np.sort(stream[epoch * n:(epoch + 1) * n]), np.arange(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])   # a new order every epoch
    # A resumed (fresh) schedule gives the same rows for any step; another seed gives others.
    resumed = Schedule(reader.block_len, seed=3, window_blocks=4)
    for step in (250, 1, 163):
        assert np.array_equal(resumed.rows(step, batch), stream[(step - 1) * batch:step * batch])
    assert not np.array_equal(Schedule(reader.block_len, seed=4, window_blocks=4).rows(1, batch), stream[:batch])


def test_a_step_reads_a_few_blocks_and_an_epoch_reads_each_block_about_once(many_shards):
    reader = SplitReader(many_shards, "train")
    batch = 64
    schedule = Schedule.for_reader(reader, seed=0, global_rows=batch)
    reader.cache_blocks = 2 * schedule.window_blocks + 1     # what the trial loop uses
    steps = reader.n_rows // batch
    touched = [np.unique(reader.block_of(schedule.rows(s, batch))).size for s in range(1, steps + 1)]
    assert max(touched) <= 2 * schedule.window_blocks < reader.n_blocks
    for s in range(1, steps + 1):
        reader.rows(schedule.rows(s, batch))
    assert reader.reads <= reader.n_blocks + 2 * schedule.window_blocks


# --- a step's micro-batches --------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_micro_batches_do_not_depend_on_the_world_size(many_shards, objective):
    """The rows, and for MLM the masks, of a step are the same whether 1 or 3 ranks take them."""
    reader = SplitReader(many_shards, "train")
    schedule = Schedule.for_reader(reader, seed=0, global_rows=10)

    def by_row(world, accumulation):
        out = {}
        for rank in range(world):
            for _, _, batch, labels, _ in step_micro_batches(reader, schedule, objective, 0, 10, accumulation,
                                                              rank, world, 5, 5):
                assert labels == int((batch["labels"] != IGNORE_INDEX).sum())
                for i in range(batch["tokens"].shape[0]):
                    out.setdefault(batch["tokens"][i].tobytes() + batch["labels"][i].tobytes(), 0)
                    out[batch["tokens"][i].tobytes() + batch["labels"][i].tobytes()] += 1
        return out

    assert by_row(1, 2) == by_row(3, 2) == by_row(2, 5)


def test_uneven_world_sizes_split_every_row_once():
    rows = np.arange(100, 107)
    parts = [p for r in range(3) for p in rank_micro_rows(rows, r, 3, 2)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(7))
    assert [p.size for p in parts] == [2, 1, 1, 1, 1, 1]


def test_clm_labels_and_build_batch_on_real_rows(many_shards):
    reader = SplitReader(many_shards, "train")
    tokens, lens = reader.rows(np.arange(8))
    batch = build_batch(tokens, lens, "clm")
    doc = batch["doc_ids"]
    # the label of a position is the next token of the same protein, never the first of the next one
    same = doc[:, 1:] == doc[:, :-1]
    assert np.array_equal(batch["labels"][:, :-1][same], tokens[:, 1:][same].astype(np.int64))
    assert (batch["labels"][:, :-1][~same] == IGNORE_INDEX).all()


def test_prefetcher_delivers_in_order_and_raises_the_threads_error():
    import torch

    def source(fail_at=None):
        for step in range(1, 6):
            if step == fail_at:
                raise RuntimeError("shard unreadable")
            yield step, 0, {"tokens": np.full((2, 4), step)}, 8, np.array([8.0, 8.0])

    got = [int(m.batch["tokens"][0, 0]) for m in Prefetcher(source(), torch.device("cpu"), depth=2)]
    assert got == [1, 2, 3, 4, 5]
    failing = Prefetcher(source(fail_at=3), torch.device("cpu"), depth=2)
    with pytest.raises(RuntimeError, match="shard unreadable"):
        for _ in range(5):
            next(failing)
    stopped = Prefetcher(source(), torch.device("cpu"), depth=1)
    stopped.close()
    assert not stopped.thread.is_alive()


# --- one optimizer step at world sizes 1, 2, 3 ---------------------------------------------------------------

def _one_step(rank: int, world: int, port: int, data: str, objective: str, out: str) -> None:
    """One optimizer step of the trial loop on this rank, over gloo; rank 0 saves the gradient DeepSpeed
    applied, the updated weights and the logged loss, and at world 2 the reference: the gradient of the
    token-mean loss of the whole global batch in one plain PyTorch forward pass."""
    import os

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from protscale.model.transformer import ModelConfig, ProteinLM
    from protscale.train.config import TrialConfig
    from protscale.train.engine import build_engine
    from protscale.train.loop import train_step
    from protscale.train.plan import Plan

    cfg = TrialConfig(objective=objective, size="tiny-1", budget_flops=1e12, data=data, tracking_uri="",
                      experiment="", precision="fp32", batch_tokens=7 * 128, micro_batch_rows=2, zero_stage=0)
    plan = Plan(cfg, 128, world)
    global_rows, accumulation = plan.global_rows, plan.accumulation
    assert (global_rows, accumulation) == (7, 2)
    torch.manual_seed(0)
    engine = build_engine(cfg, plan, torch.device("cpu"), universal=False)
    torch.manual_seed(0)
    reference = ProteinLM(ModelConfig.from_size(cfg.model_size, objective))
    reader = SplitReader(data, "train")
    schedule = Schedule.for_reader(reader, 0, global_rows)
    source = step_micro_batches(reader, schedule, objective, 0, global_rows, accumulation, rank, world, 1, 1)
    grads = {}
    step = engine.step

    def capture_then_step():
        if engine.is_gradient_accumulation_boundary():
            grads["g"] = torch.cat([p.grad.detach().flatten().clone() for p in engine.module.parameters()])
        step()

    engine.step = capture_then_step
    loss, counts, lr = train_step(engine, Prefetcher(source, torch.device("cpu")), accumulation, world)
    torch.distributed.all_reduce(loss)
    if rank == 0:
        saved = {"grad": grads["g"], "loss": loss, "tokens": counts[1], "lr": lr,
                 "weights": torch.cat([p.detach().flatten() for p in engine.module.parameters()])}
        if world == 2:
            tokens, lens = reader.rows(schedule.rows(1, global_rows))
            batch = build_batch(tokens, lens, objective, [(0, 1, i) for i in range(global_rows)])
            ref_loss = reference(**{k: torch.from_numpy(v) for k, v in batch.items()})
            ref_loss.backward()
            saved["reference_grad"] = torch.cat([p.grad.flatten() for p in reference.parameters()])
            saved["reference_loss"] = ref_loss.detach()
        torch.save(saved, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_one_optimizer_step_is_the_same_at_world_sizes_2_and_3_as_one_full_batch(many_shards, tmp_path):
    """7 MLM rows per step: 4 + 3 rows on two ranks (2 micro-batches each), 3 + 2 + 2 on three. The
    gradient DeepSpeed applies equals the gradient of the token-mean loss of the whole global batch in one
    plain forward pass (world size 1 without DeepSpeed), and so does the update. (Worker processes
    import DeepSpeed: about 20 s per world size on an idle 2-core machine.)"""
    import socket

    import torch
    import torch.multiprocessing as mp

    results = {}
    for world in (2, 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = str(tmp_path / f"world{world}.pt")
        mp.spawn(_one_step, args=(world, port, str(many_shards), "mlm", out), nprocs=world, join=True)
        results[world] = torch.load(out)
    ref_grad, ref_loss = results[2]["reference_grad"], float(results[2]["reference_loss"])
    # Adam's first update is about lr·sign(g): compare it where the gradient is well above rounding noise.
    stable = ref_grad.abs() > 1e-5
    for world, r in results.items():
        assert torch.allclose(r["grad"], ref_grad, rtol=1e-4, atol=1e-7), f"world {world}: another gradient"
        assert float(r["loss"]) == pytest.approx(ref_loss, rel=1e-5)
    assert torch.allclose(results[2]["weights"][stable], results[3]["weights"][stable], rtol=1e-5, atol=1e-8)
    assert float(results[2]["tokens"]) == float(results[3]["tokens"]) and results[2]["lr"] == results[3]["lr"]
