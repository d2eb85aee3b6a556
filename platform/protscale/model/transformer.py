"""One transformer for both objectives: CLM (causal mask, next-token loss) and MLM (bidirectional,
masked-token loss). Pre-LayerNorm blocks, rotary position embeddings, GELU MLP of width 4·d, no
dropout, a final LayerNorm, input and output embeddings tied.

The layout is that of two ``transformers`` architectures, so that a trained model exports weight for
weight (``protscale export``, ``model/export.py``):

* MLM = ESM-2 (``EsmForMaskedLM``): ESM-2's output head (dense → GELU → LayerNorm → tied embedding
  matrix + bias) after the final LayerNorm.
* CLM = GPT-NeoX with sequential residuals and full rotary (``GPTNeoXForCausalLM``): the final
  LayerNorm, then the tied embedding matrix (no bias).
* Rotary embeddings rotate the two halves of each head (``rotate_half``), as both do.

Rows are packed: several proteins share a row of ``seq_len`` tokens. ``doc_ids`` (B, S) numbers the
segments of each row and ``pos_ids`` (B, S) restarts at 0 in each segment, so attention never crosses
from one protein into another and a protein packed anywhere gets the same positions as alone.

Three attention paths compute the same numbers (``tests/test_attention.py``):

* ``sdpa``: ``scaled_dot_product_attention`` with a dense (B, 1, S, S) document mask. The CPU default
  and the reference; on a GPU the dense mask costs S² bytes per row and rules out the flash kernels.
* ``flex``: FlexAttention with a ``BlockMask`` built once per forward from ``doc_ids`` and shared by all
  layers. Blocks of 128×128 that lie inside one protein are "full" (no mask evaluated), blocks that
  straddle no common protein are skipped, so no S×S mask is ever materialised and padding and
  cross-protein blocks cost nothing. The default on CUDA, where the kernel is compiled.
* ``flash``: flash-attn's varlen kernel, only when asked for: it is a source-built package that must
  match torch and CUDA, and its ``cu_seqlens`` has a data-dependent length (a host sync per forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from ..data.tokenizer import VOCAB_SIZE
from .sizes import ModelSize

try:  # optional GPU kernel
    from flash_attn import flash_attn_varlen_func
except Exception:  # ImportError, or a build that does not match this torch/CUDA
    flash_attn_varlen_func = None

IGNORE_INDEX = -100
ATTENTION = ("auto", "sdpa", "flex", "flash")
FLEX_BLOCK = 128      # FlexAttention's tile: the granularity at which blocks are skipped or unmasked


@dataclass
class ModelConfig:
    layers: int
    d_model: int
    heads: int
    causal: bool                     # True for CLM, False for MLM
    vocab_size: int = VOCAB_SIZE
    attention: str = "auto"          # "auto" (flex on CUDA, sdpa on CPU) | "sdpa" | "flex" | "flash"
    activation_checkpointing: bool = False   # recompute each block in backward: keep only block inputs

    @classmethod
    def from_size(cls, size: ModelSize, objective: str, attention: str = "auto",
                  activation_checkpointing: bool = False) -> "ModelConfig":
        return cls(size.layers, size.d_model, size.heads, causal=objective == "clm", attention=attention,
                   activation_checkpointing=activation_checkpointing)


def resolve_attention(choice: str, device: torch.device) -> str:
    """``auto`` is FlexAttention on CUDA (no dense mask, no host sync) and dense-mask SDPA elsewhere.

    flash-attn is used only when asked for: on a GPU flex needs no extra package and keeps the step free
    of host synchronisation; flash-attn's varlen kernel needs segment boundaries whose count is known on
    the host.
    """
    if choice not in ATTENTION:
        raise ValueError(f"unknown attention implementation {choice!r} ({', '.join(ATTENTION)})")
    if choice == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if choice == "flash" and (flash_attn_varlen_func is None or device.type != "cuda"):
        raise RuntimeError("attention='flash' needs the flash-attn package and a CUDA device")
    return choice


# --- rotary position embedding ---------------------------------------------------------------------

def rotary(x: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + Dh/2) of x (B, H, S, Dh) by angles pos·θ_i, θ_i = 10000^(-2i/Dh):
    the "rotate half" layout of GPT-NeoX and ESM-2 in ``transformers``."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh))
    angles = pos_ids.to(torch.float32)[:, None, :, None] * inv_freq          # (B, 1, S, Dh/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# --- attention ---------------------------------------------------------------------------------------

def document_mask(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, S, S) boolean mask: True where query i may attend to key j (same segment, j ≤ i if causal)."""
    mask = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    if causal:
        s = doc_ids.shape[1]
        mask = mask & torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return mask


def cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative segment boundaries over the flattened batch, for flash-attn's varlen kernels. The
    maximum segment length is bounded by the row length (no host sync for it)."""
    flat = doc_ids.flatten()
    row_start = torch.zeros_like(flat, dtype=torch.bool)
    row_start[:: doc_ids.shape[1]] = True
    starts = torch.nonzero(row_start | torch.cat([flat.new_ones(1, dtype=torch.bool), flat[1:] != flat[:-1]]))
    bounds = torch.cat([starts.flatten(), flat.new_tensor([flat.numel()])]).to(torch.int32)
    return bounds, doc_ids.shape[1]


def document_block_mask(doc_ids: torch.Tensor, causal: bool, block: int = FLEX_BLOCK) -> BlockMask:
    """FlexAttention's block-sparse form of ``document_mask``, built from per-block segment ranges.

    For each tile of ``block`` queries × ``block`` keys, the smallest and largest segment id on each side
    decide: tiles whose ranges do not meet are skipped, tiles whose queries and keys all belong to one
    segment (and, for CLM, lie wholly below the diagonal) are "full" and run without evaluating the mask,
    and the rest are "partial" and apply ``mask_mod`` per element. This is exact for any ``doc_ids``
    (skipping and "full" are only claimed when certain) and costs O(B·(S/block)²) work on the device, with
    no S×S tensor and no value read back to the host, so it can be built once per forward and traced by
    ``torch.compile``.
    """
    b, s = doc_ids.shape
    n = -(-s // block)
    if n * block != s:   # repeat the last id into the ragged last tile: its range stays that of real tokens
        doc_ids = torch.cat([doc_ids, doc_ids[:, -1:].expand(b, n * block - s)], dim=1)
    tiles = doc_ids.reshape(b, n, block)
    lo, hi = tiles.amin(-1), tiles.amax(-1)                            # (B, n)
    meet = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
    one = lo == hi
    full = one[:, :, None] & one[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    if causal:
        i = torch.arange(n, device=doc_ids.device)
        meet = meet & (i[:, None] >= i[None, :])                       # no key tile above the diagonal
        full = full & (i[:, None] > i[None, :])                        # the diagonal tile needs the mask
    partial = meet & ~full
    ids = doc_ids[:, :s]

    def mask_mod(bi, h, q, kv):
        same = ids[bi, q] == ids[bi, kv]
        return same & (q >= kv) if causal else same

    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(s, s))


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, n) booleans → BlockMask's (count, indices) per query tile, with a head dimension of 1."""
    tiles = tiles[:, None].to(torch.int32)
    return (tiles.sum(-1, dtype=torch.int32),
            torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32))


_compiled_flex = None


def flex(q, k, v, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention, compiled on CUDA (the fused kernel); eager elsewhere, where it is the unfused
    reference that materialises the scores (fine for CPU tests, never a GPU training path)."""
    global _compiled_flex
    if torch.compiler.is_compiling():    # inside a compiled model: fused by that same compilation
        return flex_attention(q, k, v, block_mask=block_mask)
    if q.device.type != "cuda":
        import warnings

        with warnings.catch_warnings():   # "called without torch.compile": expected on CPU
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def attention_inputs(impl: str, doc_ids: torch.Tensor, causal: bool):
    """What every layer's attention needs, built once per forward and shared by all layers."""
    if impl == "flex":
        return document_block_mask(doc_ids, causal)
    if impl == "flash":
        return cu_seqlens(doc_ids)
    return document_mask(doc_ids, causal)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.causal = cfg.heads, cfg.causal
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x, pos_ids, impl: str, attn):
        """``attn`` is what ``impl`` needs, built once per forward: the dense mask (sdpa), the BlockMask
        (flex) or the varlen boundaries (flash)."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, pos_ids), rotary(k, pos_ids)
        if impl == "flash":
            bounds, max_len = attn
            unpack = lambda t: t.transpose(1, 2).reshape(b * s, self.heads, d // self.heads)  # noqa: E731
            y = flash_attn_varlen_func(unpack(q), unpack(k), unpack(v), bounds, bounds, max_len, max_len,
                                       causal=self.causal)
            return self.out(y.reshape(b, s, d))
        if impl == "flex":
            y = flex(q, k, v, attn)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x, pos_ids, impl, attn):
        x = x + self.attn(self.norm1(x), pos_ids, impl, attn)
        return x + self.proj(F.gelu(self.fc(self.norm2(x))))


class MaskedLMHead(nn.Module):
    """ESM-2's output head: dense → GELU → LayerNorm → the tied embedding matrix, plus a bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, embedding: torch.Tensor):
        return F.linear(self.norm(F.gelu(self.dense(x))), embedding, self.bias)


class ProteinLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        # Output weight tied to ``embed``: directly for CLM (GPT-NeoX), through ESM-2's head for MLM.
        self.mlm_head = None if cfg.causal else MaskedLMHead(cfg)
        self.apply(self._init)
        for block in self.blocks:   # GPT-2: scale the residual projections by 1/sqrt(2·L)
            for w in (block.attn.out.weight, block.proj.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, pos_ids: torch.Tensor, doc_ids: torch.Tensor,
                labels: torch.Tensor | None = None):
        """Logits (B, S, vocab) for tokens (B, S); with ``labels``, the mean cross-entropy over the
        positions whose label is not IGNORE_INDEX instead."""
        impl = resolve_attention(self.cfg.attention, tokens.device)
        attn = attention_inputs(impl, doc_ids, self.cfg.causal)
        x = self.embed(tokens)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, pos_ids, impl, attn, use_reentrant=False)
            else:
                x = block(x, pos_ids, impl, attn)
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.mlm_head is None else self.mlm_head(x, self.embed.weight)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    def load_transfer(self, state: dict) -> None:
        """CLM→MLM transfer: take every weight of a trained CLM (embedding, blocks, final norm); an MLM's
        own output head starts with an identity dense layer, so that it passes the CLM's final features on
        (through GELU and a LayerNorm) instead of scrambling them. Any other mismatch is an error."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if self.mlm_head is not None and any(k.startswith("mlm_head.") for k in missing):
            with torch.no_grad():   # start the new head near the CLM's own output path (identity dense)
                self.mlm_head.dense.weight.copy_(torch.eye(self.cfg.d_model))
                self.mlm_head.dense.bias.zero_()
        missing = [k for k in missing if not k.startswith("mlm_head.")]
        if missing or unexpected:
            raise ValueError(f"transfer weights do not fit this model: missing {missing}, unexpected {unexpected}")

    def count_parameters(self) -> tuple[int, int]:
        """(n_params, n_params_non_embedding) counted from the module itself."""
        total = sum(p.numel() for p in self.parameters())
        non_emb = sum(m.weight.numel() for b in self.blocks for m in b.modules() if isinstance(m, nn.Linear))
        return total, non_emb
