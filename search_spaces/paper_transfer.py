"""The paper's CLM→MLM transfer grid: CLM parents at several budgets, MLMs initialised from each, and
scratch MLM baselines of the same sizes and budgets (Cheng et al. 2024, Section 5)."""

from protscale.sweep import paper
from protscale.sweep.space import SearchSpace, transfer_grid

SPACE = SearchSpace(
    name="paper-transfer",
    data=paper.DATA,
    trials=transfer_grid(sizes=["85M", "170M", "470M"], clm_budgets=[1e19, 3e19], mlm_budgets=[1e19, 3e19, 1e20]),
    defaults=paper.DEFAULTS,
    gpus_per_trial=1,
)
