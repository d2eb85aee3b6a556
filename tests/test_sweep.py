"""Sweeps: search-space validation, --dry-run, and a real sweep on local Ray (a killed driver, then --resume: tests/test_chaos.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from protscale.cli import main
from protscale.sweep.space import SearchSpace, Trial, isoflop_grid, transfer_grid, validate
from protscale.tracking import contract as c

REPO = Path(__file__).resolve().parents[1]
MANIFEST = {"seq_len": 128, "splits": {"train": {"tokens": 1_000_000}}}


def test_validation_names_each_problem():
    space = SearchSpace("bad", "unused", [
        Trial("clm", "tiny-3", 1e11), Trial("clm", "tiny-3", 1e11),          # duplicate
        Trial("clm", "no-such-size", 1e11),                                  # unknown size
        Trial("clm", "tiny-6", 1e7),                                         # below one optimizer step
        Trial("clm", "tiny-3", 1e13),                                        # ~11 epochs of the data
        Trial("mlm", "tiny-3", 1e11, parent="clm-missing"),                  # parent not in the space
    ], defaults={"batch_tokens": 2048})
    errors = "\n".join(validate(space, MANIFEST))
    assert "clm-tiny-3-1e11-s0: listed 2 times" in errors
    assert "unknown size 'no-such-size'" in errors
    assert "less than one optimizer step of 2,048" in errors
    assert "11.3 epochs" in errors and "no repetition" in errors
    assert "parent 'clm-missing' is not a CLM trial" in errors
    assert validate(SearchSpace("ok", "unused", isoflop_grid([1e11], ["tiny-3", "tiny-4"]),
                                defaults={"batch_tokens": 2048}), MANIFEST) == []


def test_bad_space_file_is_a_one_line_error(tmp_path, capsys):
    space = tmp_path / "space.py"
    space.write_text("from protscale.sweep.space import SearchSpace, Trial\n"
                     "SPACE = SearchSpace('x', 'nowhere', [Trial('clm', 'tiny-9', 1e11)])\n")
    assert main(["sweep", str(space), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown size 'tiny-9'" in err and "Traceback" not in err
    assert main(["sweep", str(tmp_path / "missing.py"), "--dry-run"]) == 2


def test_dry_run_paper_grid_rows(capsys):
    from protscale.sweep import paper

    assert main(["sweep", str(REPO / "search_spaces" / "paper_clm.py"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("clm-")]
    assert len(rows) == len(paper.BUDGETS) * len(paper.SIZES) == 147
    assert {1e18, 1e21} <= set(paper.BUDGETS)
    assert any(r.startswith("clm-10B-1e21-s0") and "10,682,105,856" in r for r in rows)
    # D = C / (6 N): 1e21 / (6 · 10,682,105,856) = 15,602,416,687 tokens
    assert any("15,602,416,687" in r for r in rows if r.startswith("clm-10B-1e21"))


@pytest.mark.parametrize("space", ["paper_clm.py", "paper_mlm.py"])
def test_dry_run_json_plans_every_paper_trial_into_an_80gb_gpu(space, capsys):
    """Every trial of the paper's grids fits an 80 GB GPU by its memory plan, and --json has the keys."""
    import json

    assert main(["sweep", str(REPO / "search_spaces" / space), "--dry-run", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 147
    keys = {"trial", "workers", "zero_stage", "micro_batch_rows", "accumulation", "activation_checkpointing",
            "memory_gb_per_gpu", "gpu_hours"}
    assert all(keys <= set(r) for r in rows)
    assert all(0 < r["memory_gb_per_gpu"] <= 80 and r["gpu_hours"] > 0 for r in rows)
    assert all(r["micro_batch_rows"] * r["accumulation"] * r["workers"] >= r["global_rows"] for r in rows)
    big = [r for r in rows if r["size"] == "10B"]
    assert all(r["workers"] > 1 and r["zero_stage"] >= 1 for r in big)     # 171 GB of model states
    assert all(r["workers"] == 1 and r["zero_stage"] == 0 for r in rows if r["size"] == "85M")


def test_a_trial_that_cannot_fit_its_gpus_is_a_one_line_validation_error(tmp_path, capsys):
    space = tmp_path / "space.py"
    space.write_text("from protscale.sweep.space import SearchSpace, Trial\n"
                     "SPACE = SearchSpace('big', 'nowhere', [Trial('clm', '10B', 1e21), Trial('clm', '85M', 1e19)],\n"
                     "                    gpus_per_trial=1, max_workers=1)\n")
    assert main(["sweep", str(space), "--dry-run", "--gpu-memory", "16"]) == 2
    err = capsys.readouterr().err
    assert "trial clm-10B-1e21-s0: does not fit a 16 GB GPU" in err and "--gpu-memory" in err
    assert "clm-85M" not in err and "Traceback" not in err


def test_transfer_grid_orders_parents_and_keeps_scratch_baselines():
    trials = transfer_grid(["tiny-3"], clm_budgets=[1e11], mlm_budgets=[5e10])
    names = [t.name for t in trials]
    assert names == ["clm-tiny-3-1e11-s0", "mlm-tiny-3-5e10-s0-from-clm-tiny-3-1e11-s0", "mlm-tiny-3-5e10-s0"]


def _write_space(tmp_path, data, trials: str, name="sweep-test") -> Path:
    path = tmp_path / "space.py"
    path.write_text(
        "from protscale.sweep.space import SearchSpace, Trial, isoflop_grid, transfer_grid\n"
        f"SPACE = SearchSpace(name={name!r}, data={str(data)!r}, trials={trials},\n"
        "                    defaults={'batch_tokens': 2048, 'eval_rows': 32}, max_concurrent=2)\n")
    return path


def _trial_runs(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'")


@pytest.mark.slow
def test_small_sweep_with_transfer_end_to_end(ray_local, demo_data, tmp_path, capfd):
    space = _write_space(tmp_path, demo_data,
                         "transfer_grid(['tiny-3'], clm_budgets=[5e10], mlm_budgets=[2e10]) + "
                         "[Trial('clm', 'tiny-4', 5e10)]")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", str(space), "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]) == 0

    runs = {r.data.tags[c.TRIAL]: r for r in _trial_runs(uri, "sweep-test")}
    assert set(runs) == {"clm-tiny-3-5e10-s0", "mlm-tiny-3-2e10-s0-from-clm-tiny-3-5e10-s0",
                         "mlm-tiny-3-2e10-s0", "clm-tiny-4-5e10-s0"}
    client = MlflowClient(uri)
    sweep = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id],
                               filter_string="tags.kind = 'sweep'")
    assert len(sweep) == 1 and sweep[0].data.tags[c.STATUS] == c.STATUS_COMPLETED
    for r in runs.values():
        assert r.data.tags[c.PARENT_RUN_ID] == sweep[0].info.run_id
        assert r.data.tags[c.STATUS] == c.STATUS_COMPLETED and r.data.tags[c.SWEEP] == "sweep-test"
    transfer = runs["mlm-tiny-3-2e10-s0-from-clm-tiny-3-5e10-s0"]
    assert transfer.data.params[c.INIT_FROM] == runs["clm-tiny-3-5e10-s0"].info.run_id
    assert float(transfer.data.params[c.INIT_BUDGET_FLOPS]) == 5e10
    assert runs["mlm-tiny-3-2e10-s0"].data.params[c.INIT_FROM] == ""
    # Starting from a trained CLM, the MLM's first evaluation beats the scratch MLM's.
    first = lambda r: min(client.get_metric_history(r.info.run_id, c.VAL_LOSS), key=lambda m: m.step).value  # noqa: E731
    assert first(transfer) < first(runs["mlm-tiny-3-2e10-s0"])

    # The console: one progress display; Ray's tables and the trials' output are in the sweep's log.
    out, log = capfd.readouterr().out, tmp_path / "runs" / "sweep-test" / "sweep.log"
    text = log.read_text()
    assert f"-> {log}" in out and "[sweep] sweep-test: 4 completed, 0 failed of 4 trial(s)" in out
    for ray_line in ("Trial status", "[clm-tiny-3-5e10-s0] step", "Running in local mode"):
        assert ray_line in text and ray_line not in out
    # The live frontier on the parent run: best final val_loss per objective × budget (scratch trials
    # only), counts after each finished trial, the IsoFLOP figures so far.
    final = {n: r.data.metrics[c.VAL_LOSS] for n, r in runs.items()}
    m = client.get_run(sweep[0].info.run_id).data.metrics
    assert m["best_val_loss/clm/5e10"] == min(final["clm-tiny-3-5e10-s0"], final["clm-tiny-4-5e10-s0"])
    assert m["best_val_loss/mlm/2e10"] == final["mlm-tiny-3-2e10-s0"]
    assert (m["trials/completed"], m["trials/failed"], m["trials/running"]) == (4, 0, 0)
    steps = [h.step for h in client.get_metric_history(sweep[0].info.run_id, "trials/completed")]
    assert steps == sorted(steps) and steps[-1] == 4 and len(steps) >= 2
    assert {a.path for a in client.list_artifacts(sweep[0].info.run_id, "live")} == {
        "live/isoflop_clm.png", "live/isoflop_mlm.png"}
    # Ray Tune as designed: trials ranked by val_loss (min), a trainable named for what it is. No
    # checkpoint is left: none went to Tune's folders, and each trial deleted its own once it finished.
    from ray import tune

    def protscale_trial(config):      # the sweep's trainable, by name (Tune checks it on restore)
        raise AssertionError("not run")

    [wave0] = (tmp_path / "runs" / "sweep-test").glob("wave0-*")      # the Tune experiment of wave 0's trials
    best = tune.Tuner.restore(str(wave0), protscale_trial).get_results().get_best_result()
    scratch = ("clm-tiny-3-5e10-s0", "clm-tiny-4-5e10-s0", "mlm-tiny-3-2e10-s0")
    assert best.config["trial_name"] == min(scratch, key=final.get)
    assert best.metrics[c.VAL_LOSS] == pytest.approx(min(final[n] for n in scratch))
    trial_dirs = list(wave0.glob("protscale_trial_*"))
    assert len(trial_dirs) == 3 and not any(list(d.glob("checkpoint_*")) for d in trial_dirs)
    kept = {d.name: sorted(p.name for p in d.glob("checkpoint_*"))
            for d in (tmp_path / "runs" / "sweep-test" / "trials").iterdir()}
    assert len(kept) == 4 and not any(kept.values()), kept
