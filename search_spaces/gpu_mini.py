"""One GPU, about 10 minutes: CLM and MLM IsoFLOP profiles of small models on the shared protein shards
(prepare them first: protscale data prepare --source ../shared/data/proteins/uniprot-go2014-part-00.fasta.gz
... --out data/proteins-1024)."""

from protscale.sweep.space import SearchSpace, isoflop_grid

SPACE = SearchSpace(
    name="gpu-mini",
    data="data/proteins-1024",
    trials=isoflop_grid(budgets=[1e15, 3e15, 1e16], sizes=["tiny-5", "3M", "6M", "10M"], objectives=["clm", "mlm"]),
    defaults={"batch_tokens": 65536, "eval_rows": 256},
    gpus_per_trial=0.5,
)
