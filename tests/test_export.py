"""Export to Hugging Face transformers: a trial's MLflow model, written by ``protscale export`` and loaded
back with ``from_pretrained``, gives protscale's logits on real proteins (fp32)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from protscale.cli import main
from protscale.data import MAIN
from protscale.data.fasta import read_fasta
from protscale.data.tokenizer import encode
from protscale.tracking import models
from protscale.model.transformer import ModelConfig, ProteinLM
from protscale.tracking import contract as c

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


def _proteins(n: int = 4, max_len: int = 100) -> list[str]:
    """The first ``n`` bundled UniProt sequences, cut to ``max_len`` residues."""
    return [r.seq[:max_len].decode() for r in itertools.islice(read_fasta(MAIN), n)]


def _scrambled_model(objective: str, seed: int = 0) -> ProteinLM:
    """A small model whose every weight is far from its initialisation (norm gains and biases included),
    so that any mis-mapped tensor shows in the logits."""
    torch.manual_seed(seed)
    model = ProteinLM(ModelConfig(layers=2, d_model=64, heads=4, causal=objective == "clm"))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real MLflow SQLite store for this module (creating a store costs seconds of migrations)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("export-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment = MlflowClient(uri).create_experiment("export", artifact_location=(root / "artifacts").as_uri())
    return uri, experiment


def _logged_run(store, model: ProteinLM | None) -> str:
    """A finished trial run in ``store`` holding ``model`` as its MLflow model (none if None)."""
    from mlflow.tracking import MlflowClient

    uri, experiment = store
    cl = MlflowClient(uri)
    run = cl.create_run(experiment, run_name="trial", tags={c.KIND: "trial"})
    cl.log_param(run.info.run_id, c.SEQ_LEN, 128)
    if model is not None:
        models.log_model(uri, run.info.run_id, model)
    cl.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.mark.parametrize("objective,auto", [("mlm", "AutoModelForMaskedLM"), ("clm", "AutoModelForCausalLM")])
def test_export_matches_protscale_logits_on_real_proteins(store, tmp_path, objective, auto, capsys):
    model = _scrambled_model(objective)
    run_id = _logged_run(store, model)
    out = tmp_path / "hf"
    assert main(["export", run_id, "--out", str(out), "--tracking-uri", store[0]]) == 0
    assert str(out) in capsys.readouterr().out

    hf = getattr(transformers, auto).from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == ("EsmForMaskedLM" if objective == "mlm" else "GPTNeoXForCausalLM")
    worst = 0.0
    for seq in _proteins():
        ids = encode(seq).astype(np.int64)
        assert tok(seq)["input_ids"] == ids.tolist()           # <cls> residues <eos>, ESM-2 ids
        tokens = torch.from_numpy(ids)[None]
        if objective == "mlm":                                  # what an MLM sees: some <mask> inputs
            tokens[0, 3::7] = tok.mask_token_id
        pos, doc = torch.arange(tokens.shape[1])[None], torch.zeros_like(tokens)
        with torch.no_grad():
            ours = model(tokens, pos, doc)
            theirs = hf(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
        assert ours.std() > 1.0                                 # far from uniform: a real comparison
        worst = max(worst, float((ours - theirs).abs().max()))
    print(f"{objective}: max |logit difference| {worst:.2e}")
    assert worst <= TOLERANCE, f"{objective} export differs from protscale by {worst:.2e}"


def test_export_refuses_a_run_without_a_model_and_a_used_directory(store, tmp_path, capsys):
    bare = _logged_run(store, None)
    assert main(["export", bare, "--out", str(tmp_path / "hf"), "--tracking-uri", store[0]]) == 2
    assert "has no logged model" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()

    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    run_id = _logged_run(store, _scrambled_model("clm"))
    assert main(["export", run_id, "--out", str(used), "--tracking-uri", store[0]]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
