"""Trial identity: ``trial_hash`` covers every setting that changes a trial's result; skip-if-done and
resume match on it; ``protscale train``'s flags are generated from ``TrialConfig``."""

from __future__ import annotations

import dataclasses
import json

import pytest
from mlflow.tracking import MlflowClient

from protscale.sweep.space import SearchSpace, Trial, isoflop_grid, trial_hashes, validate
from protscale.sweep.tune import _finished_trials, trial_config
from protscale.tracking import contract as c
from protscale.tracking import runs
from protscale.train.config import TrialConfig

MANIFEST = {"seq_len": 128, "hash": "m1", "splits": {"train": {"tokens": 10_000_000}}}


def _cfg(**kw) -> TrialConfig:
    base = dict(objective="clm", size="tiny-3", budget_flops=1e11, data="d", tracking_uri="u", experiment="e")
    return TrialConfig(**{**base, **kw})


# Each change of a setting that changes the result: (field overrides, manifest overrides, parent hash).
CHANGES = {
    "objective": ({"objective": "mlm"}, {}, ""),
    "size": ({"size": "tiny-4"}, {}, ""),
    "budget": ({"budget_flops": 2e11}, {}, ""),
    "seed": ({"seed": 1}, {}, ""),
    "lr": ({"lr_max": 1e-3}, {}, ""),
    "batch": ({"batch_tokens": 4096}, {}, ""),
    "eval_rows": ({"eval_rows": 128}, {}, ""),
    "precision": ({"precision": "bf16"}, {}, ""),
    "seq_len": ({}, {"seq_len": 256}, ""),
    "data": ({}, {"hash": "m2"}, ""),
    "parent": ({"init_from": "run-a"}, {}, "parent-hash-1"),
}


def test_every_setting_that_changes_the_result_changes_the_hash():
    base = _cfg().identity_hash(MANIFEST)
    hashes = {"base": base}
    for what, (fields, manifest, parent) in CHANGES.items():
        hashes[what] = _cfg(**fields).identity_hash({**MANIFEST, **manifest}, parent)
    assert len(set(hashes.values())) == len(hashes), hashes            # all distinct
    assert len(base) == 16 and int(base, 16) >= 0
    # The transfer parent enters through its own identity: another parent config, another hash.
    assert (_cfg(init_from="run-a").identity_hash(MANIFEST, "parent-hash-1")
            != _cfg(init_from="run-a").identity_hash(MANIFEST, "parent-hash-2"))


def test_settings_that_do_not_change_the_result_keep_the_hash():
    base = _cfg().identity_hash(MANIFEST)
    same = [_cfg(name="other-name", tracking_uri="http://x", experiment="x", eval_every=3, attention="sdpa",
                 zero_stage=2, micro_batch_rows=4, compile=True, run_id="r", tags={"a": "b"}, peak_flops=1e12)]
    # The paper's rule written out explicitly is the same trial as the rule left to resolve.
    from protscale.model.sizes import get_size
    from protscale.train import recipe

    rule_lr, rule_batch = recipe.peak_lr(get_size("tiny-3")), recipe.batch_tokens(get_size("tiny-3"), 128)
    same.append(_cfg(lr_max=rule_lr, batch_tokens=rule_batch))
    same.append(_cfg(precision="fp32"))         # what "auto" is on a CPU trial
    assert {cfg.identity_hash(MANIFEST) for cfg in same} == {base}


def test_identity_lists_the_contract_fields():
    ident = _cfg().identity(MANIFEST)
    for key in ("objective", "size", "budget_flops", "seed", "lr_max", "batch_tokens", "seq_len",
                "data_manifest_hash", "init_from", "eval_rows", "precision", "recipe"):
        assert key in ident
    assert json.dumps(ident, sort_keys=True)                            # canonical JSON, no odd types
    assert c.TRIAL_HASH in c.TRIAL_PARAMS


def test_lr_and_batch_sweeps_are_valid_with_readable_unique_names():
    trials = (isoflop_grid([1e11], ["tiny-3"], lr_max=1e-3) + isoflop_grid([1e11], ["tiny-3"], lr_max=3e-3)
              + isoflop_grid([1e11], ["tiny-3"], batch_tokens=4096) + isoflop_grid([1e11], ["tiny-3"]))
    names = [t.name for t in trials]
    assert names == ["clm-tiny-3-1e11-s0-lr0.001", "clm-tiny-3-1e11-s0-lr0.003", "clm-tiny-3-1e11-s0-b4096",
                     "clm-tiny-3-1e11-s0"]
    assert validate(SearchSpace("lr-sweep", "unused", trials, defaults={"batch_tokens": 2048}), MANIFEST) == []


def test_space_defaults_are_checked_against_trialconfig():
    space = SearchSpace("s", "unused", isoflop_grid([1e11], ["tiny-3"]), defaults={"eval_rowz": 3})
    errors = validate(space, MANIFEST)
    assert len(errors) == 1 and "unknown TrialConfig field(s) eval_rowz" in errors[0]


@pytest.fixture
def dataset(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(MANIFEST))
    return d


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating MLflow's tables takes seconds); one experiment a test."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def _finished_run(uri, space, trial, trial_hash, status=c.STATUS_COMPLETED) -> str:
    run_id = runs.start_run(uri, space.name, trial.name, {c.TRIAL_HASH: trial_hash},
                            {c.KIND: "trial", c.SWEEP: space.name}, trial_hash=trial_hash)
    runs.finish_run(uri, run_id, status)
    return run_id


