"""Model: parameter counts against the paper's table, FLOPs per token, attention paths and boundaries."""

import numpy as np
import pytest
import torch

from protscale.data.tokenizer import encode
from protscale.data.shards import pack
from protscale.model.sizes import (PAPER_SIZES, SIZES, effective_context, tokens_for_budget,
                                   train_flops_per_token)
from protscale.model.transformer import ModelConfig, ProteinLM, document_mask, flash_attn_varlen_func
from protscale.train.batches import clm_labels, mlm_inputs, segment_ids

# Labels whose table N is exactly 12·L·d² for some (L, d) (README of the reference logs).
EXACT = ["3M", "6M", "10M", "20M", "25M", "40M", "47M", "85M", "106M", "200M", "230M", "393M", "550M",
         "880M", "1.5B", "2B", "2.4B", "3.4B", "4B", "6B", "10B"]


@pytest.mark.parametrize("objective", ["clm", "mlm"])
@pytest.mark.parametrize("name", list(PAPER_SIZES))
def test_counts_match_reference_table_and_the_module(name, objective):
    size = PAPER_SIZES[name]
    with torch.device("meta"):                       # 10B parameters without allocating them
        model = ProteinLM(ModelConfig.from_size(size, objective))
    total, non_embedding = model.count_parameters()
    assert non_embedding == size.n_params_non_embedding == 12 * size.layers * size.d_model ** 2
    assert total == size.n_params(model.cfg.vocab_size, objective)
    tolerance = 0 if name in EXACT else (0.025 if name == "13M" else 0.005)
    assert abs(non_embedding - size.reference_n) <= tolerance * size.reference_n
    assert size.d_model % size.heads == 0 and size.d_model // size.heads == 64


def test_flops_per_token_formula():
    size = SIZES["85M"]
    # One segment of 1024 tokens: S_eff = 1024; two of 512: S_eff = 512.
    assert effective_context([np.array([1024])]) == 1024
    assert effective_context([np.array([512, 512])]) == 512
    assert effective_context([np.array([3, 1]), np.array([2])]) == pytest.approx((9 + 1 + 4) / 6)
    n = size.n_params_non_embedding
    assert train_flops_per_token(size, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert tokens_for_budget(size, 6 * n * 1000) == 1000


def _packed_batch(seqs, seq_len):
    rows = pack([encode(s) for s in seqs], seq_len)
    doc, pos = segment_ids(rows.seq_lens, seq_len)
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    return t(rows.tokens), t(pos), t(doc), rows


PROTEINS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ", "MADEEKLPPGWEKRMSRSSGRVYYFNHITNASQW", "PEPTIDE"]


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_document_mask_matches_attention_per_protein(causal):
    """The masked dense path equals running attention over each protein separately (what varlen does)."""
    torch.manual_seed(0)
    tokens, pos, doc, _ = _packed_batch(PROTEINS, 32)
    b, s, h, dh = tokens.shape[0], tokens.shape[1], 2, 8
    q, k, v = (torch.randn(b, h, s, dh) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc, causal))
    ref = torch.empty_like(dense)
    for r in range(b):
        for d in doc[r].unique():
            idx = (doc[r] == d).nonzero().flatten()
            ref[r, :, idx] = torch.nn.functional.scaled_dot_product_attention(
                q[r, :, idx], k[r, :, idx], v[r, :, idx], is_causal=causal)
    torch.testing.assert_close(dense, ref)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_no_attention_across_protein_boundaries(objective):
    """Changing one protein changes no output position of another packed beside it, and a protein packed
    after others gets the same outputs as alone (positions restart per protein)."""
    torch.manual_seed(0)
    model = ProteinLM(ModelConfig(layers=2, d_model=32, heads=2, causal=objective == "clm")).eval()
    a, b = "MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQ"
    tokens, pos, doc, _ = _packed_batch([a, b], 64)
    tokens2, _, _, _ = _packed_batch(["W" * len(a), b], 64)
    alone, pos_alone, doc_alone, _ = _packed_batch([b], 64)
    with torch.no_grad():
        out, out2 = model(tokens, pos, doc), model(tokens2, pos, doc)
        out_alone = model(alone, pos_alone, doc_alone)
    first = len(a) + 2                                   # <cls> a <eos>
    span = slice(first, first + len(b) + 2)
    assert not torch.allclose(out[0, :first], out2[0, :first])          # the edit did change protein a
    torch.testing.assert_close(out[0, span], out2[0, span])             # ... and nothing of protein b
    torch.testing.assert_close(out[0, span], out_alone[0, :len(b) + 2], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(flash_attn_varlen_func is None or not torch.cuda.is_available(),
                    reason="flash-attn varlen needs the flash-attn package and a CUDA GPU")
def test_flash_varlen_matches_sdpa_on_gpu():
    torch.manual_seed(0)
    cfg = ModelConfig(layers=2, d_model=128, heads=2, causal=True, attention="sdpa")
    model = ProteinLM(cfg).cuda().to(torch.bfloat16)
    tokens, pos, doc, _ = _packed_batch(PROTEINS * 4, 64)
    tokens, pos, doc = tokens.cuda(), pos.cuda(), doc.cuda()
    with torch.no_grad():
        sdpa = model(tokens, pos, doc)
        model.cfg.attention = "flash"
        flash = model(tokens, pos, doc)
    torch.testing.assert_close(flash.float(), sdpa.float(), rtol=2e-2, atol=2e-2)


def test_clm_labels_stop_at_protein_ends():
    tokens, pos, doc, rows = _packed_batch(["MKT", "GS"], 12)
    labels = clm_labels(rows.tokens, doc.numpy())
    # <cls> M K T <eos> | <cls> G S <eos> | pad...
    ids = rows.tokens[0]
    assert labels[0, :4].tolist() == ids[1:5].tolist()
    assert labels[0, 4] == -100                       # <eos> of protein 1 does not predict <cls> of 2
    assert labels[0, 5:8].tolist() == ids[6:9].tolist()
    assert (labels[0, 8:] == -100).all()              # end of protein 2 and padding


def test_mlm_masks_fifteen_percent_of_residues_80_10_10():
    rows = pack([encode("ACDEFGHIKLMNPQRSTVWY" * 50)] * 20, 1024)
    inputs, labels = mlm_inputs(rows.tokens, np.random.default_rng(0))
    chosen = labels != -100
    residues = np.isin(rows.tokens, np.arange(4, 29))
    assert not (chosen & ~residues).any()             # never <cls>/<eos>/<pad>
    assert chosen.sum() / residues.sum() == pytest.approx(0.15, abs=0.01)
    masked = (inputs == 32) & chosen
    kept = (inputs == rows.tokens) & chosen
    assert masked.sum() / chosen.sum() == pytest.approx(0.8, abs=0.02)
    assert kept.sum() / chosen.sum() == pytest.approx(0.1 + 0.1 / 25, abs=0.02)
