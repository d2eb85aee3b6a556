"""The sweep's console and live frontier, without Ray trials: a real SQLite MLflow store holding trial runs
whose final losses lie on known IsoFLOP parabolas (N_opt ∝ C^0.5), and the output redirection of a quiet
sweep. The end-to-end sweep in test_sweep.py checks the same pieces on real trials."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from protscale.sweep.frontier import LiveFrontier, best_key, budget_key
from protscale.sweep.progress import SweepMonitor
from protscale.sweep.space import Trial
from protscale.tracking import contract as c

BUDGETS = (1e10, 1e11, 1e12)
EXPONENT = 0.5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Trial runs: 5 sizes per budget around N_opt = 0.1·C^0.5, loss = 2 + 0.3·(log10 N/N_opt)² (+ noise
    1e-3); plus runs that must not count: a failed one, a transfer one, one of a stale identity."""
    tmp = tmp_path_factory.mktemp("live")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cl = MlflowClient(uri)
    exp = cl.create_experiment("live", artifact_location=(tmp / "artifacts").as_uri())
    rng = np.random.default_rng(0)

    def add(name, budget, n, loss, status=c.STATUS_COMPLETED, init_from="", trial_hash="h"):
        rid = cl.create_run(exp, run_name=name, tags={c.KIND: "trial", c.TRIAL: name, c.STATUS: status}).info.run_id
        cl.log_batch(rid, params=[Param(k, str(v)) for k, v in {
            c.OBJECTIVE: "mlm", c.SIZE: f"n{n:.0f}", c.BUDGET_FLOPS: budget, c.N_PARAMS_NON_EMBEDDING: n,
            c.INIT_FROM: init_from, c.TRIAL_HASH: trial_hash}.items()],
            metrics=[Metric(c.VAL_LOSS, loss + 0.5, 0, 1), Metric(c.VAL_LOSS, loss, 0, 10)])

    names = []
    for b in BUDGETS:
        n_opt = 0.1 * b ** EXPONENT
        for x in np.linspace(-1.0, 1.0, 5):
            n = n_opt * 10 ** x
            names.append(f"mlm-n{n:.0f}-{budget_key(b)}")
            add(names[-1], b, n, 2.0 + 0.3 * x * x + rng.normal(0, 1e-3))
    add("failed-one", 1e11, 3e4, 1.0, status=c.STATUS_FAILED)
    add("transfer-one", 1e11, 3e4, 1.0, init_from="somerun")
    add("stale-one", 1e11, 3e4, 1.0, trial_hash="old")
    return SimpleNamespace(uri=uri, client=cl, experiment=exp, names=names)


def _parent(store) -> str:
    return store.client.create_run(store.experiment, tags={c.KIND: "sweep"}).info.run_id


def test_live_frontier_logs_best_losses_exponent_and_figures(store, tmp_path):
    cl, parent = store.client, _parent(store)
    frontier = LiveFrontier(store.uri, "live", parent, hashes={"stale-one": "new"})
    snap = frontier.update({"completed": 15, "failed": 1, "running": 2}, step=16)

    m = cl.get_run(parent).data.metrics
    assert m["trials/completed"] == 15 and m["trials/failed"] == 1 and m["trials/running"] == 2
    assert set(k for k in m if k.startswith("best_val_loss/")) == {best_key("mlm", b) for b in BUDGETS}
    assert best_key("mlm", 1e11) == "best_val_loss/mlm/1e11"
    for b in BUDGETS:        # the vertex size at each budget; not the failed, transfer or stale runs (1.0)
        assert 1.99 < m[best_key("mlm", b)] < 2.01
    n, lo, hi, used = snap.exponents["mlm"]
    assert used == 3 and lo <= EXPONENT <= hi and abs(n - EXPONENT) < 0.02 and hi - lo < 0.1
    assert m["n_opt_exponent/mlm"] == n
    assert m["n_opt_exponent_ci95_low/mlm"] == lo and m["n_opt_exponent_ci95_high/mlm"] == hi
    assert [h.step for h in cl.get_metric_history(parent, "trials/completed")] == [16]
    figures = {a.path for a in cl.list_artifacts(parent, "live")}
    assert figures == {"live/isoflop_mlm.png", "live/frontier_mlm.png"}
    assert all(os.path.getsize(cl.download_artifacts(parent, f, str(tmp_path))) > 10_000 for f in figures)


