"""The paper's MLM IsoFLOP grid: budgets 1e18 … 1e21 FLOPs over its model sizes (Cheng et al. 2024).

Needs a GPU cluster and a prepared corpus of UniRef50 + metagenomic sequences at seq_len 1024.
"""

from protscale.sweep.space import SearchSpace, isoflop_grid

BUDGETS = [1e18, 3e18, 1e19, 3e19, 1e20, 3e20, 1e21]
SIZES = ["3M", "6M", "10M", "20M", "34M", "47M", "85M", "127M", "170M", "230M", "300M", "470M", "650M",
         "880M", "1.2B", "1.7B", "2.4B", "3.4B", "5B", "7B", "10B"]

SPACE = SearchSpace(
    name="paper-mlm",
    data="data/uniref50-metagenomic",
    trials=isoflop_grid(budgets=BUDGETS, sizes=SIZES, objectives=["mlm"]),
    defaults={"eval_every": 500, "eval_rows": 512},
    gpus_per_trial=1,
)
