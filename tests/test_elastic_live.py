"""A live elastic resize: a bf16 trial with workers 1:3 on a real multi-node Ray cluster
(``ray.cluster_utils.Cluster``, 1 CPU per node) grows when a node joins and shrinks when it goes, each
time resuming from its latest checkpoint with the global batch and the LR schedule of the recipe.

The cluster runs in a child process, which first prepares the bundled proteins on it (Ray Data): the test
holds no Ray of its own, so it can run beside the tests that share the session's local Ray. The trial holds
after a checkpoint while ``PROTSCALE_HOLD_FILE`` exists (``faults.hold``), so the cluster changes at known steps:

    1 worker   steps 1-5, checkpoint, hold        -> a node joins: Train restarts the group with 2
    2 workers  steps 6-10 from step 5, hold       -> the node is removed: its worker dies, Train
    1 worker   steps 11-15 from step 10              restarts the group with 1
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from protscale.data.shards import SplitReader, read_manifest
from protscale.model.sizes import get_size
from protscale.tracking import contract as c
from protscale.train import recipe
from protscale.train.batches import Schedule
from protscale.train.loop import RESUMED_FROM_STEP

pytestmark = pytest.mark.slow

SIZE, ROWS, EVERY, STEPS = "micro-3", 8, 5, 15      # 8 rows per optimizer step; a checkpoint every 5 steps

CHILD = textwrap.dedent("""
    import json, os, sys, threading, time
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster

    from protscale.data import MAIN, OOD
    from protscale.data.prepare import prepare
    from protscale.train.config import TrialConfig
    from protscale.train.trial import run_trial

    args = json.loads(sys.argv[1])
    hold = Path(os.environ["PROTSCALE_HOLD_FILE"])
    out = {"events": []}

    def trial():
        try:
            result = run_trial(TrialConfig(**args["cfg"]), workers=(1, 3), storage=args["storage"],
                               max_failures=2, resize_check_s=1.0)
            out.update(run_id=result.run_id, status=result.status)
        except BaseException as e:
            out["error"] = repr(e)

    def wait_hold(after):
        while True:
            try:
                text = hold.read_text().strip()
            except FileNotFoundError:
                text = ""
            if text and int(text) > after:
                return int(text)
            if not worker.is_alive():
                raise SystemExit(f"the trial ended before holding after step {after}: {out}")
            time.sleep(0.2)

    # Ray starts nodes from the main thread only (signal handlers): the trial runs in a thread.
    # The dashboard on a free port: 8265 may be taken by the test session's own Ray.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_port": dashboard_port})
    ray.init(address=cluster.address, logging_level="WARNING")
    prepare([MAIN], Path(args["cfg"]["data"]), ood=OOD, seq_len=args["seq_len"], val_fraction=0.05, progress=False)
    t0 = time.time()
    worker = threading.Thread(target=trial, daemon=True)
    worker.start()
    step = wait_hold(0)                                   # 1 worker, its checkpoint written
    out["events"].append(("add_node", step))
    node = cluster.add_node(num_cpus=1)
    step = wait_hold(step)                                # the grown group, after its checkpoint
    out["events"].append(("remove_node", step))
    cluster.remove_node(node)
    hold.unlink()
    worker.join()
    out["wall_s"] = time.time() - t0
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
    cluster.shutdown()
""")


def _expected_tokens(data, seed: int) -> list[int]:
    """Unpadded tokens of each step's global batch, from the schedule alone (no world size in it)."""
    reader = SplitReader(data, "train", manifest=read_manifest(data))
    schedule = Schedule.for_reader(reader, seed, ROWS)
    out = []
    for step in range(1, STEPS + 1):
        _, lens = reader.rows(schedule.rows(step, ROWS))
        out.append(sum(int(s.sum()) for s in lens))
    return out


