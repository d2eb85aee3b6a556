"""Hostile input: every command, given malformed, truncated, empty, binary or out-of-range input (files,
flags, search-space files that fail to import or raise, stores that are corrupt or unreachable, results
files of another schema), exits non-zero with one line on stderr naming the file/line/flag — no
traceback, nothing written, no input changed. Ctrl-C during ``data prepare``, ``import`` or ``fit``
leaves no partial output and a re-run works.

The table runs through the real command (``protscale.cli.main``, what the ``protscale`` entry point
calls) in ONE child process — a Python start per case would cost minutes — with each case's stderr
captured apart; an exception escaping ``main`` is recorded as the traceback it would print. A few cases
also run through the installed ``protscale`` entry point, each its own process.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import free_port

PROTSCALE = Path(sys.executable).with_name("protscale")
SHARED = Path(__file__).resolve().parents[2] / "shared"
TB_LOGS = SHARED / "data" / "reference-logs"

RUNNER = r"""
import contextlib, io, json, sys, time, traceback
from protscale.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:               # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:                   # would be a traceback on the terminal
            rc = "traceback"
            traceback.print_exc(file=err)
    out.append({"argv": argv, "rc": rc, "stderr": err.getvalue(), "s": round(time.perf_counter() - t0, 2)})
print("@@RESULTS@@" + json.dumps(out))
"""


def _unreachable_url() -> str:
    return f"http://127.0.0.1:{free_port()}"      # nothing listens there


def _write_inputs(d: Path) -> None:
    """Every hostile file the table uses, under ``d`` (the child's working directory)."""
    d.mkdir(parents=True, exist_ok=True)
    rnd = bytes(range(256)) * 16 + b"\x00\xff" * 64
    (d / "empty.fasta").write_bytes(b"")
    (d / "binary.fasta").write_bytes(rnd)
    (d / "bad-residues.fasta").write_text(">p1\nMKV*JJ12\n")
    (d / "no-header.fasta").write_text("MKVLAAG\nMKV\n")
    good = "".join(f">p{i}\n{'MKVLAAGLLE' * 5}\n" for i in range(20)).encode()
    (d / "good.fasta").write_bytes(good)
    (d / "truncated.fasta.gz").write_bytes(gzip.compress(good)[:-40])
    (d / "a-file").write_text("not a directory\n")
    (d / "not-a-dataset").mkdir(exist_ok=True)
    (d / "not-a-dataset" / "x.txt").write_text("keep me\n")
    for name, content in (("corrupt-manifest", b'{"seq_len": 128, "spl'), ("binary-manifest", rnd),
                          ("list-manifest", b"[1, 2, 3]")):
        (d / name).mkdir(exist_ok=True)
        (d / name / "manifest.json").write_bytes(content)
    (d / "fake-data").mkdir(exist_ok=True)
    (d / "fake-data" / "manifest.json").write_text(json.dumps({"seq_len": 128, "hash": "x", "splits": {"train": {"rows": 10, "tokens": 1280}}}))
    (d / "corrupt.db").write_bytes(rnd)
    (d / "truncated.db").write_bytes(b"SQLite format 3\x00" + b"\x10\x00" * 40)
    import sqlite3

    con = sqlite3.connect(d / "other.db")
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    spaces = {
        "space-syntax.py": "from protscale.sweep.space import SearchSpace\nSPACE = SearchSpace(\n",
        "space-import.py": "import no_such_module_xyz\n",
        "space-raises.py": "from protscale.sweep.space import SearchSpace\n\nraise RuntimeError('boom')\n",
        "space-exit.py": "import sys\nsys.exit(3)\n",
        "space-nospace.py": "X = 1\n",
        "space-empty.py": "",
        "space-binary.py": rnd,
        "space-defaults.py": "from protscale.sweep.space import SearchSpace, Trial\n"
                             "SPACE = SearchSpace('s', 'fake-data', [Trial('clm', 'tiny-3', 1e11)], "
                             "defaults={'lr_maxx': 1})\n",
        "space-trials.py": "from protscale.sweep.space import SearchSpace\nSPACE = SearchSpace('s', 'fake-data', 'clm')\n",
        "space-negative.py": "from protscale.sweep.space import SearchSpace, Trial\n"
                             "SPACE = SearchSpace('s', 'fake-data', [Trial('clm', 'tiny-3', -1e11)])\n",
        "space-nan.py": "from protscale.sweep.space import SearchSpace, Trial\n"
                        "SPACE = SearchSpace('s', 'fake-data', [Trial('clm', 'tiny-3', float('nan'))])\n",
        "space-ok.py": "from protscale.sweep.space import SearchSpace, Trial\n"
                       "SPACE = SearchSpace('s', 'fake-data', [Trial('clm', 'tiny-3', 1e11)], "
                       "defaults={'batch_tokens': 2048})\n",
    }
    for name, text in spaces.items():
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    (d / "results-truncated.json").write_text('{"schema_version": 1, "objectives": {')
    (d / "results-binary.json").write_bytes(rnd)
    (d / "results-other.json").write_text(json.dumps({"runs": [], "version": 3}))
    (d / "results-list.json").write_text("[]")
    (d / "results-version.json").write_text(json.dumps({"schema_version": 999}))
    (d / "sizes-bad.json").write_text('{"85M": ')
    (d / "sizes-list.json").write_text("[85000000]")
    (d / "sizes-negative.json").write_text('{"85M": -3}')
    (d / "tb").mkdir(exist_ok=True)
    (d / "tb" / "x.csv").write_bytes(rnd)


TRAIN = ["train", "--objective", "clm", "--size", "tiny-3", "--budget-flops", "1e11"]


def _cases(unreachable: str) -> dict[str, list[list[str]]]:
    """{command: [argv, ...]} — each must fail with one line."""
    prep = ["data", "prepare", "--out", "out-ds", "-q"]
    return {
        "data prepare": [
            prep + ["--source", "missing.fasta"],
            prep + ["--source", "empty.fasta"],
            prep + ["--source", "binary.fasta"],
            prep + ["--source", "bad-residues.fasta"],
            prep + ["--source", "no-header.fasta"],
            prep + ["--source", "truncated.fasta.gz"],
            prep + ["--source", "good.fasta:-1"],
            prep + ["--source", "good.fasta:nan"],
            prep + ["--source", "good.fasta", "--seq-len", "0"],
            prep + ["--source", "good.fasta", "--seq-len", "-8"],
            prep + ["--source", "good.fasta", "--val-fraction", "1.5"],
            prep + ["--source", "good.fasta", "--rows-per-shard", "0"],
            prep + ["--source", "good.fasta", "--ood", "binary.fasta"],
            ["data", "prepare", "--source", "good.fasta", "--out", "not-a-dataset", "-q"],
            ["data", "prepare", "--source", "good.fasta", "--out", "a-file", "-q"],
            prep,
        ],
        "train": [
            TRAIN + ["--data", "missing-dir"],
            TRAIN + ["--data", "corrupt-manifest"],
            TRAIN + ["--data", "binary-manifest"],
            TRAIN + ["--data", "list-manifest"],
            ["train", "--objective", "clm", "--size", "no-such", "--budget-flops", "1e11", "--data", "fake-data"],
            ["train", "--objective", "xyz", "--size", "tiny-3", "--budget-flops", "1e11", "--data", "fake-data"],
            ["train", "--objective", "clm", "--size", "tiny-3", "--budget-flops", "-1", "--data", "fake-data"],
            ["train", "--objective", "clm", "--size", "tiny-3", "--budget-flops", "nan", "--data", "fake-data"],
            ["train", "--objective", "clm", "--size", "tiny-3", "--budget-flops", "inf", "--data", "fake-data"],
            ["train", "--objective", "clm", "--size", "tiny-3", "--budget-flops", "lots", "--data", "fake-data"],
            ["train", "--objective", "clm", "--size", "tiny-3", "--budget-flops", "1", "--data", "fake-data"],
            TRAIN + ["--data", "fake-data", "--workers", "3:1"],
            TRAIN + ["--data", "fake-data", "--workers", "two"],
            TRAIN + ["--data", "fake-data", "--lr-max", "-0.1"],
            TRAIN + ["--data", "fake-data", "--batch-tokens", "-5"],
            TRAIN + ["--data", "fake-data", "--zero-stage", "7"],
            TRAIN + ["--data", "fake-data", "--max-failures", "-1"],
            TRAIN + ["--data", "fake-data", "--tracking-uri", "corrupt.db"],
            TRAIN + ["--data", "fake-data", "--tracking-uri", "other.db"],
            TRAIN + ["--data", "fake-data", "--tracking-uri", unreachable],
            TRAIN,
        ],
        "sweep": [
            ["sweep", "missing-space.py", "--dry-run"],
            ["sweep", "space-syntax.py", "--dry-run"],
            ["sweep", "space-import.py", "--dry-run"],
            ["sweep", "space-raises.py", "--dry-run"],
            ["sweep", "space-exit.py", "--dry-run"],
            ["sweep", "space-nospace.py", "--dry-run"],
            ["sweep", "space-empty.py", "--dry-run"],
            ["sweep", "space-binary.py", "--dry-run"],
            ["sweep", "space-defaults.py", "--dry-run"],
            ["sweep", "space-trials.py", "--dry-run"],
            ["sweep", "space-negative.py", "--dry-run"],
            ["sweep", "space-nan.py", "--dry-run"],
            ["sweep", "space-ok.py", "--dry-run", "--gpu-memory", "-4"],
            ["sweep", "space-ok.py", "--dry-run", "--mfu", "0"],
            ["sweep", "space-ok.py", "--tracking-uri", "corrupt.db"],
            ["sweep", "space-ok.py", "--tracking-uri", unreachable],
        ],
        "import tb-csv": [
            ["import", "tb-csv", "missing-dir", "--experiment", "x", "--tracking-uri", "new.db"],
            ["import", "tb-csv", "a-file", "--experiment", "x", "--tracking-uri", "new.db"],
            ["import", "tb-csv", "tb", "--experiment", "x", "--tracking-uri", "new.db", "--seq-len", "0"],
            ["import", "tb-csv", "tb", "--experiment", "x", "--tracking-uri", "new.db", "--size-map", "sizes-bad.json"],
            ["import", "tb-csv", "tb", "--experiment", "x", "--tracking-uri", "new.db", "--size-map", "sizes-list.json"],
            ["import", "tb-csv", "tb", "--experiment", "x", "--tracking-uri", "new.db", "--size-map", "sizes-negative.json"],
            ["import", "tb-csv", "tb", "--experiment", "x", "--tracking-uri", "new.db", "--size-map", "missing.json"],
            ["import", "tb-csv", "tb", "--experiment", "x", "--tracking-uri", "corrupt.db"],
            ["import", "tb-csv", "tb", "--experiment", "x", "--tracking-uri", "other.db"],
            ["import", "tb-csv", "tb", "--experiment", "x", "--tracking-uri", unreachable],
        ],
        "fit": [
            ["fit", "--experiment", "x", "--tracking-uri", "missing.db", "--out", "fit-out", "-q"],
            ["fit", "--experiment", "x", "--tracking-uri", "corrupt.db", "--out", "fit-out", "-q"],
            ["fit", "--experiment", "x", "--tracking-uri", "truncated.db", "--out", "fit-out", "-q"],
            ["fit", "--experiment", "x", "--tracking-uri", "other.db", "--out", "fit-out", "-q"],
            ["fit", "--experiment", "x", "--tracking-uri", unreachable, "--out", "fit-out", "-q"],
            ["fit", "--experiment", "x", "--tracking-uri", "corrupt.db", "--out", "fit-out", "--bootstrap", "3"],
            ["fit", "--experiment", "x", "--tracking-uri", "corrupt.db", "--parametric-init", "1,2"],
        ],
        "plan": [
            ["plan", "--budget-flops", "1e20", "--objective", "clm", "--results", "missing.json"],
            ["plan", "--budget-flops", "1e20", "--objective", "clm", "--results", "results-truncated.json"],
            ["plan", "--budget-flops", "1e20", "--objective", "clm", "--results", "results-binary.json"],
            ["plan", "--budget-flops", "1e20", "--objective", "clm", "--results", "results-other.json"],
            ["plan", "--budget-flops", "1e20", "--objective", "clm", "--results", "results-list.json"],
            ["plan", "--budget-flops", "1e20", "--objective", "clm", "--results", "results-version.json"],
            ["plan", "--budget-flops", "-1", "--objective", "clm", "--results", "results-other.json"],
            ["plan", "--budget-flops", "nan", "--objective", "both", "--results", "missing.json"],
            ["plan", "--budget-flops", "1e20", "--objective", "mlm"],
        ],
        "submit/status/logs/stop": [
            ["submit", "--address", unreachable, "--no-working-dir", "--", "echo", "hi"],
            ["submit", "--address", unreachable, "--no-working-dir"],
            ["submit", "--address", unreachable, "--working-dir", "missing-dir", "--", "echo"],
            ["submit", "--address", unreachable, "--no-working-dir", "--env", "=x", "--", "echo"],
            ["submit", "--address", "not a url", "--no-working-dir", "--", "echo"],
            ["status", "raysubmit_x", "--address", unreachable],
            ["logs", "raysubmit_x", "--address", unreachable],
            ["stop", "raysubmit_x", "--address", unreachable],
        ],
        "export/register": [
            ["export", "0123abcd", "--out", "export-out", "--tracking-uri", "corrupt.db"],
            ["export", "0123abcd", "--out", "export-out", "--tracking-uri", "missing.db"],
            ["export", "0123abcd", "--out", "a-file", "--tracking-uri", "other.db"],
            ["export", "0123abcd", "--out", "export-out", "--tracking-uri", unreachable],
            ["register", "--experiment", "x", "--objective", "clm", "--tracking-uri", "corrupt.db"],
            ["register", "--experiment", "x", "--objective", "clm", "--tracking-uri", "missing.db"],
            ["register", "--experiment", "x", "--objective", "clm", "--tracking-uri", unreachable],
        ],
        "demo": [
            ["demo", "--dir", "demo-dir", "--space", "space-raises.py"],
        ],
    }


def _snapshot(root: Path) -> dict[str, str]:
    """{relative path: content hash} of every file and folder under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run_table(workdir: Path, cases: list[list[str]]) -> list[dict]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cases)], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=900)
    marker = res.stdout.rfind("@@RESULTS@@")
    assert marker >= 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout[marker + len("@@RESULTS@@"):])


def _problems(result: dict) -> list[str]:
    """What is wrong with a case's outcome: it must exit non-zero with ONE message on stderr — a line
    ``protscale CMD: error: ...``, optionally followed by indented lines of the same message (a list of
    the problems found in a search space) — and nothing else."""
    lines = [ln for ln in result["stderr"].splitlines() if ln.strip()]
    bad = []
    if result["rc"] in (0, None):
        bad.append("exit 0")
    if result["rc"] == "traceback" or "Traceback" in result["stderr"]:
        bad.append("traceback")
    if not lines or not (lines[0].startswith("protscale ") and ": error: " in lines[0]):
        bad.append("no 'protscale CMD: error:' line first")
    if any(not ln.startswith("  ") for ln in lines[1:]):
        bad.append(f"{len(lines)} stderr lines")
    return bad


def test_every_command_fails_in_one_line_on_hostile_input(tmp_path):
    work = tmp_path / "work"
    _write_inputs(work)
    table = _cases(_unreachable_url())
    flat = [argv for argvs in table.values() for argv in argvs]
    before = _snapshot(work)
    start = time.perf_counter()
    results = _run_table(work, flat)
    seconds = time.perf_counter() - start
    failures = []
    for r in results:
        bad = _problems(r)
        if bad:
            failures.append(f"{' '.join(r['argv'])}: {', '.join(bad)}:\n    " + r["stderr"][-1500:].replace("\n", "\n    "))
    after = _snapshot(work)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    counts = {cmd: len(argvs) for cmd, argvs in table.items()}
    print(f"hostile inputs by command: {counts}; total {len(flat)} in {seconds:.1f} s")
    assert not failures, f"{len(failures)} of {len(flat)} cases:\n" + "\n".join(failures)
    assert not changed, f"files written or changed: {changed}"


def test_a_few_cases_through_the_installed_entry_point(tmp_path):
    """The same contract through the ``protscale`` console script, one process each."""
    work = tmp_path / "work"
    _write_inputs(work)
    before = _snapshot(work)
    for argv in (["train", "--objective", "clm", "--size", "tiny-3", "--budget-flops", "nan", "--data", "fake-data"],
                 ["sweep", "space-raises.py", "--dry-run"],
                 ["plan", "--budget-flops", "1e20", "--objective", "clm", "--results", "results-binary.json"],
                 ["fit", "--experiment", "x", "--tracking-uri", "corrupt.db"]):
        res = subprocess.run([str(PROTSCALE), *argv], cwd=work, capture_output=True, text=True, timeout=300)
        assert _problems({"rc": res.returncode, "stderr": res.stderr}) == [], (argv, res.stderr[-2000:])
    assert _snapshot(work) == before


# --- Ctrl-C: nothing partial is left, and running again works -------------------------------------------

def _sigint_default():
    """As in a terminal's foreground job, Ctrl-C is delivered: a test run started in the background of a
    non-interactive shell inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(cmd: list[str], cwd: Path, ready, timeout_s: float = 300,
                    allow_exit: bool = False) -> tuple[int, str]:
    """Run ``cmd`` (in its own session, like a terminal's foreground job), send Ctrl-C (SIGINT to the
    whole group) once ``ready(stderr_so_far)`` holds, and return (exit status, stderr). Whatever is left
    of the session afterwards (a Ray the command started) is killed by process id."""
    from servers import session_pids

    log = cwd / f".stderr-{len(list(cwd.glob('.stderr-*')))}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                preexec_fn=_sigint_default)
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline and not ready(log.read_text()):
            time.sleep(0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            assert allow_exit, f"finished before it could be interrupted:\n{log.read_text()[-2000:]}"
        rc = proc.wait(timeout=120)
    finally:
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    log.unlink()
    return rc, text


@pytest.mark.slow
def test_ctrl_c_during_data_prepare_leaves_nothing_and_a_rerun_works(tmp_path):
    cmd = [str(PROTSCALE), "data", "prepare", "--demo", "--out", "ds", "--seq-len", "128"]
    for attempt in (1, 2):     # a loaded machine can miss Ray's start-up timeout: that run fails in one line
        rc, err = _interrupt_when(cmd, tmp_path, lambda e: "data prepare:" in e and "read" in e.lower(),
                                  allow_exit=True)
        if rc != 2 or "did not start" not in err:
            break
    assert rc == 130 and "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == [], "partial output left"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    again = subprocess.run(cmd + ["-q"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "ds" / "manifest.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not (TB_LOGS / "gpt_valid").is_dir(), reason="needs ../shared/data/reference-logs")
def test_ctrl_c_during_import_and_fit_leaves_nothing_partial(tmp_path):
    from mlflow.tracking import MlflowClient

    import shutil

    logs = tmp_path / "logs"      # a small IsoFLOP slice of the paper's CLM curves: 5 sizes at 2 budgets
    for size in ("47M", "85M", "130M", "170M", "300M"):
        for budget in ("1e19", "3e19"):
            for f in (TB_LOGS / "gpt_valid").rglob(f"run-gpt_{size}_1024l_{budget}flops*.csv"):
                (logs / f.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, logs / f.parent.name / f.name)
    assert len(list(logs.rglob("*.csv"))) >= 10
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    imp = [str(PROTSCALE), "import", "tb-csv", str(logs), "--experiment", "paper", "--tracking-uri", uri]
    env = dict(os.environ)
    with open(tmp_path / "imp.out", "w") as out:
        proc = subprocess.Popen(imp, cwd=tmp_path, stdout=out, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=_sigint_default)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and "[2/" not in (tmp_path / "imp.out").read_text():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    cl = MlflowClient(uri)
    exp = cl.get_experiment_by_name("paper")
    interrupted = cl.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'")
    assert interrupted and all(r.info.status == "FINISHED" for r in interrupted)     # none half-imported
    t = time.perf_counter()
    again = subprocess.run(imp, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    print(f"import re-run {time.perf_counter() - t:.1f} s")
    assert again.returncode in (0, 1), again.stderr[-3000:]      # 1: files the importer reports and skips
    runs = cl.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'", max_results=5000)
    assert len(runs) > len(interrupted)
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), "a curve imported twice"

    fit = [str(PROTSCALE), "fit", "--experiment", "paper", "--tracking-uri", uri, "--out", "fit-out", "--no-log"]
    t = time.perf_counter()
    rc, err = _interrupt_when(fit, tmp_path, lambda e: "point(s)" in e)
    print(f"interrupted fit {time.perf_counter() - t:.1f} s")
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "fit-out").exists() and not list(tmp_path.glob(".fit-out*")), "partial fit output"
    quick = fit + ["-q", "--bootstrap", "20", "--bootstrap-parametric", "20", "--parametric-grid", "coarse"]
    t = time.perf_counter()
    again = subprocess.run(quick, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    print(f"quick fit {time.perf_counter() - t:.1f} s")
    assert again.returncode in (0, 1), again.stderr[-3000:]
    assert json.loads((tmp_path / "fit-out" / "results.json").read_text())["schema_version"]


@pytest.mark.slow
def test_ctrl_c_during_a_sweep_stops_the_whole_sweep(demo_data, tmp_path):
    """Ctrl-C mid-wave ends the sweep (exit 130, one line), not just the wave: Tune's own first-SIGINT
    handler would save the wave and return, and the sweep would go on to its next wave (the transfer MLM)."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    from protscale.tracking import contract as c

    space = tmp_path / "space.py"
    space.write_text(
        "from protscale.sweep.space import SearchSpace, transfer_grid\n"
        f"SPACE = SearchSpace(name='cc', data={str(demo_data)!r}, max_concurrent=1,\n"
        "    trials=transfer_grid(sizes=['micro-3'], clm_budgets=[2e10], mlm_budgets=[1e9]),\n"
        "    defaults={'batch_tokens': 512, 'eval_rows': 16})\n")
    db = tmp_path / "mlflow.db"

    def trial_running(_stderr: str) -> bool:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return con.execute("SELECT count(*) FROM tags WHERE key = ? AND value = 'trial'",
                                   (c.KIND,)).fetchone()[0] > 0
        except sqlite3.OperationalError:
            return False

    cmd = [str(PROTSCALE), "sweep", str(space), "--tracking-uri", f"sqlite:///{db}", "--storage", str(tmp_path / "runs")]
    rc, err = _interrupt_when(cmd, tmp_path, trial_running)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err, err[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("cc")
    found = client.search_runs([exp.experiment_id])
    trials = {r.data.tags.get(c.TRIAL) for r in found if r.data.tags.get(c.KIND) == "trial"}
    assert trials and not any("-from-" in t for t in trials), trials      # no later wave started
    [sweep] = [r for r in found if r.data.tags.get(c.KIND) == "sweep"]
    assert sweep.info.status == "FAILED" and "interrupted" in sweep.data.tags[c.FAILURE_REASON]
