"""The demo sweep (``make demo``): an adaptive MLM IsoFLOP frontier and CLM→MLM transfer pairs, 2 CPU cores.

MLM, 3 budgets (1e9, 3e9, 1e10 FLOPs) over a ladder of 12 sizes about ×1.5 apart (non-embedding N from 192
to 24.6k; the "x.5" sizes sit between their neighbours). Each budget's candidates are the sizes that train
between 40k and 2.5M tokens (the bundled proteins hold ~3.0M unique training tokens: no sequence is seen
twice): 7, 9 and 10 sizes, the **full grid** of 26 trials (1.34e11 FLOPs). The first pass trains 3 of them
per budget (smallest, middle, largest), then adaptive waves (``sweep/adaptive.py``) add sizes where a
budget's minimum is not bracketed or least certain, until the N_opt exponent's 95% interval is at most
0.45 wide (the full grid's is 0.51). Beside them: a micro-3 CLM trained at 1e10 and MLMs initialised from it
at 1e9 and 3e9, each paired with the scratch micro-3 MLM of the same budget (an IsoFLOP candidate too).

The full grid, trained (``benchmarks/demo_adaptive.py``: real trials, batch 512 tokens, ``eval_rows`` 512;
MLM val_loss by non-embedding N):

=====  ==========================================================================================
1e9    192: 2.813 · 432: 2.789 · 768: 2.816 · 1,200: 2.814 · 1,728: 2.836 · 2,352: 2.846 · 3,072: 2.867
3e9    432: 2.751 · 768: 2.739 · 1,200: 2.733 · 1,728: 2.743 · 2,352: 2.737 · 3,072: 2.761 · 4,800: 2.821 ·
       6,912: 2.799 · 9,408: 2.844
1e10   768: 2.714 · 1,200: 2.704 · 1,728: 2.700 · 2,352: 2.701 · 3,072: 2.702 · 4,800: 2.716 · 6,912: 2.726 ·
       9,408: 2.742 · 13,824: 2.814 · 24,576: 2.895
=====  ==========================================================================================

Every budget's minimum is inside its sizes; the bottoms are flat (within ~0.01 nats over a factor 2-4 in
N at 3e9 and 1e10), so each vertex, and the exponent, is uncertain. Full grid: N_opt ∝ C^0.694
[0.474, 0.981]. The adaptive path on the same trials (``benchmarks/demo_adaptive.py`` replays
``adaptive.next_wave`` with this space; CPU training is deterministic, so the live demo trains the same
trials): first pass 10 trials, C^0.573 [0.348, 0.825]; wave 1 (micro-1, micro-2 at 1e9) C^0.624
[0.078, 1.053]; wave 2 (nano-2 at 1e9, micro-3.5 and micro-4 at 1e10): **15 trials, 51% of the grid's
compute, C^0.665 [0.483, 0.916]**, 0.86 of the full grid's width, done. The seed-to-seed spread of one
trial is up to 0.025 nats at 1e9 and 0.002 at 1e10 (earlier probes): the smallest budget is the noisiest,
and its extra sizes are cheap. (A 3-layer size of d_model 4 between nano-2 and micro-1 was tried and
dropped: 2.823 at 3e9, far above both neighbours; depth and width at this scale are not interchangeable.)

Measured (``make demo`` from a fresh clone of c8c6828, quiet 2-core machine): done in 327 s, set-up
18 s, sweep 303 s, fit 6 s; 18 trials (15 IsoFLOP, the CLM, 2 transfer MLMs); the waves and losses exactly as
replayed; the report (400 bootstrap replicates): N_opt ∝ C^0.665 [0.467, 0.900].

Transfer pairs (real trials): CLM micro-3 at 1e10 ends at 2.8767 (unigram 2.891: CLMs stay near the plateau
at these budgets, so the demo fits no CLM frontier); MLM micro-3 at 1e9 2.8671 → 2.8321 from the CLM
(−0.035 nats), at 3e9 2.7609 → 2.7502 (−0.011). What the CLM learns (the residue distribution,
embeddings) is worth most to an MLM that has had few tokens of its own.

Earlier measurements that shaped the design (plain-PyTorch probes of the same model, batches and recipe,
val_loss on all 864 validation rows = 16k masked tokens):

* Batch: at 1e10 with 2,048-token batches the larger models are step-starved and the minimum sits at the
  smallest size; 512-token batches (4 rows, 4× the steps) move it inside the grid, hence ``batch_tokens``
  512.
* Budgets: at 1e11 the minimum lies at N ≈ 2.5k, which needs ~7M tokens per trial, more than the bundled
  data and the 8-minute wall allow; at 3e10 and above CLMs still sit on the unigram plateau.
* Evaluation: 64 rows (~1.2k masked tokens) differ from all 864 rows by up to 0.016 nats; ``eval_rows`` 512
  (~9.6k masked tokens) gives a standard error of ~0.004 nats, below the run-to-run spread (~0.01-0.02) and
  the differences fitted (0.05-0.2 across a budget).
"""

from protscale.sweep.adaptive import Adaptive
from protscale.sweep.space import SearchSpace, transfer_grid

GRID = Adaptive(
    budgets=[1e9, 3e9, 1e10],
    sizes=["nano-1", "nano-2", "micro-1", "micro-1.5", "micro-2", "micro-2.5", "micro-3", "micro-3.5", "micro-4",
           "micro-4.5", "micro-5", "tiny-1"],
    objectives=["mlm"],
    coarse=3,                   # per budget: its smallest, middle and largest candidate
    min_tokens=40_000,
    max_tokens=2_500_000,       # below the bundled proteins' ~3.02M unique training tokens
    max_trials=18,
    target_width=0.45,          # just under the full grid's 95% interval (0.51 wide, measured above)
    per_budget=2,
)

# MLM budgets of the transfer pairs (CLM micro-3 at 1e10 -> MLM micro-3, against scratch micro-3 MLMs): the
# CLM start is worth most where the MLM budget is small (measured above)
TRANSFER_MLM_BUDGETS = [1e9, 3e9]

SPACE = SearchSpace(
    name="demo-cpu",
    data=".demo/data",
    trials=list(dict.fromkeys(GRID.first_pass() + transfer_grid(sizes=["micro-3"], clm_budgets=[1e10],
                                                                  mlm_budgets=TRANSFER_MLM_BUDGETS))),
    adaptive=GRID,
    defaults={"batch_tokens": 512, "eval_rows": 512},
    max_concurrent=2,
)
