"""Export a trained ``ProteinLM`` to Hugging Face ``transformers``, weight for weight.

* MLM → ``EsmForMaskedLM`` (ESM-2): same blocks (pre-LayerNorm, rotary, erf-GELU MLP), ``emb_layer_norm_after``
  = the final LayerNorm, ESM-2's LM head, tied embedding. ``token_dropout=False`` (protscale feeds
  ``<mask>`` embeddings as they are) and no LayerNorm before the blocks. ESM scales q before the rotary
  instead of the scores after it: the same numbers up to rounding.
* CLM → ``GPTNeoXForCausalLM``: sequential residuals (``use_parallel_residual=False``), rotary on every
  channel (``partial_rotary_factor=1.0``), biases everywhere, exact GELU, tied output embedding without
  bias. GPT-NeoX's fused qkv is ordered per head ([q k v] of head 0, then head 1, ...), protscale's
  per projection ([all q] [all k] [all v]): the rows are permuted.
* Both get an ``EsmTokenizer`` over protscale's alphabet (the ESM-2 one): ``<cls> residues <eos>``.

Both take one protein per row with positions 0..L-1 (``transformers`` has no packed document mask);
padding is fine with an ``attention_mask``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


from ..data.tokenizer import CLS, EOS, MASK, PAD, TOKENS, UNK

ROPE_THETA = 10000.0


def to_transformers(model, max_positions: int = 1024):
    """The ``transformers`` model (fp32, eval mode) with exactly ``model``'s weights."""
    model = model.float().cpu().eval()
    hf = _gpt_neox(model, max_positions) if model.cfg.causal else _esm(model, max_positions)
    return hf.eval()


def _esm(model, max_positions: int):
    from transformers import EsmConfig, EsmForMaskedLM

    cfg = model.cfg
    config = EsmConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=4 * cfg.d_model, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=max_positions + 2,
        position_embedding_type="rotary", layer_norm_eps=1e-5, emb_layer_norm_before=False,
        token_dropout=False, pad_token_id=PAD, mask_token_id=MASK, eos_token_id=EOS, bos_token_id=CLS,
        tie_word_embeddings=True, vocab_list=list(TOKENS), architectures=["EsmForMaskedLM"])
    hf = EsmForMaskedLM(config)
    s = model.state_dict()
    d = cfg.d_model
    out = {"esm.embeddings.word_embeddings.weight": s["embed.weight"]}
    for i in range(cfg.layers):
        b, e = f"blocks.{i}.", f"esm.encoder.layer.{i}."
        qkv_w, qkv_b = s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            out[e + f"attention.self.{name}.weight"] = qkv_w[j * d:(j + 1) * d]
            out[e + f"attention.self.{name}.bias"] = qkv_b[j * d:(j + 1) * d]
        pairs = {"attention.LayerNorm": "norm1", "attention.output.dense": "attn.out", "LayerNorm": "norm2",
                 "intermediate.dense": "fc", "output.dense": "proj"}
        out.update(_renamed(s, b, e, pairs))
    for p in ("weight", "bias"):
        out[f"esm.encoder.emb_layer_norm_after.{p}"] = s[f"norm.{p}"]
        out[f"lm_head.dense.{p}"] = s[f"mlm_head.dense.{p}"]
        out[f"lm_head.layer_norm.{p}"] = s[f"mlm_head.norm.{p}"]
    out["lm_head.bias"] = s["mlm_head.bias"]
    # Not protscale's: the tied decoder (it is the embedding), the rotary frequencies (from the config)
    # and ESM's contact-prediction head, which keeps its initialisation (trained separately, on top of a
    # frozen model).
    _load(hf, out, allowed_missing=("lm_head.decoder.weight", "esm.contact_head."))
    return hf


