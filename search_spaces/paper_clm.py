"""The paper's CLM IsoFLOP grid: budgets 1e18 … 1e21 FLOPs over its model sizes (Cheng et al. 2024).

Needs a GPU cluster and a prepared corpus of UniRef50 + metagenomic sequences at seq_len 1024.
"""

from protscale.sweep import paper
from protscale.sweep.space import SearchSpace, isoflop_grid

SPACE = SearchSpace(name="paper-clm", data=paper.DATA, defaults=paper.DEFAULTS, gpus_per_trial=1,
                    trials=isoflop_grid(budgets=paper.BUDGETS, sizes=paper.SIZES, objectives=["clm"]))
