"""One transformer for both objectives: CLM (causal mask, next-token loss) and MLM (bidirectional,
masked-token loss). Pre-LayerNorm blocks, rotary position embeddings, GELU MLP of width 4·d, no
dropout, input and output embeddings tied (as in ESM-2).

Rows are packed: several proteins share a row of ``seq_len`` tokens. ``doc_ids`` (B, S) numbers the
segments of each row and ``pos_ids`` (B, S) restarts at 0 in each segment, so attention never crosses
from one protein into another and a protein packed anywhere gets the same positions as alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.tokenizer import VOCAB_SIZE
from .sizes import ModelSize

try:  # optional GPU kernel
    from flash_attn import flash_attn_varlen_func
except Exception:  # ImportError, or a build that does not match this torch/CUDA
    flash_attn_varlen_func = None

IGNORE_INDEX = -100


@dataclass
class ModelConfig:
    layers: int
    d_model: int
    heads: int
    causal: bool                     # True for CLM, False for MLM
    vocab_size: int = VOCAB_SIZE
    attention: str = "auto"          # "auto" | "sdpa" | "flash"
    activation_checkpointing: bool = False   # recompute each block in backward: keep only block inputs

    @classmethod
    def from_size(cls, size: ModelSize, objective: str, attention: str = "auto",
                  activation_checkpointing: bool = False) -> "ModelConfig":
        return cls(size.layers, size.d_model, size.heads, causal=objective == "clm", attention=attention,
                   activation_checkpointing=activation_checkpointing)


def resolve_attention(choice: str, device: torch.device) -> str:
    """``auto`` picks flash-attn varlen on CUDA when it is importable, PyTorch SDPA otherwise."""
    if choice == "auto":
        return "flash" if flash_attn_varlen_func is not None and device.type == "cuda" else "sdpa"
    if choice == "flash" and (flash_attn_varlen_func is None or device.type != "cuda"):
        raise RuntimeError("attention='flash' needs the flash-attn package and a CUDA device")
    if choice not in ("sdpa", "flash"):
        raise ValueError(f"unknown attention implementation {choice!r} (auto, sdpa, flash)")
    return choice


# --- rotary position embedding ---------------------------------------------------------------------

def rotary(x: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x (B, H, S, Dh) by angles pos·θ_i, θ_i = 10000^(-2i/Dh)."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh))
    angles = pos_ids.to(torch.float32)[:, None, :, None] * inv_freq          # (B, 1, S, Dh/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


# --- attention ---------------------------------------------------------------------------------------

def document_mask(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, S, S) boolean mask: True where query i may attend to key j (same segment, j ≤ i if causal)."""
    mask = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    if causal:
        s = doc_ids.shape[1]
        mask = mask & torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return mask


def cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative segment boundaries over the flattened batch, for flash-attn's varlen kernels."""
    flat = doc_ids.flatten()
    row_start = torch.zeros_like(flat, dtype=torch.bool)
    row_start[:: doc_ids.shape[1]] = True
    starts = torch.nonzero(row_start | torch.cat([flat.new_ones(1, dtype=torch.bool), flat[1:] != flat[:-1]]))
    bounds = torch.cat([starts.flatten(), flat.new_tensor([flat.numel()])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.causal = cfg.heads, cfg.causal
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x, pos_ids, doc_ids, impl: str, mask=None, varlen=None):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, pos_ids), rotary(k, pos_ids)
        if impl == "flash":
            bounds, max_len = varlen
            unpack = lambda t: t.transpose(1, 2).reshape(b * s, self.heads, d // self.heads)  # noqa: E731
            y = flash_attn_varlen_func(unpack(q), unpack(k), unpack(v), bounds, bounds, max_len, max_len,
                                       causal=self.causal)
            y = y.reshape(b, s, d)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, d)
        return self.out(y)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x, pos_ids, doc_ids, impl, mask=None, varlen=None):
        x = x + self.attn(self.norm1(x), pos_ids, doc_ids, impl, mask, varlen)
        return x + self.proj(F.gelu(self.fc(self.norm2(x))))


class ProteinLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))   # output weight is tied to embed
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
        mask = document_mask(doc_ids, self.cfg.causal) if impl == "sdpa" else None
        varlen = cu_seqlens(doc_ids) if impl == "flash" else None
        x = self.embed(tokens)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, pos_ids, doc_ids, impl, mask, varlen, use_reentrant=False)
            else:
                x = block(x, pos_ids, doc_ids, impl, mask, varlen)
        logits = F.linear(self.norm(x), self.embed.weight, self.head_bias)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    def count_parameters(self) -> tuple[int, int]:
        """(n_params, n_params_non_embedding) counted from the module itself."""
        total = sum(p.numel() for p in self.parameters())
        non_emb = sum(m.weight.numel() for b in self.blocks for m in b.modules() if isinstance(m, nn.Linear))
        return total, non_emb