def test_quiet_sweep_output_goes_to_the_log_and_driver_lines_to_the_console(store, tmp_path, capfd):
    cl, parent, names = store.client, _parent(store), store.names
    log = tmp_path / "runs" / "sweep.log"
    with SweepMonitor("live", log) as monitor:
        monitor.attach(LiveFrontier(store.uri, "live", parent, hashes={"stale-one": "new"}))
        monitor.plan([Trial("mlm", "tiny-1", 1e10 * (i + 1)) for i in range(2)], {})    # 2 not started
        print("[adaptive] a driver line")                        # main thread: the console
        worker = threading.Thread(target=lambda: print("(protscale_trial pid=1) a worker line"))
        worker.start()
        worker.join()
        os.write(1, b"a line written to fd 1\n")
        os.write(2, b"a line written to fd 2\n")
        with monitor.tuning():
            print("Trial status: 2 RUNNING")                     # Tune's table: the log
        monitor.plan([SimpleNamespace(name=n) for n in names], {})
        for name in names:
            monitor.started(name)
            monitor.finished(name)
    out = capfd.readouterr().out
    text = log.read_text()
    assert f"-> {log}" in out and "[adaptive] a driver line" in out
    for line in ("a worker line", "fd 1", "fd 2", "Trial status"):
        assert line in text and line not in out
    assert sum(f"| {n} completed, val_loss " in out for n in names) == 15      # one line per finished trial
    assert "[sweep] live: 15 completed, 0 failed of 17 trial(s)" in out
    assert "[sweep] mlm: N_opt ∝ C^0.5" in out
    assert cl.get_run(parent).data.metrics["trials/completed"] == 15


def test_a_broken_frontier_is_a_warning_not_an_error(tmp_path, capfd):
    log = tmp_path / "sweep.log"
    (tmp_path / "a-file").write_text("not a folder")
    with SweepMonitor("broken", log) as monitor:       # a store that cannot be opened
        monitor.attach(LiveFrontier(f"sqlite:///{tmp_path}/a-file/mlflow.db", "broken", "0" * 32))
        monitor.plan([Trial("clm", "tiny-1", 1e10)], {})
        monitor.started("clm-tiny-1-1e10-s0")
        monitor.finished("clm-tiny-1-1e10-s0")
    out = capfd.readouterr().out
    assert "warning: live frontier not updated" in out and "the sweep goes on" in out
    assert "WARNING protscale live frontier of sweep broken" in log.read_text()
    assert monitor.counts()["completed"] == 1


@pytest.mark.slow
def test_a_worker_group_trial_reports_its_losses_to_tune(ray_local, demo_data, tmp_path):
    """A GPU trial that needs several GPUs runs as a Ray Train worker group inside its Tune trial: its
    losses reach Tune (Train's TuneReportCallback, added by ``trainer``) as well as MLflow. Here on CPU,
    a group of one worker."""
    from ray import tune

    from protscale.train.config import TrialConfig
    from protscale.train.trial import prepare_run, trainer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrialConfig(objective="mlm", size="tiny-1", budget_flops=6 * 24576 * 4 * 2048, data=str(demo_data),
                      tracking_uri=uri, experiment="group", name="mlm-group", batch_tokens=2048, eval_every=2,
                      eval_rows=16)

    def protscale_trial(config):
        run = prepare_run(TrialConfig.from_dict(config["trial"]))
        trainer(run, (1, 1), str(tmp_path / "trials"), max_failures=0).fit()

    grid = tune.Tuner(tune.with_resources(protscale_trial, {"cpu": 1}), param_space={"trial": cfg.to_dict()},
                      tune_config=tune.TuneConfig(metric=c.VAL_LOSS, mode="min"),
                      run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0)).fit()
    result = grid[0]
    assert result.error is None
    client = MlflowClient(uri)
    run_id = client.search_runs([client.get_experiment_by_name("group").experiment_id])[0].info.run_id
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, c.VAL_LOSS))
    reported = result.metrics_dataframe[["step", c.VAL_LOSS]].to_records(index=False).tolist()
    assert [s for s, _ in logged] == [2, 4] and len(reported) == 2
    assert all(s == rs and v == pytest.approx(rv) for (s, v), (rs, rv) in zip(logged, reported))
    assert grid.get_best_result().metrics[c.VAL_LOSS] == pytest.approx(logged[-1][1])
