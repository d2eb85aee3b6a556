"""A CPU-sized transfer sweep: 2 tiny CLM parents, MLMs started from them, and scratch MLMs."""

from protscale.sweep.space import SearchSpace, transfer_grid

SPACE = SearchSpace(
    name="demo-transfer",
    data=".demo/data",
    trials=transfer_grid(sizes=["tiny-2", "tiny-3"], clm_budgets=[5e10], mlm_budgets=[2e10, 5e10]),
    defaults={"batch_tokens": 4096, "eval_rows": 64},
    max_concurrent=2,
)