def test_trial_grows_and_shrinks_with_the_cluster_in_bf16(tmp_path, record_figure):
    seq_len, data = 128, tmp_path / "data"                # the data: prepared by the child on its cluster
    n = get_size(SIZE).n_params_non_embedding
    hold = tmp_path / "hold"
    hold.write_text("")                                   # hold after every checkpoint until removed
    cfg = dict(objective="clm", size=SIZE, budget_flops=6.0 * n * STEPS * ROWS * seq_len, data=str(data),
               tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="elastic-live",
               batch_tokens=ROWS * seq_len, eval_every=EVERY, eval_rows=16, precision="bf16", zero_stage=1,
               lr_max=2e-2)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PROTSCALE_HOLD_FILE=str(hold))     # the nodes' workers inherit it
    start = time.monotonic()
    # Its own session, so that a child that hangs is killed with the Ray nodes it started.
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps({"cfg": cfg, "storage": str(tmp_path / "runs"), "seq_len": seq_len})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (stdout[-3000:], stderr[-5000:])
    got = json.loads(lines[-1][len("RESULT "):])
    record_figure(f"elastic live: {time.monotonic() - start:.0f} s wall, trial {got['wall_s']:.0f} s, events {got['events']}")
    assert got.get("status") == c.STATUS_COMPLETED, got
    assert got["events"] == [["add_node", EVERY], ["remove_node", 2 * EVERY]]
    # Each restart said where it resumed from, and at which size (rank 0's line, forwarded by Ray).
    log = stdout + stderr
    assert f"resumed at step {EVERY} (written by 1 worker(s), now 2)" in log
    assert f"resumed at step {2 * EVERY} (written by 2 worker(s), now 1)" in log
    assert "startup timed out" not in log          # the shrink asked for what the cluster has left

    client = MlflowClient(cfg["tracking_uri"])
    history = {key: {} for key in (c.TRAIN_LOSS, c.LR, c.WORLD_SIZE, c.TOKENS)}
    for key, points in history.items():
        for m in client.get_metric_history(got["run_id"], key):
            assert m.step not in points, f"{key}: step {m.step} logged twice"
            points[m.step] = m.value
    steps = list(range(1, STEPS + 1))
    for key in (c.TRAIN_LOSS, c.LR, c.WORLD_SIZE):
        assert sorted(history[key]) == steps, key                     # every step, once

    # Grew to 2 workers when the node joined, back to 1 when it went; each resumed from its checkpoint.
    world = [int(history[c.WORLD_SIZE][s]) for s in steps]
    assert world == [1] * EVERY + [2] * EVERY + [1] * (STEPS - 2 * EVERY), world
    assert client.get_run(got["run_id"]).data.tags[RESUMED_FROM_STEP] == str(2 * EVERY)

    # The global batch: the same rows at every world size (their tokens, counted by the workers).
    expected = _expected_tokens(data, 0)
    for step, tokens in history[c.TOKENS].items():
        assert tokens == sum(expected[:step]), f"tokens at step {step}"
    assert sorted(history[c.TOKENS]) == [EVERY, 2 * EVERY, STEPS]

    # The LR the optimizer applied is the recipe's schedule across both resizes.
    lr_max = float(client.get_run(got["run_id"]).data.params[c.LR_MAX])
    gap = max(abs(history[c.LR][s] - recipe.lr_at(s, STEPS, lr_max)) for s in steps)
    print(f"max |logged lr - recipe lr| = {gap:.3g} (lr_max {lr_max:g})")
    assert gap <= 1e-9 * lr_max

    # Loss continues from the checkpoint: the first step of each resumed segment is nearer the step
    # before it than the step-1 loss of a fresh model.
    loss = history[c.TRAIN_LOSS]
    assert all(math.isfinite(v) for v in loss.values())
    for resumed in (EVERY + 1, 2 * EVERY + 1):
        assert abs(loss[resumed] - loss[resumed - 1]) < abs(loss[resumed] - loss[1]), (resumed, loss)