def test_skip_if_done_matches_the_hash_and_an_edited_space_reruns_what_changed(dataset, store, tmp_path):
    uri = store
    trials = isoflop_grid([1e11], ["tiny-3", "tiny-4"])
    space = SearchSpace("edit", str(dataset), trials, defaults={"batch_tokens": 2048})
    before = trial_hashes(space, uri)
    for t in trials:
        _finished_run(uri, space, t, before[t.name])
    assert _finished_trials(uri, "edit", before) == {t.name: c.STATUS_COMPLETED for t in trials}

    # Edited: an LR variant added (a new name), and the data re-prepared for the other sizes is not
    # simulated here; the batch of the whole space changed -> every old trial has a new identity.
    edited = SearchSpace("edit", str(dataset), trials + isoflop_grid([1e11], ["tiny-3"], lr_max=1e-3),
                         defaults={"batch_tokens": 2048})
    after = trial_hashes(edited, uri)
    assert {n: after[n] for n in before} == before                      # unchanged trials: same identity
    assert set(_finished_trials(uri, "edit", after)) == {t.name for t in trials}   # only the new one to run
    rebatched = SearchSpace("edit", str(dataset), trials, defaults={"batch_tokens": 4096})
    assert _finished_trials(uri, "edit", trial_hashes(rebatched, uri)) == {}       # all re-run
    # Re-prepared data (new manifest hash) changes every identity too.
    (dataset / "manifest.json").write_text(json.dumps({**MANIFEST, "hash": "m2"}))
    assert _finished_trials(uri, "edit", trial_hashes(space, uri)) == {}


def test_a_run_of_another_identity_is_not_reused(dataset, store, tmp_path):
    """Same trial name, another config: a new run is created, the old one kept and tagged superseded."""
    uri = store
    trial = Trial("clm", "tiny-3", 1e11)
    space = SearchSpace("reuse", str(dataset), [trial], defaults={"batch_tokens": 2048})
    old = _finished_run(uri, space, trial, "aaaa")
    assert runs.find_run(uri, "reuse", trial.name, "aaaa") == old        # same identity: found again
    new = runs.start_run(uri, "reuse", trial.name, {c.TRIAL_HASH: "bbbb"}, {c.KIND: "trial"}, trial_hash="bbbb")
    assert new != old
    cl = MlflowClient(uri)
    assert cl.get_run(old).data.tags[c.SUPERSEDED_BY] == new
    assert cl.get_run(old).data.tags[c.STATUS] == c.STATUS_COMPLETED    # the old result is kept as it was
    assert runs.find_run(uri, "reuse", trial.name, "bbbb") == new
    assert _finished_trials(uri, "reuse", {trial.name: "bbbb"}) == {}   # the new run is not finished


def test_run_one_skips_a_finished_trial_of_the_same_identity(dataset, store, tmp_path, capsys):
    """The sweep's trainable returns before building any trainer when the run of its identity is done."""
    from protscale.sweep.tune import run_one

    uri = store
    trial = Trial("clm", "tiny-3", 1e11)
    space = SearchSpace("skip", str(dataset), [trial], defaults={"batch_tokens": 2048})
    h = trial_hashes(space, uri)[trial.name]
    run_id = _finished_run(uri, space, trial, h)
    run_one({"trial": dataclasses.asdict(trial_config(space, trial, uri)), "parent": "", "sweep_run_id": None,
             "storage": str(tmp_path / "runs"), "gpu": False, "workers": 0})
    assert f"already finished (MLflow run {run_id}, trial_hash {h})" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


# --- protscale train: flags generated from TrialConfig ----------------------------------------------------

def _train_parser():
    from protscale.cli import build_parser

    return build_parser()


def test_every_visible_trialconfig_field_is_a_train_flag():
    from protscale.train.cli import _flag

    help_text = _train_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(TrialConfig):
        if f.metadata.get("cli", True):
            assert _flag(f) in help_text, f.name
            assert f.metadata["help"].split()[0] in help_text
        else:
            assert "--" + f.name.replace("_", "-") not in help_text, f.name


def test_existing_flag_spellings_parse_into_the_config():
    from protscale.train.cli import config_from_args

    args = _train_parser().parse_args([
        "train", "--objective", "mlm", "--size", "tiny-2", "--budget-flops", "2e11", "--data", "d",
        "--lr-max", "1e-3", "--batch-tokens", "4096", "--eval-every", "3", "--seed", "7", "--zero-stage", "2",
        "--gpu-memory", "40", "--attention", "sdpa", "--compile", "--init-from", "abc", "--eval-rows", "99",
        "--no-activation-checkpointing", "--workers", "1:2"])
    cfg = config_from_args(args, tracking_uri="u")
    assert (cfg.objective, cfg.size, cfg.budget_flops, cfg.lr_max, cfg.batch_tokens, cfg.eval_every, cfg.seed,
            cfg.zero_stage, cfg.gpu_memory_gb, cfg.attention, cfg.compile, cfg.init_from, cfg.eval_rows,
            cfg.activation_checkpointing, cfg.experiment) == (
        "mlm", "tiny-2", 2e11, 1e-3, 4096, 3, 7, 2, 40.0, "sdpa", True, "abc", 99, False, "protscale")
    plain = config_from_args(_train_parser().parse_args(
        ["train", "--objective", "clm", "--size", "tiny-2", "--budget-flops", "1e11", "--data", "d"]),
        tracking_uri="u")
    defaults = {f.name: f.default for f in dataclasses.fields(TrialConfig) if f.default is not dataclasses.MISSING}
    for name in ("seed", "lr_max", "batch_tokens", "eval_every", "eval_rows", "zero_stage", "precision",
                 "attention", "compile", "activation_checkpointing", "micro_batch_rows", "peak_flops"):
        assert getattr(plain, name) == defaults[name], name
