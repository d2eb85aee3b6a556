"""The demo sweep: CLM and MLM IsoFLOP profiles of tiny models on the bundled proteins, 2 CPU cores.

3 budgets × 4 sizes × 2 objectives = 24 trials (`make demo` prepares the data into .demo/data).
"""

from protscale.sweep.space import SearchSpace, isoflop_grid

SPACE = SearchSpace(
    name="demo-cpu",
    data=".demo/data",
    trials=isoflop_grid(budgets=[1e11, 3e11, 8e11], sizes=["tiny-3", "tiny-4", "tiny-5", "tiny-6"],
                        objectives=["clm", "mlm"]),
    defaults={"batch_tokens": 2048, "eval_rows": 64},
    max_concurrent=2,
)
