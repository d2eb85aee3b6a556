"""The size grid, parameter counts and FLOPs per token.

Conventions (recorded with every run as ``flops_convention``):

* ``n_params_non_embedding`` (N) counts the weight matrices of the transformer blocks: 12·L·d² (Kaplan
  et al.; attention 4d², MLP 8d²; biases, norms and embeddings excluded). This is the N of the paper's
  size table and of its compute axis C = 6·N·D.
* ``n_params`` counts every trainable parameter of the model, embeddings, biases and norms included.
* Training FLOPs per token = 6·N + 12·L·d·S_eff (PaLM's MFU convention: forward QKᵀ and AV cost
  4·d·S_eff per layer, ×3 for forward + backward), where S_eff = Σ l² / Σ l over the packed segments
  of lengths l: the mean number of keys a token attends to under the block-diagonal document mask
  (causal masking is not halved, as in PaLM).
* The ``flops`` metric and ``budget_flops`` use the paper's axis, 6·N per token, so that a trial
  stops at D = C / (6·N) tokens; MFU uses the full count above.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOPS_CONVENTION = "C=6*N*D (N=12*L*d^2, non-embedding); MFU: 6*N+12*L*d*S_eff per token"


@dataclass(frozen=True)
class ModelSize:
    name: str
    layers: int
    d_model: int
    heads: int
    reference_n: int | None = None     # the paper's N for this label, when it comes from its table

    def __post_init__(self):
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise ValueError(f"model size {self.name}: d_model {self.d_model} must split into {self.heads} heads "
                             "of an even width (rotary embeddings rotate pairs of channels)")

    @property
    def n_params_non_embedding(self) -> int:
        return 12 * self.layers * self.d_model ** 2

    def n_params(self, vocab_size: int, objective: str) -> int:
        """Every parameter of ``protscale.model.transformer.ProteinLM`` (tied input/output embedding)."""
        d, L = self.d_model, self.layers
        per_layer = 12 * d * d + 9 * d + 4 * d      # matrices; qkv/proj/fc/out biases (3d+d+4d+d); 2 norms
        total = L * per_layer + vocab_size * d + 2 * d       # blocks, embedding, final norm
        if objective == "mlm":                               # ESM-2's head: dense, norm, output bias
            total += d * d + d + 2 * d + vocab_size
        return total


def _paper(name: str, layers: int, d_model: int, reference_n: int) -> ModelSize:
    return ModelSize(name, layers, d_model, d_model // 64, reference_n)


# Shapes for the paper's size labels (table in shared/data/reference-logs/README.md). 21 labels are
# exactly 12·L·d²; the others are not of that form for any (L, d) and get the nearest shape with
# head size 64 (within 0.5% of the table, 13M within 2.5%); ``reference_n`` keeps the table's N.
PAPER_SIZES: dict[str, ModelSize] = {s.name: s for s in (
    _paper("3M", 8, 192, 3_538_944), _paper("6M", 8, 256, 6_291_456), _paper("10M", 8, 320, 9_830_400),
    _paper("13M", 11, 320, 13_192_320), _paper("20M", 8, 448, 19_267_584),
    _paper("25M", 8, 512, 25_165_824), _paper("34M", 14, 448, 33_690_624),
    _paper("40M", 10, 576, 39_813_120), _paper("47M", 12, 576, 47_775_744),
    _paper("65M", 11, 704, 65_728_000), _paper("85M", 12, 768, 84_934_656),
    _paper("106M", 15, 768, 106_168_320), _paper("127M", 26, 640, 127_699_968),
    _paper("154M", 26, 704, 154_448_288), _paper("170M", 12, 1088, 170_233_344),
    _paper("200M", 21, 896, 202_309_632), _paper("230M", 24, 896, 231_211_008),
    _paper("300M", 24, 1024, 302_426_080), _paper("393M", 20, 1280, 393_216_000),
    _paper("470M", 24, 1280, 472_435_184), _paper("550M", 28, 1280, 550_502_400),
    _paper("650M", 23, 1536, 650_930_624), _paper("680M", 24, 1536, 680_205_312),
    _paper("880M", 23, 1792, 886_308_864), _paper("1.2B", 24, 2048, 1_208_881_136),
    _paper("1.5B", 24, 2304, 1_528_823_808), _paper("1.7B", 63, 1536, 1_784_851_968),
    _paper("2B", 26, 2560, 2_044_723_200), _paper("2.4B", 30, 2560, 2_359_296_000),
    _paper("2.8B", 60, 1984, 2_834_283_904), _paper("3.4B", 36, 2816, 3_425_697_792),
    _paper("4B", 36, 3072, 4_076_863_488), _paper("5B", 40, 3200, 4_917_322_640),
    _paper("6B", 40, 3584, 6_165_626_880), _paper("7B", 64, 3072, 7_247_758_312),
    _paper("10B", 47, 4352, 10_682_105_856),
)}

# Tiny sizes for CPU runs (tests, the demo sweep): non-embedding N from 25k to 2.5M.
TINY_SIZES: dict[str, ModelSize] = {s.name: s for s in (
    ModelSize("tiny-1", 2, 32, 2), ModelSize("tiny-2", 2, 48, 3), ModelSize("tiny-3", 3, 64, 4),
    ModelSize("tiny-4", 4, 96, 6), ModelSize("tiny-5", 6, 128, 8), ModelSize("tiny-6", 8, 160, 5),
)}

# Micro sizes for the CPU demo's IsoFLOP frontier (N from 192 to 13.8k, about ×1.4-2.2 apart; an "x.5" size
# sits between its neighbours): at 1e9-1e10 FLOPs the compute-optimal N is this small (search_spaces/demo_cpu.py
# has the measurements).
MICRO_SIZES: dict[str, ModelSize] = {s.name: s for s in (
    ModelSize("nano-1", 1, 4, 1), ModelSize("nano-2", 1, 6, 1),
    ModelSize("micro-1", 1, 8, 1), ModelSize("micro-1.5", 1, 10, 1), ModelSize("micro-2", 1, 12, 1), ModelSize("micro-2.5", 1, 14, 1), ModelSize("micro-3", 1, 16, 2),
    ModelSize("micro-3.5", 1, 20, 2), ModelSize("micro-4", 1, 24, 2), ModelSize("micro-4.5", 1, 28, 2),
    ModelSize("micro-5", 2, 24, 2),
)}

# Shapes of public models users compare against (benchmarks).
REFERENCE_SHAPES: dict[str, ModelSize] = {s.name: s for s in (
    ModelSize("esm2-650M", 33, 1280, 20), ModelSize("esm2-3B", 36, 2560, 40),
)}

SIZES: dict[str, ModelSize] = {**MICRO_SIZES, **TINY_SIZES, **PAPER_SIZES, **REFERENCE_SHAPES}


def get_size(name: str) -> ModelSize:
    try:
        return SIZES[name]
    except KeyError:
        raise KeyError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}") from None


# Dense bf16 peak FLOP/s of one device (vendor figures), for MFU and GPU-hour estimates.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float:
    """The dense bf16 peak of a device by its name (``torch.cuda.get_device_name``); 0 when unknown."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), 0.0)


def effective_context(seq_lens) -> float:
    """S_eff = Σ l² / Σ l over segment lengths (any iterable of ints or arrays of ints)."""
    import numpy as np

    lens = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in seq_lens]) if seq_lens else np.zeros(0)
    total = lens.sum()
    return float((lens ** 2).sum() / total) if total else 0.0


def train_flops_per_token(size: ModelSize, s_eff: float) -> float:
    """6·N + 12·L·d·S_eff (see the module docstring)."""
    return 6.0 * size.n_params_non_embedding + 12.0 * size.layers * size.d_model * s_eff


def tokens_for_budget(size: ModelSize, budget_flops: float) -> int:
    """D = C / (6·N)."""
    return int(budget_flops / (6.0 * size.n_params_non_embedding))
