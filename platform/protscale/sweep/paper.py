"""The grid of Cheng et al. (2024): the compute budgets and model sizes of its IsoFLOP sweeps."""

BUDGETS = [1e18, 3e18, 1e19, 3e19, 1e20, 3e20, 1e21]
SIZES = ["3M", "6M", "10M", "20M", "34M", "47M", "85M", "127M", "170M", "230M", "300M", "470M", "650M",
         "880M", "1.2B", "1.7B", "2.4B", "3.4B", "5B", "7B", "10B"]
DATA = "data/uniref50-metagenomic"       # a prepared UniRef50 + metagenomic corpus at seq_len 1024
DEFAULTS = {"eval_every": 500, "eval_rows": 512}
