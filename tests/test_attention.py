"""Attention paths: FlexAttention with a block mask built from ``doc_ids`` equals the dense-mask SDPA
reference on packed rows of real proteins (forward and every parameter's gradient, CLM and MLM, rows with
padding), its block structure is the dense mask's, activation checkpointing changes no gradient, and the
whole forward is one ``torch.compile`` graph (no host synchronisation in it).

On CPU flex runs eagerly: PyTorch's unfused reference, which evaluates ``mask_mod`` everywhere and so
ignores the block structure; the block structure gets its own test against the dense mask and against
torch's ``create_block_mask``. PyTorch refuses flex backward on CPU only because it has no fused CPU
backward kernel; its eager reference backward is device-generic, and the gradient tests let it run.
``tests/test_gpu.py`` repeats the equality with the compiled kernel in bf16 on CUDA.
"""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch.nn.attention.flex_attention import create_block_mask

from protscale.data import MAIN
from protscale.data.fasta import read_fasta
from protscale.data.shards import pack
from protscale.data.tokenizer import encode
from protscale.model.transformer import (ModelConfig, ProteinLM, document_block_mask, document_mask,
                                         resolve_attention)
from protscale.train.batches import clm_labels, mlm_inputs, segment_ids

SEQ_LEN = 256


@pytest.fixture(scope="module")
def packed():
    """The first bundled UniProt proteins packed into rows of 256 tokens; the last row is padded."""
    seqs = [encode(r.seq.decode()) for r in itertools.islice(read_fasta(MAIN), 12)]
    rows = pack(seqs, SEQ_LEN)
    doc, pos = segment_ids(rows.seq_lens, SEQ_LEN)
    assert rows.tokens.shape[0] >= 3 and int(rows.seq_lens[-1].sum()) < SEQ_LEN     # a padded row
    return rows, torch.from_numpy(doc), torch.from_numpy(pos)


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """Let flex's eager reference backward run on CPU (see the module docstring)."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


def _batch(packed, objective):
    rows, doc, pos = packed
    rows_idx = [0, 1, len(rows) - 1]                   # two full rows and the padded last one
    tokens = rows.tokens[rows_idx]
    if objective == "clm":
        inputs, labels = tokens.astype(np.int64), clm_labels(tokens, doc[rows_idx].numpy())
    else:
        inputs, labels = mlm_inputs(tokens, np.random.default_rng(0))
    return dict(tokens=torch.from_numpy(inputs), pos_ids=pos[rows_idx], doc_ids=doc[rows_idx],
                labels=torch.from_numpy(labels))


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the tensors autograd keeps for backward during a forward."""

    def __init__(self):
        self.bytes = 0

        def pack(t):
            self.bytes += t.numel() * t.element_size()
            return t
        super().__init__(pack, lambda t: t)

    def __enter__(self):
        super().__enter__()
        return self


def _tiles(num, idx, n):
    """Decode BlockMask's (count, indices) into a set of (row, query tile, key tile)."""
    return {(b, i, int(idx[b, 0, i, j])) for b in range(num.shape[0]) for i in range(n)
            for j in range(int(num[b, 0, i]))}


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_block_mask_is_the_dense_document_mask_tile_by_tile(packed, objective):
    """Skipped tiles are all masked, "full" tiles all visible, and the rest apply the mask per element;
    real proteins leave both kinds of shortcut to the kernel (the point of the block mask), and the
    tiles agree with torch's ``create_block_mask``, which evaluates the dense mask."""
    _, doc, _ = packed
    causal, block = objective == "clm", 32
    bm = document_block_mask(doc, causal, block=block)
    dense = document_mask(doc, causal)[:, 0]
    n = SEQ_LEN // block
    partial = _tiles(bm.kv_num_blocks, bm.kv_indices, n)
    full = _tiles(bm.full_kv_num_blocks, bm.full_kv_indices, n)
    assert not partial & full
    skipped = 0
    for b, i, j in itertools.product(range(doc.shape[0]), range(n), range(n)):
        tile = dense[b, i * block:(i + 1) * block, j * block:(j + 1) * block]
        if (b, i, j) in full:
            assert tile.all()
        elif (b, i, j) not in partial:
            assert not tile.any()
            skipped += 1
    assert full and skipped > 0

    q = torch.arange(SEQ_LEN)
    rebuilt = bm.mask_mod(torch.arange(doc.shape[0])[:, None, None], 0, q[None, :, None], q[None, None, :])
    torch.testing.assert_close(rebuilt, dense)

    ref = create_block_mask(bm.mask_mod, doc.shape[0], None, SEQ_LEN, SEQ_LEN, device="cpu", BLOCK_SIZE=block)
    assert partial == _tiles(ref.kv_num_blocks, ref.kv_indices, n)
    assert full == _tiles(ref.full_kv_num_blocks, ref.full_kv_indices, n)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_flex_equals_dense_sdpa_forward_and_gradients(packed, objective, flex_backward_on_cpu):
    batch = _batch(packed, objective)
    torch.manual_seed(0)
    model = ProteinLM(ModelConfig(layers=2, d_model=64, heads=4, causal=objective == "clm", attention="sdpa"))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits_sdpa = model(**inputs)
        model.cfg.attention = "flex"
        logits_flex = model(**inputs)
    torch.testing.assert_close(logits_flex, logits_sdpa, rtol=1e-5, atol=1e-5)

    loss_flex, grads_flex = _loss_and_grads(model, batch)
    model.cfg.attention = "sdpa"
    loss_sdpa, grads_sdpa = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss_flex, loss_sdpa)
    assert grads_flex.keys() == grads_sdpa.keys() and len(grads_flex) == len(list(model.parameters()))
    for name in grads_sdpa:
        assert grads_sdpa[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_flex[name], grads_sdpa[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_activation_checkpointing_gives_the_same_gradients(packed, attention, flex_backward_on_cpu):
    batch = _batch(packed, "mlm")
    torch.manual_seed(0)
    model = ProteinLM(ModelConfig(layers=2, d_model=64, heads=4, causal=False, attention=attention))
    with _SavedBytes() as saved:
        loss, grads = _loss_and_grads(model, batch)
    model.cfg.activation_checkpointing = True
    with _SavedBytes() as saved_ckpt:
        loss_ckpt, grads_ckpt = _loss_and_grads(model, batch)
    assert saved_ckpt.bytes < saved.bytes / 2          # the blocks' activations really were dropped
    torch.testing.assert_close(loss_ckpt, loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_forward_traces_to_one_graph(packed, flex_backward_on_cpu):
    """``torch.compile`` sees the whole forward — BlockMask construction, FlexAttention, activation
    checkpointing, loss — as one graph: no graph break, so nothing in it reads a value back to the host."""
    batch = _batch(packed, "clm")
    model = ProteinLM(ModelConfig(layers=2, d_model=64, heads=4, causal=True, attention="flex",
                                  activation_checkpointing=True))
    explained = torch._dynamo.explain(model)(**batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_auto_attention_is_flex_on_cuda_and_dense_sdpa_on_cpu():
    assert resolve_attention("auto", torch.device("cuda", 0)) == "flex"
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attention("flex", torch.device("cpu")) == "flex"
    with pytest.raises(ValueError, match="unknown attention implementation 'xformers'"):
        resolve_attention("xformers", torch.device("cpu"))
