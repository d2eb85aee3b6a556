"""The demo sweep (``make demo``): an adaptive MLM IsoFLOP frontier and a CLM→MLM transfer pair, 2 CPU cores.

MLM, 3 budgets (1e10, 3e10, 1e11 FLOPs) × micro/tiny sizes of 768 to 147k non-embedding parameters. Each
budget's candidates are the sizes that train between 60k tokens and the ~3.0M unique training tokens of
the bundled proteins (no sequence is seen twice); the first pass trains 3 of them per budget (smallest,
middle, largest), then adaptive waves (``sweep/adaptive.py``) add sizes where a budget's minimum is not
bracketed or least certain, up to 13 IsoFLOP trials (the full grid has 17). Beside them: a micro-3 CLM
trained at 1e10 and an MLM initialised from it, paired with the scratch micro-3 MLM of the grid.

Chosen from measurements (plain-PyTorch probes of the same model, batches and recipe, val_loss on all
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
* Evaluation: 64 rows (~1.2k masked tokens, the old setting) differ from all 864 rows by up to 0.016
  nats; ``eval_rows`` 512 (~9.6k masked tokens) gives a standard error of ~0.004 nats, well below the
  run-to-run spread (~0.02-0.04) and the differences fitted (0.05-0.2 across a budget).
"""

from protscale.sweep.adaptive import Adaptive
from protscale.sweep.space import SearchSpace, transfer_grid

GRID = Adaptive(
    budgets=[1e10, 3e10, 1e11],
    sizes=["micro-1", "micro-2", "micro-3", "micro-4", "micro-5", "tiny-1", "tiny-2", "tiny-3"],
    objectives=["mlm"],
    coarse=3,                   # per budget: its smallest, middle and largest candidate
    min_tokens=60_000,
    max_tokens=3_000_000,       # the bundled proteins' unique training tokens (demo data: ~3.02M)
    max_trials=13,
    target_width=0.15,
    per_budget=2,
)

SPACE = SearchSpace(
    name="demo-cpu",
    data=".demo/data",
    trials=list(dict.fromkeys(GRID.first_pass() + transfer_grid(sizes=["micro-3"], clm_budgets=[1e10],
                                                                  mlm_budgets=[1e10]))),
    adaptive=GRID,
    defaults={"batch_tokens": 512, "eval_rows": 512},
    max_concurrent=2,
)