def _gpt_neox(model, max_positions: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = model.cfg
    config = GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=4 * cfg.d_model, hidden_act="gelu",
        attention_dropout=0.0, hidden_dropout=0.0, max_position_embeddings=max_positions,
        layer_norm_eps=1e-5, use_parallel_residual=False, attention_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "partial_rotary_factor": 1.0},
        bos_token_id=CLS, eos_token_id=EOS, pad_token_id=PAD, architectures=["GPTNeoXForCausalLM"])
    hf = GPTNeoXForCausalLM(config)
    s = model.state_dict()
    h, d = cfg.heads, cfg.d_model
    out = {"gpt_neox.embed_in.weight": s["embed.weight"]}
    for i in range(cfg.layers):
        b, g = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        # rows (projection, head, channel) -> (head, projection, channel)
        out[g + "attention.query_key_value.weight"] = (
            s[b + "attn.qkv.weight"].view(3, h, d // h, d).transpose(0, 1).reshape(3 * d, d))
        out[g + "attention.query_key_value.bias"] = (
            s[b + "attn.qkv.bias"].view(3, h, d // h).transpose(0, 1).reshape(3 * d))
        pairs = {"input_layernorm": "norm1", "attention.dense": "attn.out", "post_attention_layernorm": "norm2",
                 "mlp.dense_h_to_4h": "fc", "mlp.dense_4h_to_h": "proj"}
        out.update(_renamed(s, b, g, pairs))
    for p in ("weight", "bias"):
        out[f"gpt_neox.final_layer_norm.{p}"] = s[f"norm.{p}"]
    _load(hf, out, allowed_missing=("lm_head.weight",))
    return hf


def _renamed(state: dict, ours_prefix: str, theirs_prefix: str, pairs: dict[str, str]) -> dict:
    """The weight and bias of each protscale module under its transformers name ({theirs: ours})."""
    return {f"{theirs_prefix}{theirs}.{p}": state[f"{ours_prefix}{ours}.{p}"]
            for theirs, ours in pairs.items() for p in ("weight", "bias")}


def _load(hf, state: dict, allowed_missing: tuple[str, ...]) -> None:
    missing, unexpected = hf.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.startswith(allowed_missing) and not k.endswith("rotary_embeddings.inv_freq")]
    if missing or unexpected:      # a mapping bug, never the user's input
        raise RuntimeError(f"export mapping incomplete: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()


def tokenizer(directory: str | os.PathLike):
    """An ``EsmTokenizer`` over protscale's alphabet (written as ``vocab.txt`` into ``directory``)."""
    from transformers import EsmTokenizer

    vocab = Path(directory) / "vocab.txt"
    vocab.write_text("\n".join(TOKENS) + "\n")
    return EsmTokenizer(str(vocab), unk_token=TOKENS[UNK], cls_token=TOKENS[CLS], pad_token=TOKENS[PAD],
                        mask_token=TOKENS[MASK], eos_token=TOKENS[EOS])


def save(model, out: str | os.PathLike, max_positions: int = 1024) -> Path:
    """Write ``model`` and its tokenizer to ``out`` (created; must not exist or be empty), all or nothing:
    everything is written into a temporary sibling first and renamed into place."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        from ..errors import UserError

        raise UserError(f"--out {out}: exists and is not an empty directory; choose a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        hf = to_transformers(model, max_positions)
        hf.save_pretrained(tmp)
        tokenizer(tmp).save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_run(tracking_uri: str, run_id: str, out: str | os.PathLike) -> tuple[Path, str]:
    """Export the MLflow model of trial run ``run_id``; returns (directory, transformers class name)."""
    from ..errors import UserError
    from ..tracking import contract as c
    from ..tracking.runs import client
    from ..tracking.models import load_model

    try:
        run = client(tracking_uri).get_run(run_id)
    except Exception as exc:
        raise UserError(f"run {run_id}: not found in {c.resolve_tracking_uri(tracking_uri)} ({exc})") from None
    if not (run.outputs and run.outputs.model_outputs):
        raise UserError(f"run {run_id} ({run.info.run_name}) has no logged model: export a completed trial's run")
    model = load_model(tracking_uri, run_id)
    path = save(model, out, int(run.data.params.get(c.SEQ_LEN, 1024)))
    return path, "GPTNeoXForCausalLM" if model.cfg.causal else "EsmForMaskedLM"
