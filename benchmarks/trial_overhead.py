"""Where the time of one trial goes on CPU: fixed overhead (Ray, worker start, DeepSpeed, MLflow,
evaluations, checkpoints) against training, and the ratio to a plain PyTorch loop over the same batches.

    .venv/bin/python benchmarks/trial_overhead.py [--size tiny-3] [--tokens 200000]

Runs, in one process: Ray start; the trial as a 1-worker TorchTrainer group (what `protscale train`
does); the same trial in Train's local mode (what a CPU sweep does per Tune trial); and the baseline, a
plain PyTorch loop over the same batches (same model, optimizer and schedule; no Ray, DeepSpeed, MLflow,
evaluation or checkpoint). Prints each wall time, the training part of it, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def plain_loop(cfg, data: str) -> tuple[float, int]:
    """The baseline: the trial's batches through the same model and optimizer, nothing else."""
    import numpy as np
    import torch

    from protscale.data.shards import SplitReader
    from protscale.model.transformer import ModelConfig, ProteinLM
    from protscale.train import recipe
    from protscale.train.batches import Schedule, build_batch
    from protscale.train.plan import Plan

    train = SplitReader(data, "train")
    plan = Plan(cfg, train.seq_len, 1)
    schedule = Schedule.for_reader(train, cfg.seed, plan.global_rows)
    model = ProteinLM(ModelConfig.from_size(cfg.model_size, cfg.objective))
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr_max, betas=recipe.ADAM_BETAS, eps=recipe.ADAM_EPS,
                            weight_decay=recipe.WEIGHT_DECAY)
    start, tokens = time.perf_counter(), 0
    for step in range(1, plan.steps + 1):
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(step, plan.steps, plan.lr_max)
        rows, lens = train.rows(schedule.rows(step, plan.global_rows))
        batch = build_batch(rows, lens, cfg.objective, [(cfg.seed, step, i) for i in range(len(lens))])
        loss = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.GRAD_CLIP)
        opt.step()
        tokens += int(sum(int(np.sum(x)) for x in lens))
    return time.perf_counter() - start, tokens


def training_seconds(uri: str, run_id: str) -> float:
    """Time spent in optimizer steps: each evaluation interval's tokens over its measured tokens/s."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    tokens = {m.step: m.value for m in client.get_metric_history(run_id, "tokens")}
    speed = {m.step: m.value for m in client.get_metric_history(run_id, "tokens_per_s")}
    total, previous = 0.0, 0.0
    for step in sorted(tokens):
        total += (tokens[step] - previous) / speed[step]
        previous = tokens[step]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny-3")
    parser.add_argument("--tokens", type=int, default=200_000, help="training tokens of the trial")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from protscale.data import MAIN, OOD
    from protscale.data.prepare import prepare
    from protscale.model.sizes import get_size
    from protscale.train.config import TrialConfig
    from protscale.train.trial import finish, prepare_run, run_trial, trainer

    tmp = Path(tempfile.mkdtemp(prefix="protscale-bench-"))
    data = tmp / "data"
    prepare([MAIN], data, ood=OOD, seq_len=128, val_fraction=0.05, progress=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    budget = 6 * get_size(args.size).n_params_non_embedding * args.tokens

    def cfg(name: str) -> TrialConfig:
        return TrialConfig(objective="clm", size=args.size, budget_flops=budget, data=str(data), tracking_uri=uri,
                           experiment="bench", name=name, batch_tokens=2048, eval_rows=64)

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
    ray_start = time.perf_counter() - t

    group = run_trial(cfg("worker-group"), workers=(1, 1), storage=str(tmp / "runs"))
    group_train = training_seconds(uri, group.run_id)

    local_cfg = prepare_run(cfg("local-mode"))
    t = time.perf_counter()
    local = finish(local_cfg, trainer(local_cfg, (0, 0), str(tmp / "runs"), max_failures=0).fit(),
                   time.perf_counter() - t)
    local_train = training_seconds(uri, local.run_id)
    ray.shutdown()

    base_s, base_tokens = plain_loop(cfg("baseline"), str(data))

    print(f"\none CLM trial of {args.size}, {base_tokens:,} tokens, batch 2048 tokens, on {os.cpu_count()} CPUs")
    print(f"{'':34}{'wall s':>9}{'training s':>12}{'overhead s':>12}{'x baseline':>12}")
    print(f"{'Ray start (once per driver)':34}{ray_start:9.1f}")
    for name, wall, train_s in (("trial, 1-worker TorchTrainer", group.wall_s, group_train),
                                ("trial, Train local mode (sweeps)", local.wall_s, local_train),
                                ("baseline: plain PyTorch loop", base_s, base_s)):
        print(f"{name:34}{wall:9.1f}{train_s:12.1f}{wall - train_s:12.1f}{wall / base_s:12.2f}")


if __name__ == "__main__":
    main()
