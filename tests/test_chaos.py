"""Chaos: a sweep on a real 4-node Ray cluster (a head and three one-CPU workers) survives faults injected
at random, seeded points, and the tracking store shows every trial finished exactly once, every metric step
exactly once.

Faults, each kind at least twice (``test_chaos``: 12 in all; ``test_soak``: 100, run with ``-m soak``):

* worker kills at failpoints (``protscale.train.faults``): after a step, between the MLflow flush and the
  checkpoint (the restarted trial re-trains steps already logged), before the checkpoint report;
* a node removed mid-trial (``cluster.remove_node`` on a node running a trial; a fresh node joins);
* the sweep driver SIGKILLed mid-sweep, then ``protscale sweep ... --resume``;
* the real ``mlflow server`` SIGKILLed mid-trial and started again on the same port and store;
* a trial's checkpoint storage becoming unwritable (a full, size-limited tmpfs mounted over it): the trial
  cannot go on and must end FAILED with a one-line ``failure_reason``; the other trials are untouched.

The seed is printed (``CHAOS seed=...``); ``PROTSCALE_CHAOS_SEED=<seed>`` replays the same fault plan.
The cluster lives in a child process, and the data is prepared on it (``protscale data prepare --address``):
the test holds no Ray of its own, so it can run beside the tests that share the session's local Ray.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from protscale.tracking import contract as c
from protscale.train import faults
from servers import MlflowServer, free_port

KEYS_PER_STEP = (c.TRAIN_LOSS, c.LR)              # logged at every step
KEYS_PER_EVAL = (c.VAL_LOSS, c.TEST_LOSS, c.TOKENS)     # logged at every evaluation step
SEQ_LEN = 128
STORAGE_ERROR = "could not be written"           # in the failure_reason of a trial whose storage filled up

# The cluster: a head without CPUs for trials and three workers of one CPU each (one trial each), kept in a
# child process that removes a node running a trial when asked, and starts a fresh one in its place. The
# head holds no trial, so a node fault finds one to hit whenever a trial runs (with a CPU on the head, the
# last trials of a sweep could all run there, out of the faults' reach).
CLUSTER = textwrap.dedent("""
    import random, sys
    import psutil
    from ray.cluster_utils import Cluster

    def add(**args):        # Ray gives a raylet 30 s to register: a loaded 2-core machine can miss it
        for attempt in range(3):
            try:
                return cluster.add_node(**args)
            except Exception:
                if attempt == 2:
                    raise

    # A trial's processes: its Tune trainable (a function), its Ray Train controller and workers. They are
    # found among the node's raylet's children by their process titles (`ray::ImplicitFunc.train`), not
    # through Ray's state API, whose actor list once came back empty while three trials ran (seed 689512).
    TRIAL_ACTORS = ("ImplicitFunc", "TrainController", "RayTrainWorker")

    def runs_a_trial(node) -> bool:
        try:
            raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
            return any(a in p.name() for p in raylet.children(recursive=True) for a in TRIAL_ACTORS)
        except (psutil.Error, KeyError, IndexError):
            return False

    rng = random.Random(int(sys.argv[1]))
    cluster = Cluster()
    add(num_cpus=0, include_dashboard=True, dashboard_port=int(sys.argv[2]))
    workers = [add(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    # Replies start with "CLUSTER": the test reads past anything else Ray may print here.
    print("CLUSTER ADDRESS", cluster.address, flush=True)
    for line in sys.stdin:
        if line.strip() != "remove":
            break
        for w in [w for w in workers if w.dead_processes()]:    # a node whose raylet died starting up
            workers.remove(w)
            cluster.remove_node(w, allow_graceful=False)
            workers.append(add(num_cpus=1))
        hit = [w for w in workers if runs_a_trial(w)]
        if not hit:
            print("CLUSTER NONE: no trial runs on", len(workers), "worker nodes", flush=True)
            continue
        node = rng.choice(hit)
        workers.remove(node)
        cluster.remove_node(node, allow_graceful=False)
        workers.append(add(num_cpus=1))
        print("CLUSTER REMOVED", node.node_id, flush=True)
    cluster.shutdown()
""")


@dataclass
class FaultPlan:
    """What to inject, drawn from ``seed``: failpoint entries (worker kills), the order of the external
    faults with the training progress (steps logged) to wait for before each, and the trials whose
    checkpoint storage fills up (after their checkpoint of step ``doom_after``)."""

    seed: int
    kills: list[str]
    external: list[tuple[str, int]]
    doomed: dict[str, int]

    @classmethod
    def draw(cls, seed: int, n_faults: int, trials: list[str], steps: int, eval_every: int) -> "FaultPlan":
        rng = random.Random(seed)
        storage = max(2, n_faults // 12)
        driver = max(2, n_faults // 8)
        node = mlflow = max(2, n_faults // 6)
        n_kills = n_faults - storage - driver - node - mlflow
        assert n_kills >= 4 and len(trials) >= storage + 2
        evals = list(range(eval_every, steps, eval_every))
        points = ["after_metrics_flush", "after_metrics_flush", "before_report", "train_step"]
        points += [rng.choice(["after_metrics_flush", "after_metrics_flush", "before_report", "train_step"])
                   for _ in range(n_kills - 4)]
        kills = [f"{p}@{rng.randrange(2, steps) if p == 'train_step' else rng.choice(evals)}" for p in points]
        # Node faults first: a node fault needs a running trial, sure while the sweep is full and not near
        # its end; the other kinds in random order.
        others = ["mlflow"] * mlflow + ["driver"] * driver
        rng.shuffle(others)
        external = ["node"] * node + others
        # Wait between external faults for a share of the steps the sweep will log, so each one lands
        # mid-trial and the last one comes with most of the sweep still to run (at 0.6, and once at 0.45 on
        # a loaded machine, the sweep ended before the last fault).
        total = steps * (len(trials) - storage)
        gap = 0.3 * total / (len(external) + 1)
        progress = [int(gap * rng.uniform(0.6, 1.4)) + 1 for _ in external]
        doomed = {t: rng.choice(evals[: max(1, len(evals) // 2)]) for t in rng.sample(trials, storage)}
        return cls(seed, kills, list(zip(external, progress)), doomed)


@dataclass
class Chaos:
    """The faults as they were injected (for the figures and the checks)."""

    injected: dict[str, int] = field(default_factory=dict)
    mounts: list[Path] = field(default_factory=list)
    params: dict[str, dict] = field(default_factory=dict)          # run id -> params when first seen
    finished: dict[str, int] = field(default_factory=dict)         # run id -> end time when seen finished

    def count(self, kind: str) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1


@pytest.fixture
def can_mount(tmp_path):
    """Checkpoint-storage faults mount a size-limited tmpfs (ENOSPC): root with CAP_SYS_ADMIN only."""
    probe = tmp_path / "probe"
    probe.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(probe)], capture_output=True,
                         text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill checkpoint storage ({res.stderr.strip() or 'mount failed'}); "
                    "the chaos suite needs root with CAP_SYS_ADMIN")
    subprocess.run(["umount", str(probe)], check=True)


@pytest.mark.slow
@pytest.mark.chaos
def test_chaos(tmp_path, can_mount, record_figure):
    _chaos(tmp_path, record_figure, n_faults=12, trials=6, steps=32, timeout_s=1800)


@pytest.mark.soak
def test_soak(tmp_path, can_mount, record_figure):
    _chaos(tmp_path, record_figure, n_faults=100, trials=24, steps=60, timeout_s=4 * 3600)


# --- the run --------------------------------------------------------------------------------------------

def _chaos(tmp_path: Path, record_figure, n_faults: int, trials: int, steps: int, timeout_s: float) -> None:
    from protscale.sweep.space import load, plan, trial_hashes

    seed = int(os.environ.get("PROTSCALE_CHAOS_SEED") or random.SystemRandom().randrange(10 ** 6))
    print(f"CHAOS seed={seed} (replay: PROTSCALE_CHAOS_SEED={seed})", flush=True)
    start = time.monotonic()
    eval_every = 4
    data = tmp_path / "data"          # prepared on the cluster once it is up
    space_file = _write_space(tmp_path, data, trials, steps, eval_every)
    space = load(space_file)
    names = [t.name for t in space.trials]
    n_steps = {t.name: plan(space, t, seq_len_=SEQ_LEN).steps for t in space.trials}
    assert set(n_steps.values()) == {steps}, n_steps
    fp = FaultPlan.draw(seed, n_faults, names, steps, eval_every)
    print(f"CHAOS plan: kills {fp.kills}; external {fp.external}; storage {fp.doomed}", flush=True)

    state_dir = tmp_path / "faults"
    state_dir.mkdir()
    # The cluster's own temporary folder (short: Ray's socket paths are limited to 107 characters): its
    # `ray_current_cluster` must not point later bare `ray.init()` calls of this worker at a dead cluster.
    ray_tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # RAY_agent_register_timeout_ms: a node started on a loaded machine gets more than 30 s for its agent.
    env.update(RAY_AUTH_MODE="disabled", TMPDIR=str(ray_tmp), RAY_agent_register_timeout_ms="180000",
               PROTSCALE_FAULTS=",".join(fp.kills),
               PROTSCALE_FAULTS_DIR=str(state_dir))
    db = tmp_path / "mlflow.db"
    server = MlflowServer(f"sqlite:///{db}", tmp_path / "mlflow-server").start()
    cluster = subprocess.Popen([sys.executable, "-c", CLUSTER, str(seed), str(free_port())], env=env, cwd=tmp_path,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp_path / "cluster.log", "w"),
                               text=True, start_new_session=True)
    chaos = Chaos()
    try:
        address = _read_address(cluster, tmp_path / "cluster.log")
        _prepare(data, address, env)
        rc = _run_with_faults(fp, chaos, space_file, space.name, (cluster, address), server, db, env, tmp_path,
                              timeout_s)
        hashes = trial_hashes(space, server.url)
        figures = _check_store(server.url, space.name, names, hashes, n_steps, eval_every, fp, chaos)
    finally:
        for mount in chaos.mounts:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        _stop_cluster(cluster)
        server.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    chaos.injected["worker_kill"] = len(faults.fired(str(state_dir)))
    total = sum(chaos.injected.values())
    record_figure(f"CHAOS seed={seed} faults={total} by kind {json.dumps(chaos.injected, sort_keys=True)} "
                  f"trials={len(names)} ({len(fp.doomed)} failed by design) steps_checked={figures['steps']} "
                  f"points_checked={figures['points']} lost={figures['lost']} duplicated={figures['duplicated']} "
                  f"wall={time.monotonic() - start:.0f}s")
    assert rc == 1, f"the sweep should report its failed trials (exit 1), got {rc} (seed {seed})"
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    assert total >= n_faults and all(chaos.injected.get(k, 0) >= 2 for k in
                                     ("worker_kill", "node", "driver", "mlflow", "storage")), (chaos.injected, seed)
    assert sum(1 for f in faults.fired(str(state_dir)) if f.startswith("after_metrics_flush")) >= 2


def _write_space(tmp_path: Path, data: Path, trials: int, steps: int, eval_every: int) -> Path:
    """``trials`` micro-1 CLM trials (seeds 0..) of ``steps`` optimizer steps of 2048 tokens each."""
    from protscale.model.sizes import get_size

    budget = 6.0 * get_size("micro-1").n_params_non_embedding * 2048 * steps
    path = tmp_path / "space.py"
    path.write_text(
        "from protscale.sweep.space import SearchSpace, Trial\n"
        f"SPACE = SearchSpace(name='chaos', data={str(data)!r},\n"
        f"    trials=[Trial('clm', 'micro-1', {budget!r}, seed=s) for s in range({trials})],\n"
        f"    defaults={{'batch_tokens': 2048, 'eval_rows': 16, 'eval_every': {eval_every}}}, max_concurrent=3)\n")
    return path


def _prepare(out: Path, address: str, env: dict) -> None:
    """The bundled proteins as the conftest's ``demo_data`` has them, prepared by Ray Data on the cluster."""
    from protscale.data import MAIN, OOD

    cmd = [sys.executable, "-m", "protscale.cli", "data", "prepare", "--source", str(MAIN), "--ood", str(OOD),
           "--out", str(out), "--seq-len", str(SEQ_LEN), "--val-fraction", "0.05", "--address", address, "-q"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"data prepare on the cluster failed:\n{res.stderr[-3000:]}"


def _reply(cluster: subprocess.Popen) -> str:
    """The cluster process's next reply ("" when it has ended), past any other line Ray printed."""
    for line in cluster.stdout:
        if line.startswith("CLUSTER "):
            return line[len("CLUSTER "):].strip()
    return ""


def _read_address(cluster: subprocess.Popen, log: Path) -> str:
    reply = _reply(cluster)
    assert reply.startswith("ADDRESS "), f"the 4-node cluster did not start:\n{log.read_text()[-3000:]}"
    return reply.split()[1]


def _stop_cluster(cluster: subprocess.Popen) -> None:
    try:
        cluster.stdin.write("quit\n")
        cluster.stdin.flush()
        cluster.wait(timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        pass
    from servers import session_pids

    for pid in session_pids(cluster.pid):         # whatever of the cluster is left, by process id
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_with_faults(fp: FaultPlan, chaos: Chaos, space_file: Path, sweep: str, cluster, server,
                     db: Path, env: dict, tmp_path: Path, timeout_s: float) -> int:
    """Run the sweep to its end while injecting the external faults; returns the last driver's exit code."""
    storage = tmp_path / "runs"
    cluster, address = cluster
    launches = 0

    def launch(resume: bool) -> subprocess.Popen:
        nonlocal launches
        launches += 1
        cmd = [sys.executable, "-m", "protscale.cli", "sweep", str(space_file), "--tracking-uri", server.url,
               "--storage", str(storage), "--ray-address", address, "--max-failures", "50", "--verbose"]
        log = open(tmp_path / f"driver-{launches}.log", "w")
        return subprocess.Popen(cmd + (["--resume"] if resume else []), env=env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    driver = launch(resume=False)
    external, doomed = list(fp.external), dict(fp.doomed)
    baseline = 0
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    try:
        while driver.poll() is None:
            assert time.monotonic() < deadline, f"the sweep did not finish in {timeout_s:.0f} s (seed {fp.seed})"
            time.sleep(1.0)
            for trial, after in list(doomed.items()):
                if _fill_storage(storage / sweep / "trials", trial, after, chaos):
                    del doomed[trial]
            if not external:
                continue
            kind, progress = external[0]
            logged = _steps_logged(db)
            if logged - baseline < progress:
                continue
            _snapshot(server.url, sweep, chaos)
            print(f"CHAOS {time.monotonic() - t0:5.0f} s, {logged} steps logged: {kind}", flush=True)
            if kind == "node":
                if not _remove_node(cluster):
                    # No trial runs on a worker node right now: the next fault of another kind goes first.
                    other = next((i for i, (k, _) in enumerate(external) if k != "node"), None)
                    if other is not None:
                        external[0], external[other] = external[other], external[0]
                    continue
            elif kind == "mlflow":
                server.kill()
                time.sleep(random.Random(fp.seed + logged).uniform(0.5, 3.0))
                server.start()
            elif kind == "driver":
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
                driver = launch(resume=True)
            chaos.count(kind)
            external.pop(0)
            baseline = _steps_logged(db)
        assert not external and not doomed, (
            f"the sweep ended before faults {external} / storage of {list(doomed)} could be injected (seed {fp.seed}): "
            "make the trials longer")
        return driver.returncode
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def _remove_node(cluster: subprocess.Popen) -> bool:
    """Ask the cluster's process to remove a worker node that runs a trial (False: none does now)."""
    cluster.stdin.write("remove\n")
    cluster.stdin.flush()
    reply = _reply(cluster)
    assert reply, f"the cluster process ended (exit {cluster.wait()}); see cluster.log in the test's tmp_path"
    print(f"CHAOS   cluster: {reply}", flush=True)
    return reply.startswith("REMOVED")


def _steps_logged(db: Path) -> int:
    """Train-loss points in the store (read straight from SQLite: works while the server is down)."""
    for _ in range(20):
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                return con.execute("SELECT count(*) FROM metrics WHERE key = ?", (c.TRAIN_LOSS,)).fetchone()[0]
        except sqlite3.OperationalError:
            time.sleep(0.2)
    return 0


def _fill_storage(trials_dir: Path, trial: str, after: int, chaos: Chaos) -> bool:
    """Once ``trial`` has a complete checkpoint of step >= ``after``, mount a full 4 KiB tmpfs over its
    checkpoint folder: every later write there fails with ENOSPC."""
    folders = list(trials_dir.glob(f"{trial}-*")) if trials_dir.is_dir() else []
    done = [int(p.parent.name.split("_")[1]) for f in folders for p in f.glob("checkpoint_*/.complete")]
    if not folders or not done or max(done) < after:
        return False
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(folders[0])], check=True)
    chaos.mounts.append(folders[0])
    try:
        (folders[0] / "filler").write_bytes(b"\0" * 8192)
    except OSError:
        pass                           # full: as intended
    chaos.count("storage")
    return True


def _snapshot(uri: str, sweep: str, chaos: Chaos) -> None:
    """Params of every trial run, and the end time of the finished ones, before a fault (checked after)."""
    for r in _trial_runs(uri, sweep):
        chaos.params.setdefault(r.info.run_id, dict(r.data.params))
        # finished: the status tag is written just before the run is ended, so wait for its end time too
        if r.data.tags.get(c.STATUS) == c.STATUS_COMPLETED and r.info.end_time:
            chaos.finished.setdefault(r.info.run_id, r.info.end_time)


def _trial_runs(uri: str, sweep: str) -> list:
    from protscale.tracking import runs

    cl = runs.client(uri)
    exp = cl.get_experiment_by_name(sweep)
    return cl.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'", max_results=1000) if exp else []


# --- the checks ------------------------------------------------------------------------------------------

def _check_store(uri: str, sweep: str, names: list[str], hashes: dict[str, str], n_steps: dict[str, int],
                 eval_every: int, fp: FaultPlan, chaos: Chaos) -> dict:
    """Every trial has exactly one run (of its identity), completed and FINISHED, or, for a trial whose
    storage filled up, FAILED with a one-line reason; its params are those it had before the faults;
    a run that had finished before a fault was not touched again; every step of every metric is logged
    exactly once. Returns the figures: steps and points checked, lost and duplicated points."""
    from protscale.tracking import runs

    cl = runs.client(uri)
    by_trial: dict[str, list] = {}
    for r in _trial_runs(uri, sweep):
        by_trial.setdefault(r.data.tags[c.TRIAL], []).append(r)
    assert sorted(by_trial) == sorted(names), f"trials in the store: {sorted(by_trial)} (seed {fp.seed})"
    figures = {"steps": 0, "points": 0, "lost": 0, "duplicated": 0}
    problems = []
    for name in names:
        assert len(by_trial[name]) == 1, f"{name}: {len(by_trial[name])} runs (seed {fp.seed})"
        run = by_trial[name][0]
        rid, tags = run.info.run_id, run.data.tags
        assert run.data.params[c.TRIAL_HASH] == hashes[name]
        assert chaos.params.get(rid, run.data.params) == run.data.params, f"{name}: params changed"
        if rid in chaos.finished:
            assert run.info.end_time == chaos.finished[rid], f"{name}: trained again after it had finished"
        if name in fp.doomed:
            assert (tags[c.STATUS], run.info.status) == (c.STATUS_FAILED, "FAILED"), (name, tags, fp.seed)
            reason = tags.get(c.FAILURE_REASON, "")
            assert STORAGE_ERROR in reason and "\n" not in reason and "Traceback" not in reason, reason
        else:
            assert (tags[c.STATUS], run.info.status) == (c.STATUS_COMPLETED, "FINISHED"), (name, tags, fp.seed)
        last = n_steps[name]
        history = {key: [m.step for m in cl.get_metric_history(rid, key)] for key in KEYS_PER_STEP + KEYS_PER_EVAL}
        if name in fp.doomed:         # up to where it failed
            last = max(history[c.TRAIN_LOSS], default=0)
        for key, steps in history.items():
            want = set(range(1, last + 1)) if key in KEYS_PER_STEP else \
                {s for s in range(eval_every, last + 1, eval_every)} | ({last} if name not in fp.doomed else set())
            lost, duplicated = want - set(steps), len(steps) - len(set(steps))
            extra = set(steps) - want
            figures["points"] += len(want)
            figures["lost"] += len(lost)
            figures["duplicated"] += duplicated
            if lost or duplicated or extra:
                problems.append(f"{name} {key}: lost {sorted(lost)}, {duplicated} duplicated, unexpected {sorted(extra)}")
        figures["steps"] += last
    assert not problems, f"seed {fp.seed}: " + "; ".join(problems)
    return figures


# --- the pieces, without a cluster -------------------------------------------------------------------------

def test_failpoint_fires_once_across_processes(tmp_path):
    """An armed entry kills the first process that reaches it, and only that one; a bad entry is refused."""
    env = {**os.environ, faults.ENV: "train_step@3,train_step@3,before_report@4", faults.ENV_DIR: str(tmp_path)}
    reach = "from protscale.train import faults; faults.point('train_step', 2); faults.point('train_step', 3)"
    codes = [subprocess.run([sys.executable, "-c", reach], env=env, capture_output=True).returncode for _ in range(3)]
    assert codes == [faults.EXIT_CODE, faults.EXIT_CODE, 0]      # listed twice: fires twice, then never
    assert faults.fired(str(tmp_path)) == ["train_step@3", "train_step@3"]
    with pytest.raises(ValueError, match="bogus@1"):
        faults.parse("train_step@1,bogus@1")


def test_failure_reason_is_the_one_line_user_error_inside_rays_wrappers():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from protscale.train.checkpoint import CheckpointStorageError
    from protscale.train.trial import failure_reason

    inner = CheckpointStorageError("checkpoint of step 8 could not be written to /ckpt: OSError: [Errno 28] No space")
    assert failure_reason(WorkerGroupError("rank 0 failed\nTraceback ...", {0: inner})) == str(inner)
    try:
        try:
            raise inner
        except CheckpointStorageError as exc:
            raise RuntimeError("Training failed\n  File x, line 1") from exc
    except RuntimeError as wrapped:
        assert failure_reason(wrapped) == str(inner)
    assert failure_reason(KeyError("x")) == "KeyError: 'x'"
