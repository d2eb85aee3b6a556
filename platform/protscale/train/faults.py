"""Failpoints: deterministic worker deaths at named points of the training loop, for chaos tests.

Arm them with two environment variables, set wherever the Ray nodes start (Ray workers inherit the
environment of the raylet that spawns them) or in a driver's ``runtime_env={"env_vars": ...}``:

    PROTSCALE_FAULTS="after_metrics_flush@6,before_report@12,train_step@9,after_metrics_flush@6"
    PROTSCALE_FAULTS_DIR=/shared/dir/of/the/test      # where fired faults are remembered

Each entry ``POINT@STEP`` kills the process that reaches ``POINT`` at optimizer step ``STEP``
(``os._exit``: no cleanup, no exception, as an OOM kill or a lost machine would) **once** across every
process that shares ``PROTSCALE_FAULTS_DIR``: the first to get there creates the entry's marker file
(``O_CREAT | O_EXCL``, atomic) and dies; a restarted worker, or another trial, passes. An entry listed
twice fires twice (the second time in the next process to reach it: a trial resumed from a checkpoint
before ``STEP`` dies there again).

Points (``loop.py``):

* ``train_step``          after the optimizer step ``STEP``, metrics still in memory;
* ``after_metrics_flush`` at an evaluation step, after its metrics reached MLflow and before its
  checkpoint exists: the restarted worker re-trains steps that are already logged (what
  ``MetricsLogger``'s de-duplication is for);
* ``before_report``       after the checkpoint is written locally, before it is reported to Ray.

Unset (the normal case), :func:`point` is one dictionary lookup returning ``None``.

A **hold** pauses training instead of killing it, for tests that change the cluster at a known step:
with ``PROTSCALE_HOLD_FILE=/path`` set and that file present, every rank waits just after each checkpoint
(:func:`hold`) until the file is removed; rank 0 writes the step it holds at into the file.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

POINTS = ("train_step", "after_metrics_flush", "before_report")
ENV, ENV_DIR = "PROTSCALE_FAULTS", "PROTSCALE_FAULTS_DIR"
HOLD_ENV = "PROTSCALE_HOLD_FILE"
EXIT_CODE = 77                # a dead worker's exit status, recognisable in Ray's logs

_armed: dict[tuple[str, int], list[int]] | None = None     # (point, step) -> entry indices, parsed once


def parse(spec: str) -> dict[tuple[str, int], list[int]]:
    """``"a@1,b@2"`` -> {(point, step): [entry index, ...]}; raises ``ValueError`` naming a bad entry."""
    armed: dict[tuple[str, int], list[int]] = {}
    for i, entry in enumerate(e.strip() for e in spec.split(",") if e.strip()):
        name, _, step = entry.partition("@")
        if name not in POINTS or not step.isdigit():
            raise ValueError(f"{ENV}: bad entry {entry!r}: expected POINT@STEP with POINT one of "
                             f"{', '.join(POINTS)} and STEP an integer")
        armed.setdefault((name, int(step)), []).append(i)
    return armed


def point(name: str, step: int) -> None:
    """Die here if an armed, not yet fired entry ``name@step`` is left."""
    global _armed
    if _armed is None:
        if ENV not in os.environ:
            _armed = {}
            return
        _armed = parse(os.environ[ENV])
    entries = _armed.get((name, step))
    if not entries:
        return
    state = os.environ.get(ENV_DIR) or "."
    for i in entries:
        try:
            fd = os.open(os.path.join(state, f"{i}-{name}@{step}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue                    # fired before (in this trial or another one)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        print(f"[faults] {name}@{step}: killing process {os.getpid()}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)


def fired(state_dir: str) -> list[str]:
    """The entries that fired (``POINT@STEP``), from the state directory: for tests to count."""
    names = sorted(os.listdir(state_dir)) if os.path.isdir(state_dir) else []
    return [n.split("-", 1)[1] for n in names if "-" in n and "@" in n]


def hold(step: int, rank: int) -> None:
    """While the file named by ``PROTSCALE_HOLD_FILE`` exists, wait (rank 0 writes ``step`` into it first,
    never creating it)."""
    path = os.environ.get(HOLD_ENV)
    if not path or not os.path.exists(path):
        return
    if rank == 0:
        with contextlib.suppress(FileNotFoundError), open(path, "r+") as f:
            f.write(str(step))
            f.truncate()
    while os.path.exists(path):
        time.sleep(0.2)
