"""protscale: compute-optimal protein language models on Ray Tune, Ray Train + DeepSpeed and MLflow.

Data flow (one sub-package per stage):

    data/      FASTA(.gz) -> validated, de-duplicated, split, tokenised, packed Parquet shards + manifest
    model/     one transformer for CLM and MLM; size grid, parameter counts, FLOPs per token
    train/     one trial: Ray Train TorchTrainer whose workers run a DeepSpeed engine
    tracking/  the MLflow contract every trial, importer and the analyzer share
    sweep/     search spaces and Ray Tune over many trials
    analysis/  bulk read of the tracking store, scaling/transfer-law fits, report, plan
    cluster/   Ray Jobs submission (KubeRay manifests live in k8s/)
"""

__version__ = "0.1.0"
