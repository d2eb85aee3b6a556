"""``protscale import tb-csv``: name parsing, axis conversion, defects, idempotency; the paper's own logs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from protscale import cli
from protscale.tracking import contract as c
from protscale.tracking.import_tb import import_tb_csv
from protscale.tracking.tb_parse import DEFAULT_SIZE_MAP, load_size_map
from protscale.tracking.tb_plan import scan
from protscale.tracking.reader import curves, read_experiments

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared/data/reference-logs"
GF = " vs gigaflos (without embeddings).csv"
VAL = "-tag-lm-loss-validation_valid_lm loss validation"
TRAIN = "-tag-lm-loss-training_lm loss"
N = DEFAULT_SIZE_MAP
W0 = 1_705_000_000.0


def _write(path: Path, x, values, wall0: float = W0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["Wall time,Step,Value"]
    lines += [f"{wall0 + 60.0 * i!r},{float(xi)!r},{float(v)!r}" for i, (xi, v) in enumerate(zip(x, values))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _tokens(budget: float, n: float, k: int = 20) -> np.ndarray:
    return np.linspace(budget / (6 * n) / k, budget / (6 * n), k)


def _loss(offset: float, k: int = 20) -> np.ndarray:
    return 3.0 + offset - 0.02 * np.arange(k)


@pytest.fixture()
def tree(tmp_path) -> dict:
    """A small release-like tree with every case the importer must handle."""
    root = tmp_path / "logs"
    f = {}
    t85 = _tokens(1e19, N["85M"])
    f["clm85"] = _write(root / f"gpt_valid/approach3_flops/85M_flops/run-gpt_85M_1024l_1e19flops_all0.1ep{VAL}{GF}",
                        6 * N["85M"] * t85 / 1e9, _loss(0.0))
    # byte-identical copy under another size folder
    f["clm85_copy"] = root / f"gpt_valid/approach3_flops/47M_flops/run-tensorboard_gpt_85M_1024l_1e19flops_all0.1ep{VAL}{GF}"
    f["clm85_copy"].parent.mkdir(parents=True)
    shutil.copy(f["clm85"], f["clm85_copy"])
    t127 = _tokens(3e18, N["127M"])
    f["clm127"] = _write(root / f"gpt_valid/approach3_flops/127M_flops/run-gpt_130M_1024l_3e18flops_all0.02ep{VAL}{GF}",
                         6 * N["127M"] * t127 / 1e9, _loss(0.1), W0 + 1e5)
    t34 = _tokens(3e18, N["34M"])
    f["clm34"] = _write(root / f"gpt_valid/approach3_flops/34M_flops/run-gpt_25M_1024l_3e18flops_all0.07ep{VAL}{GF}",
                        6 * N["34M"] * t34 / 1e9, _loss(0.2), W0 + 2e5)
    # the same MLM curve against compute and against tokens: its real N is 34M although the name says 25M
    tm = _tokens(1e19, N["34M"], 30)
    f["mlm_gf"] = _write(root / f"transfer_valid/mlm/scratch/run-mlm_25M_1024l_1e19flops_all0.25ep{VAL}{GF}",
                         6 * N["34M"] * tm / 1e9, _loss(-0.3, 30), W0 + 3e5)
    f["mlm_tok"] = _write(root / "transfer_valid/mlm/tokens/25M_1e19.csv", tm, _loss(-0.3, 30), W0 + 3e5 + 1e-4)
    # a transfer MLM from the 3e18 CLM of that size
    f["mlm_ft"] = _write(root / f"transfer_valid/mlm/ft/run-mlm1e19_transfer_from_gpt3e18_25M.sh{VAL}{GF}",
                         6 * N["34M"] * tm / 1e9, _loss(-0.4, 30), W0 + 4e5)
    # training loss against samples (sequences of 1024 tokens), and a copy in a non-ASCII folder
    samples = np.arange(1, 21) * 512.0
    f["samples"] = _write(root / f"ur50/ur50_mlm_150M/run-mlm_154M_ur50{TRAIN} vs samples.csv", samples,
                          _loss(-0.5), W0 + 5e5)
    f["samples_copy"] = root / "ur50/ur50_mlm_150M_副本" / f["samples"].name
    f["samples_copy"].parent.mkdir(parents=True)
    shutil.copy(f["samples"], f["samples_copy"])
    # a "ppl" export that holds perplexities
    f["ppl"] = _write(root / f"ur50/all1ep_clm_150M/run-gpt_154M_all1ep{VAL} ppl vs tokens.csv",
                      np.arange(1, 21) * 1e8, np.exp(_loss(-0.6)), W0 + 6e5)
    # a tokens export whose curve ends at half the budget in its name
    f["short"] = _write(root / "transfer_valid/mlm/tokens/85M_3e19.csv", _tokens(1.5e19, N["85M"]),
                        _loss(-0.7), W0 + 7e5)
    # unreadable: a non-number on line 4
    bad = root / f"bad/run-gpt_85M_1024l_1e18flops{VAL}{GF}"
    bad.parent.mkdir(parents=True)
    bad.write_text("Wall time,Step,Value\n1.0,10,3.0\n2.0,20,2.9\n3.0,30,oops\n", encoding="utf-8")
    f["bad"] = bad
    return {"root": root, "files": f, "t85": t85, "tm": tm}


def _rel(tree, key) -> str:
    return tree["files"][key].relative_to(tree["root"]).as_posix()


def _run(plan, tree, key):
    rel = _rel(tree, key)
    return next(r for r in plan.runs if rel in {e.rel for e in r.files})


def _codes(plan, rel_or_part) -> set[str]:
    return {f.code for f in plan.findings if f.path.startswith(rel_or_part)}


def test_scan_infers_sizes_budgets_axes_and_reports_defects(tree):
    plan = scan(tree["root"])
    assert plan.n_files == 12
    assert len(plan.runs) == 8

    clm85 = _run(plan, tree, "clm85")
    assert (clm85.objective, clm85.size, clm85.n, clm85.budget, clm85.metric) == ("clm", "85M", N["85M"], 1e19, c.VAL_LOSS)
    np.testing.assert_allclose(clm85.tokens, tree["t85"], rtol=1e-12)          # tokens = compute / (6·N)
    np.testing.assert_allclose(clm85.flops, 6 * N["85M"] * tree["t85"], rtol=1e-12)
    assert clm85.tokens_target == pytest.approx(1e19 / (6 * N["85M"]))
    assert list(clm85.steps) == list(range(1, 21))
    assert clm85.canonical.rel == _rel(tree, "clm85")                         # the copy is not the one kept
    assert "duplicate_size_conflict" in _codes(plan, _rel(tree, "clm85_copy"))
    assert _rel(tree, "clm85_copy") not in {r.rel for r in plan.runs}

    assert _run(plan, tree, "clm127").size == "127M"                         # folder beats the name (130M)
    assert plan.aliases["130M"] == "127M" and plan.aliases["25M"] == "34M"

    mlm = _run(plan, tree, "mlm_gf")
    assert {e.rel for e in mlm.files} == {_rel(tree, "mlm_gf"), _rel(tree, "mlm_tok")}   # one run, two axes
    assert (mlm.objective, mlm.size, mlm.budget) == ("mlm", "34M", 1e19)
    np.testing.assert_allclose(mlm.tokens, tree["tm"], rtol=1e-12)          # measured tokens kept as is
    assert "axis_inconsistent" in mlm.defects                                # 25M's N contradicts 6·N·tokens

    ft = _run(plan, tree, "mlm_ft")
    assert (ft.objective, ft.size, ft.init_objective, ft.init_budget) == ("mlm", "34M", "clm", 3e18)

    smp = _run(plan, tree, "samples")
    assert (smp.metric, smp.size, smp.budget_source) == (c.TRAIN_LOSS, "154M", "curve_end")
    np.testing.assert_allclose(smp.tokens, np.arange(1, 21) * 512.0 * 1024)   # samples · seq_len
    np.testing.assert_allclose(smp.flops, 6 * N["154M"] * smp.tokens)
    assert smp.budget == pytest.approx(smp.flops[-1])
    assert smp.canonical.rel == _rel(tree, "samples")                       # the ASCII path is kept
    assert "duplicate" in _codes(plan, _rel(tree, "samples_copy"))
    assert "non_ascii" in _codes(plan, "ur50_mlm_150M_副本")

    ppl = _run(plan, tree, "ppl")
    np.testing.assert_allclose(ppl.value, _loss(-0.6), rtol=1e-12)          # ln(perplexity)
    assert "perplexity" in ppl.defects

    assert "budget_mismatch" in _run(plan, tree, "short").defects
    assert "budget_mismatch" not in clm85.defects

    bad = [f for f in plan.findings if f.code == "parse_error"]
    assert [f.path for f in bad] == [_rel(tree, "bad") + ":4"]              # file:line


def test_size_map_overrides_the_default(tree, tmp_path):
    path = tmp_path / "sizes.json"
    path.write_text(json.dumps({"85M": 80_000_000, "tiny": 1234}))
    sizes = load_size_map(path)
    assert sizes["85M"] == 80_000_000 and sizes["tiny"] == 1234 and sizes["1.2B"] == N["1.2B"]
    run = _run(scan(tree["root"], sizes), tree, "clm85")
    assert run.n == 80_000_000
    np.testing.assert_allclose(run.tokens, 6 * N["85M"] * tree["t85"] / (6 * 80_000_000), rtol=1e-12)
    path.write_text(json.dumps({"85M": -1}))
    with pytest.raises(cli.UserError, match="positive"):
        load_size_map(path)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_import_writes_the_contract_and_is_idempotent(tree, store_uri):
    lines: list[str] = []
    s = import_tb_csv(tree["root"], "synthetic", tracking_uri=store_uri, sweep="paper", out=lines.append)
    assert len(s.imported) == 8 and not s.skipped
    text = "\n".join(lines)
    assert "parse_error: " + _rel(tree, "bad") + ":4" in text
    assert "duplicate_size_conflict" in text and "imported 8 runs" in text

    t = read_experiments(store_uri, ["synthetic"])
    runs = {r["tags.import_path"]: r for r in t.runs.to_pylist() if r["tags.kind"] == "trial"}
    parents = [r for r in t.runs.to_pylist() if r["tags.kind"] == "sweep"]
    assert len(runs) == 8 and len(parents) == 1
    for r in runs.values():
        assert r["parent_run_id"] == parents[0]["run_id"] and r["status"] == "FINISHED"
        assert (r["tags.source"], r["tags.status"], r["tags.sweep"]) == ("imported", "completed", "paper")
        assert r["params.seq_len"] == "1024" and r["params.flops_convention"] == "6N"

    r85 = runs[_rel(tree, "clm85")]
    assert (r85["params.objective"], r85["params.size"], r85["n_params"], r85["n_params_non_embedding"]) == \
        ("clm", "85M", N["85M"], N["85M"])
    assert r85["budget_flops"] == 1e19 and r85["tokens_target"] == pytest.approx(1e19 / (6 * N["85M"]), rel=1e-5)
    assert r85["params.init_from"] == "" and r85["params.mask_ratio"] == "0.0"
    assert set(r85["tags.import_files"].splitlines()) == {_rel(tree, "clm85"), _rel(tree, "clm85_copy")}
    assert "duplicate_size_conflict" in r85["tags.defects"]

    ft = runs[_rel(tree, "mlm_ft")]
    clm34 = runs[_rel(tree, "clm34")]
    assert ft["params.init_from"] == clm34["run_id"]                          # the CLM parent it names
    assert ft["params.init_objective"] == "clm" and float(ft["params.init_budget_flops"]) == 3e18
    assert ft["params.mask_ratio"] == "0.15"

    df = curves(t, c.VAL_LOSS)
    one = df[df.run_id == r85["run_id"]]
    np.testing.assert_allclose(one["value"], _loss(0.0))
    np.testing.assert_allclose(one["tokens"], tree["t85"], rtol=1e-12)
    np.testing.assert_allclose(one["flops"], 6 * N["85M"] * tree["t85"], rtol=1e-12)
    assert list(one["timestamp"]) == [int(round((W0 + 60 * i) * 1000)) for i in range(20)]
    smp = runs[_rel(tree, "samples")]
    assert set(t.metrics.filter(_eq(t.metrics, smp["run_id"])).column("key").to_pylist()) == \
        {c.TRAIN_LOSS, c.TOKENS, c.FLOPS}

    # Again: nothing new; and an interrupted import (a run left unfinished) is redone, not duplicated.
    from mlflow.tracking import MlflowClient

    MlflowClient(store_uri).update_run(runs[_rel(tree, "ppl")]["run_id"], status="RUNNING")
    again = import_tb_csv(tree["root"], "synthetic", tracking_uri=store_uri, sweep="paper", out=lambda _: None)
    assert len(again.imported) == 1 and len(again.skipped) == 7 and again.replaced == [_rel(tree, "ppl")]
    third = import_tb_csv(tree["root"], "synthetic", tracking_uri=store_uri, sweep="paper", out=lambda _: None)
    assert not third.imported and len(third.skipped) == 8
    t2 = read_experiments(store_uri, ["synthetic"])
    assert t2.runs.num_rows == 9 and t2.metrics.num_rows == t.metrics.num_rows


def _eq(table, run_id):
    import pyarrow.compute as pc

    return pc.equal(table["run_id"], run_id)


def test_cli_reports_and_exit_status(tree, store_uri, capsys):
    rc = cli.main(["import", "tb-csv", str(tree["root"]), "--experiment", "cli-run", "--tracking-uri", store_uri])
    out = capsys.readouterr().out
    assert rc == 1                                                            # a file could not be read
    assert _rel(tree, "bad") + ":4" in out and "imported 8 runs" in out
    rc = cli.main(["import", "tb-csv", str(tree["root"]), "--experiment", "cli-run", "--tracking-uri", store_uri,
                   "--dry-run"])
    assert "would import" in capsys.readouterr().out
    tree["files"]["bad"].unlink()
    rc = cli.main(["import", "tb-csv", str(tree["root"]), "--experiment", "cli-run", "--tracking-uri", store_uri])
    assert rc == 0 and "imported 0 runs, skipped 8" in capsys.readouterr().out
    rc = cli.main(["import", "tb-csv", str(tree["root"] / "absent"), "--experiment", "x", "--tracking-uri", store_uri])
    assert rc == 2 and "no such directory" in capsys.readouterr().err


# --- the paper's released logs ---------------------------------------------------------------------------------
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference logs not found at {REFERENCE}")


@needs_reference
def test_reference_logs_plan():
    plan = scan(REFERENCE)
    n_csv = sum(1 for p in REFERENCE.rglob("*.csv"))
    assert plan.n_files == n_csv and not [f for f in plan.findings if f.code.startswith(("parse", "unknown"))]
    assert sum(len(r.files) for r in plan.runs) == n_csv                     # every file is in exactly one run
    codes = {}
    for f in plan.defects:
        codes.setdefault(f.code, []).append(f.path)
    # byte-identical curves under two size folders: imported once, from the folder the name agrees with
    conflicts = " ".join(codes["duplicate_size_conflict"])
    assert "/6M_flops/" in conflicts and "/4B_flops/" in conflicts
    assert any("副本" in p for p in codes["non_ascii"])
    assert not any("副本" in r.rel for r in plan.runs)
    assert codes["perplexity"] and all(" ppl " in p for p in codes["perplexity"])
    assert len(codes["axis_inconsistent"]) == 2 and all("25M" in p for p in codes["axis_inconsistent"])
    approach3 = [r for r in plan.runs if r.rel.startswith("gpt_valid/approach3_flops/")]
    assert len(approach3) >= 100
    for r in approach3:
        folder = r.rel.split("/")[2][: -len("_flops")]
        assert (r.objective, r.size, r.metric) == ("clm", folder, c.VAL_LOSS)
        assert r.budget > 0 and np.all(np.isfinite(r.value))
        if "flops" in {e.axis for e in r.files} and len(r.files) == 1:
            np.testing.assert_allclose(r.tokens * 6 * r.n, r.flops, rtol=1e-12)
    by_rel = {r.rel: r for r in plan.runs}
    ten = by_rel[next(k for k in by_rel if "13M_flops/run-gpt_10M_1024l_1e18flops" in k)]
    assert any("6M_flops" in e.rel for e in ten.files)
    transfers = [r for r in plan.runs if r.init_objective]
    assert {r.objective for r in transfers} == {"clm", "mlm"} and all(r.init_budget for r in transfers)


@needs_reference
@pytest.mark.slow
def test_reference_logs_import_roundtrip(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = import_tb_csv(REFERENCE / "transfer_valid", "paper-transfer", tracking_uri=uri, out=lambda _: None)
    assert len(s.imported) > 20 and not s.skipped
    t = read_experiments(uri, ["paper-transfer"])
    trials = [r for r in t.runs.to_pylist() if r["tags.kind"] == "trial"]
    assert len(trials) == len(s.imported)
    linked = [r for r in trials if r["params.init_from"] in {x["run_id"] for x in trials}]
    assert linked                                                            # e.g. mlm3e20 <- gpt 470M 1e20
    df = curves(t, c.VAL_LOSS)
    assert df["tokens"].notna().all() and df["flops"].notna().all()
    again = import_tb_csv(REFERENCE / "transfer_valid", "paper-transfer", tracking_uri=uri, out=lambda _: None)
    assert not again.imported and len(again.skipped) == len(s.imported)
