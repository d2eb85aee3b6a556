"""The demo sweep: CLM and MLM IsoFLOP profiles of tiny models on the bundled proteins, 2 CPU cores.

3 budgets × 4 sizes × 2 objectives = 24 trials, 2 at a time (`make demo` prepares the data into
.demo/data: ~2M unique training tokens, so every trial sees each sequence at most once).

At these budgets the models are still near the unigram plateau (a model that knows only amino-acid
frequencies scores ~2.90 nats): MLMs leave it within a few hundred thousand tokens, CLMs need millions,
so the CLM profiles are flat and the fit says so rather than inventing a frontier.
"""

from protscale.sweep.space import SearchSpace, isoflop_grid

SPACE = SearchSpace(
    name="demo-cpu",
    data=".demo/data",
    trials=isoflop_grid(budgets=[4e10, 1e11, 2.5e11], sizes=["tiny-1", "tiny-2", "tiny-3", "tiny-4"],
                        objectives=["clm", "mlm"]),
    defaults={"batch_tokens": 2048, "eval_rows": 64},
    max_concurrent=2,
)
