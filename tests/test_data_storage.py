"""Datasets in object storage: ``data prepare`` reading from and writing to ``s3://`` on a real
S3-compatible server (moto's standalone server on loopback), read back through ``shards``."""

from __future__ import annotations

import gzip
import socket

import numpy as np
import pytest

from protscale.cli import main
from protscale.errors import UserError
from protscale.data import shards
from protscale.data.bundled import MAIN, OOD
from protscale.data.prepare import prepare
from protscale.data.storage import locate

BUCKET = "protscale-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(ray_local):
    """A real S3 API on 127.0.0.1 with one bucket; the standard AWS variables point at it."""
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(MAIN), BUCKET, f"in/{MAIN.name}")
    yield client
    mp.undo()
    server.stop()


def keys(client, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def test_prepare_to_and_from_s3(s3, tmp_path, capsys):
    uri = f"s3://{BUCKET}/datasets/demo-128"
    src = f"s3://{BUCKET}/in/{MAIN.name}"
    m = prepare([src], uri, ood=OOD, seq_len=128, val_fraction=0.05, progress=False)
    assert m["sources"][0]["path"] == src and m["sources"][0]["records"] == 6000
    # only the dataset is left under the prefix: manifest + listed shards, no intermediate files
    listed = {f"datasets/demo-128/{s['file']}" for sp in m["splits"].values() for s in sp["shards"]}
    assert keys(s3, "datasets/demo-128/") == sorted(listed | {"datasets/demo-128/manifest.json"})
    assert shards.read_manifest(uri)["hash"] == m["hash"]

    # the same inputs prepared locally give the same rows: the URI changes where bytes go, nothing else
    local = tmp_path / "local"
    prepare([MAIN], local, ood=OOD, seq_len=128, val_fraction=0.05, progress=False)
    for split in ("train", "val", "test"):
        remote_rows, local_rows = shards.read_split(uri, split), shards.read_split(local, split)
        assert len(remote_rows) == m["splits"][split]["rows"] > 0
        assert np.array_equal(remote_rows.tokens, local_rows.tokens)

    # an existing dataset is refused without --overwrite, replaced with it (through the CLI)
    rc = main(["data", "prepare", "--quiet", "--source", str(MAIN), "--out", uri, "--seq-len", "64"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = main(["data", "prepare", "--quiet", "--source", str(MAIN), "--out", uri, "--seq-len", "64", "--overwrite"])
    assert rc == 0, capsys.readouterr().err
    assert shards.read_manifest(uri)["seq_len"] == 64
    assert not [k for k in keys(s3, "datasets/demo-128/") if "/test/" in k]  # the old test split is gone


def test_failed_run_leaves_nothing_in_the_bucket(s3, tmp_path):
    bad = tmp_path / "bad.fa"
    bad.write_bytes(gzip.decompress(MAIN.read_bytes()) + b">broken\nMKV*L\n")
    uri = f"s3://{BUCKET}/datasets/broken"
    with pytest.raises(UserError, match=r"bad\.fa:\d+: invalid character"):
        prepare([MAIN, bad], uri, progress=False)
    assert keys(s3, "datasets/broken") == []
    with pytest.raises(shards.DatasetError, match="no manifest.json"):
        shards.read_manifest(uri)


def test_missing_input_uri_is_one_line(s3, tmp_path):
    with pytest.raises(UserError, match=f"s3://{BUCKET}/in/nope.fasta: no such file"):
        prepare([f"s3://{BUCKET}/in/nope.fasta"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    loc = locate(f"s3://{BUCKET}/in/{MAIN.name}")
    assert loc.remote and loc.is_file() and not locate(tmp_path).remote


@pytest.mark.slow
def test_a_trial_trains_from_s3(s3, tmp_path):
    """A short real trial (Ray Train's local mode, DeepSpeed on CPU) streams its rows from ``s3://``."""
    from mlflow.tracking import MlflowClient

    from protscale.tracking import contract as c
    from protscale.train.config import TrialConfig
    from protscale.train.trial import run_trial

    uri = f"s3://{BUCKET}/datasets/trial-128"
    prepare([MAIN], uri, ood=OOD, seq_len=128, val_fraction=0.05, progress=False)
    cfg = TrialConfig(objective="clm", size="tiny-2", budget_flops=6 * 55296 * 80_000, data=uri,
                      tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="s3", batch_tokens=4096,
                      eval_every=10, eval_rows=48)
    result = run_trial(cfg, workers=(0, 0), storage=str(tmp_path / "runs"))
    assert result.status == c.STATUS_COMPLETED
    client = MlflowClient(cfg.tracking_uri)
    val = [m.value for m in client.get_metric_history(result.run_id, c.VAL_LOSS)]
    test = [m.value for m in client.get_metric_history(result.run_id, c.TEST_LOSS)]
    assert val and test and all(np.isfinite(val + test)) and val[-1] < val[0]


def test_a_search_space_may_name_its_data_by_uri(tmp_path, monkeypatch):
    """``space.load`` keeps ``s3://`` data as given (a local path is made absolute), and a RayJob's
    ``PROTSCALE_DATA`` replaces the space's data."""
    from protscale.sweep.space import load

    monkeypatch.delenv("PROTSCALE_DATA", raising=False)
    for data, want in (("s3://datasets/demo-128", "s3://datasets/demo-128"),
                       ("rel/data", str((tmp_path / "rel" / "data").resolve()))):
        f = tmp_path / "space.py"
        f.write_text("from protscale.sweep.space import SearchSpace, isoflop_grid\n"
                     f"SPACE = SearchSpace(name='s', data={data!r}, trials=isoflop_grid([1e11], ['tiny-1']))\n")
        monkeypatch.chdir(tmp_path)
        assert load(f).data == want
    monkeypatch.setenv("PROTSCALE_DATA", "s3://datasets/other")
    assert load(f).data == "s3://datasets/other"
