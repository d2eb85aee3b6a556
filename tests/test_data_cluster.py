"""``data prepare`` on a two-node Ray cluster (``ray.cluster_utils.Cluster``): tasks run on both nodes and
the dataset is the one a single node makes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from protscale.data.bundled import MAIN, OOD

REPO = Path(__file__).resolve().parents[1]

# Run in its own process, on a cluster of its own (tests/conftest.py: OWN_CLUSTER_MODULES): the test session
# may hold a single-node Ray (``ray_local``).
TWO_NODES = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from protscale.data.prepare import prepare

    import socket
    with socket.socket() as s:        # the dashboard on a free port: 8265 may be the session Ray's
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_port": port})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    sources, out = json.loads(sys.argv[1]), sys.argv[2]
    kw = dict(ood=sys.argv[3], seq_len=128, rows_per_shard=1024, progress=False)
    two = prepare(sources, out + "-two", **kw)
    alive = len([n for n in ray.nodes() if n["Alive"]])
    cluster.remove_node(worker)          # the same inputs on the head alone
    one = prepare(sources, out + "-one", **kw)
    print("RESULT " + json.dumps({"nodes": two["_run"]["nodes"], "hash": two["hash"], "cluster_nodes": alive,
                                  "one_node": one["_run"]["nodes"], "one_node_hash": one["hash"]}))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.slow
def test_prepare_on_two_nodes(tmp_path):
    # four input files, so the read stage alone has work for both nodes
    text = gzip.decompress(MAIN.read_bytes()).decode().split("\n>")
    files = []
    for i in range(4):
        part = text[i::4]
        body = "\n>".join(part)
        f = tmp_path / f"part-{i}.fasta"
        f.write_text(body if body.startswith(">") else ">" + body)
        files.append(str(f))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.run([sys.executable, "-c", TWO_NODES, json.dumps(files), str(tmp_path / "out"), str(OOD)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["cluster_nodes"] == 2 and len(got["nodes"]) == 2, got  # both nodes ran tasks
    assert len(got["one_node"]) == 1, got                              # ... then the head alone
    assert got["one_node_hash"] == got["hash"]                         # the same dataset either way
