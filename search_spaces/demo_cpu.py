"""The demo sweep (``make demo``): an adaptive MLM IsoFLOP frontier and CLM→MLM transfer pairs, 2 CPU cores.

MLM, 3 budgets a decade apart (1e9, 3e9, 1e10 FLOPs) × nano/micro sizes of 192 to 24.6k non-embedding
parameters. Each budget's candidates are the sizes that train between 40k and 2.5M tokens (the bundled
proteins hold ~3.0M unique training tokens: no sequence is seen twice); the first pass trains 3 of them per
budget (smallest, middle, largest), then adaptive waves (``sweep/adaptive.py``) add sizes where a budget's
minimum is not bracketed or least certain, up to 12 IsoFLOP trials (the full grid has 16, 8.1M tokens).
Beside them: a micro-3 CLM trained at 1e10 and MLMs initialised from it at 1e9 and 3e9 FLOPs, each paired
with the scratch micro-3 MLM of the same budget (both are IsoFLOP candidates too).

Why these budgets: at 1e11 the loss minimum lies at N ≈ 2.5k, which needs ~7M tokens per trial, more than
the bundled data and the 8-minute wall allow (last design: 1e10/3e10/1e11, whose 1e11 budget was never
bracketed); at 1e9 the minimum sits near N = 432, inside the sizes, and a whole 1e9 column costs 1.6M
tokens.

Probes for this design (plain-PyTorch copy of the trial: same model, batches, AdamW recipe, lr 5e-3,
batch 512 tokens, val_loss on every validation row; seeds 0 / 1 where two are given; CPU-seconds per
trial in one thread 2-25 s, ~40k tokens per CPU-second):

=========  =====================================================================================
budget     MLM val_loss by non-embedding N
=========  =====================================================================================
1e9        192: 2.814 / 2.817 · 432: 2.794 / 2.786 · 768: 2.820 / 2.795 · 1,728: 2.841 / 2.846 ·
           3,072: 2.872 / 2.861  (minimum near 432-768, bracketed)
3e9        432: 2.755 · 768: 2.744 · 1,728: 2.749 · 3,072: 2.767 / 2.778 · 6,912: 2.806  (bracketed)
1e10       1,728: 2.707 / 2.709 · 13,824: 2.819 (earlier probes and real trials: 768: 2.714, 3,072: 2.702,
           6,912: 2.726, 24,576: 2.895)
=========  =====================================================================================

The seed-to-seed spread is up to 0.025 nats at 1e9 (micro-1) and 0.002 at 1e10 (micro-2): the smallest
budget is the noisiest, so the adaptive waves' extra sizes there are cheap and useful. Placement replayed
on these probe values (``next_wave`` with this space, the transfer baselines counted as grid points): the
first pass and one wave (nano-2, micro-2 at 1e9) use 12 of the 16 trials and 59% of the grid's compute,
N_opt ∝ C^0.62 [0.49, 1.03]; two more 1e10 sizes (max_trials 14, 84%) do not narrow it (0.60 wide): the
1e10 bottom is flat within 0.012 nats from N = 768 to 3,072.

Measured (``protscale demo`` from a fresh clone, quiet 2-core machine): done in 389 s, set-up 21 s, sweep
360 s, fit 8 s; 15 trials. MLM val_loss (real trials): 1e9: nano-1 2.813, nano-2 2.789, micro-1 2.816,
micro-2 2.836, micro-3 2.867; 3e9: nano-2 2.751, micro-1 2.739, micro-2 2.743, micro-3 2.761, micro-4 2.799;
1e10: micro-1 2.714, micro-2 2.700, micro-3 2.702, micro-4 2.726, micro-5 2.814, tiny-1 2.895 (the full
grid: the adaptive demo trains 12 of these 16, the other 4 were trained afterwards with the same sweep
name, its finished trials reused). Adaptive, 12 trials (65% of the grid's compute, stopped by
``max_trials``): N_opt ∝ C^0.627 [0.388, 0.968]; the full grid: C^0.687 [0.503, 0.949]. So on this design
the adaptive path does not yet reach the full grid's interval (0.58 against 0.45 wide): at 3e9 it never
tried micro-1, the best size there, and with 4-6 sizes per budget a wave of 1-2 trials is a large share.
Transfer pairs: 1e9 2.8671 → 2.8321 (−0.035 nats), 3e9 2.7609 → 2.7502 (−0.011).

Earlier measurements (plain-PyTorch probes of the same model, batches and recipe, val_loss on all
864 validation rows = 16k masked tokens; ``protscale`` 2-core VM, loaded):

* MLM at 1e10 FLOPs, batch 2,048 tokens: N = 768: 2.730, 1,728: 2.721, 3,072: 2.702-2.738 (two runs:
  the run-to-run spread), 6,912: 2.771, 13,824: 2.859, 24,576: 2.899, 55,296: 2.959, 147k: 3.063.
  Batch 512 tokens (4 rows, 4× the steps): 3,072: 2.710, 6,912: 2.727, 13,824: 2.808, 24,576: 2.845,
  55,296: 2.895. Smaller batches help the larger models most (they are step-starved): the minimum moves
  inside the grid, hence ``batch_tokens`` 512.
* MLM at 3e9: 768: 2.795, 1,728: 2.823 (the minimum lies below the smallest size: too small a budget);
  at 3e10: 768: 2.701 (3 epochs), 3,072: 2.689.
* CLM at 1e10, batch 512: N = 3,072: 2.885, 6,912: 2.890, 13,824: 2.894 — on the unigram plateau
  (~2.89 nats): CLM needs far more tokens than these budgets buy, so the demo fits no CLM frontier.
* The demo itself (real trials, batch 512, ``eval_rows`` 512), val_loss by N: 1e10: 768: 2.714,
  1,728: 2.700, 3,072: 2.702, 6,912: 2.726, 24,576: 2.895; 3e10: 1,728: 2.677, 3,072: 2.678, 6,912: 2.697,
  55,296: 2.889; 1e11: 6,912: 2.672, 13,824: 2.693, 24,576: 2.698, 147k: 2.879. The bottom of each
  profile is flat within ~0.02 nats over a factor 2-4 in N, about the run-to-run spread: the N_opt
  exponent comes out with a wide interval, and at 1e11 the best size is the smallest the data allows.
  The micro-3 CLM at 1e10 ends at 2.877 (unigram 2.891), and the MLM started from it ends at 2.746 against
  2.702 from scratch: a CLM still on the plateau has nothing to transfer at this budget.
* Transfer (plain-PyTorch copy of the trial recipe, batch 512, lr 5e-3, all val rows;
  CLM micro-3 at 1e10: 2.886, still near the unigram plateau): MLM micro-3 val_loss, scratch → from the CLM,
  seeds 0 / 1: at 1e9 2.872 → 2.837 and 2.861 → 2.839 (−0.035, −0.022 nats); at 3e9 2.767 → 2.756 and
  2.778 → 2.765 (−0.010, −0.014); at 1e10 the real trials gave +0.009 and +0.044 (last session). What the
  CLM learns at 1e10 (the residue distribution, embeddings) is worth most to an MLM that has had few
  tokens of its own, so the pairs sit at 1e9 and 3e9; the seed-to-seed spread of one scratch MLM there is
  0.011-0.012 nats. Real trials (``protscale sweep`` of these 5 trials, Ray Tune + DeepSpeed, batch 512,
  ``eval_rows`` 512): CLM 2.8767; at 1e9 scratch 2.8671 → from the CLM 2.8321 (−0.035 nats), at 3e9
  2.7609 → 2.7502 (−0.011).
* Evaluation: 64 rows (~1.2k masked tokens, the old setting) differ from all 864 rows by up to 0.016
  nats; ``eval_rows`` 512 (~9.6k masked tokens) gives a standard error of ~0.004 nats, well below the
  run-to-run spread (~0.02-0.04) and the differences fitted (0.05-0.2 across a budget).
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
