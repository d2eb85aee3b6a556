"""The console of a sweep: one live display, Ray's own output in a log file.

On a terminal, ``protscale sweep`` and ``demo`` show one display (rich), redrawn in place: trials
completed, failed and running out of those planned so far, elapsed time and an ETA, the best final
``val_loss`` per objective × budget, and each objective's N_opt exponent once it can be fitted. Output that
is not a terminal (CI, pipes) gets one short line per finished trial instead.

Everything Ray prints — Ray Tune's status tables, the trials' own lines, worker logs, warnings — goes to a
log file (``<storage>/<sweep>/sweep.log`` by default) whose path is printed first. The sweep driver's own
lines (``[sweep] …``, ``[adaptive] …``) still reach the console. ``--verbose`` leaves Ray's output on the
console as before and adds the short progress lines.

How: while the sweep runs, file descriptors 1 and 2 point at the log file, so do ``sys.stderr`` and, from
other threads (Ray's log monitor prints the workers' output) or inside ``tuner.fit()`` (Tune's tables),
``sys.stdout``; what the driver's main thread prints between Tune runs goes to the console. Tune events
reach the display through :class:`TuneEvents`, a stateless Tune callback (Tune pickles its callbacks with
the experiment, and a restored experiment brings them back) that forwards to the active
:class:`SweepMonitor`. After each finished trial the monitor refreshes the live frontier on the sweep's
parent MLflow run (:mod:`protscale.sweep.frontier`) in a background thread: Tune's event loop never waits
on it, and an error there is logged as a warning line, never raised.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from ray.tune import Callback

from ..tracking import contract as c
from .frontier import budget_key

_ACTIVE: SweepMonitor | None = None


def say(msg: str) -> None:
    """Print a driver line on the console (above the live display when there is one)."""
    if _ACTIVE is not None:
        _ACTIVE.say(msg)
    else:
        print(msg, flush=True)


class TuneEvents(Callback):
    """Forwards Tune's trial events to the active :class:`SweepMonitor` (no state: safe to pickle)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if _ACTIVE is not None:
            _ACTIVE.started(_name(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):     # retried after an error: still running
        if _ACTIVE is not None:
            _ACTIVE.started(_name(trial))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _ACTIVE is not None:
            _ACTIVE.finished(_name(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        if _ACTIVE is not None:
            _ACTIVE.finished(_name(trial), errored=True)


def _name(trial) -> str:
    return str((trial.config or {}).get("trial_name") or trial.trial_id)


def default_log_path(storage: str, sweep: str) -> Path:
    """``<storage>/<sweep>/sweep.log`` for local storage; in the working directory for remote storage."""
    if "://" in storage:
        return Path(f"sweep-{sweep}.log").resolve()
    return Path(storage, sweep, "sweep.log").resolve()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class SweepMonitor:
    """Counts, display and live frontier of one sweep (use as a context manager around the sweep)."""

    def __init__(self, sweep: str, log_path: Path | str | None, verbose: bool = False):
        self.sweep, self.verbose = sweep, verbose
        self.log_path = Path(log_path) if log_path else None
        self.frontier = None
        self.planned: dict[str, object] = {}         # name -> Trial, every wave told so far
        self.running: set[str] = set()
        self.status: dict[str, str] = {}             # finished trials: name -> completed / diverged / failed
        self.earlier: set[str] = set()               # finished before this run of the sweep (resume)
        self.awaiting: list[str] = []                # finished in Tune, MLflow status not read yet
        self.errored: set[str] = set()
        self.snapshot = None
        self.start = time.time()
        self.first_start: float | None = None
        self.finished_here = 0
        self.warned = False
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._tuning = False
        self._stack = contextlib.ExitStack()
        self.term = sys.stdout
        self.console = None
        self.live = None

    # --- what run_sweep tells the monitor ------------------------------------------------------------
    def attach(self, frontier) -> None:
        """The :class:`~protscale.sweep.frontier.LiveFrontier` of the sweep's parent run."""
        self.frontier = frontier

    def plan(self, trials, done: dict[str, str]) -> None:
        """A wave's trials; ``done`` = {name: status} of trials finished before (not trained again)."""
        with self._lock:
            for t in trials:
                self.planned[t.name] = t
                if t.name in done and t.name not in self.status:
                    self.status[t.name] = done[t.name]
                    self.earlier.add(t.name)

    @contextlib.contextmanager
    def tuning(self):
        """Around ``tuner.fit()``: what Tune prints from the main thread goes to the log too."""
        self._tuning = True
        try:
            yield
        finally:
            self._tuning = False

    # --- Tune events -------------------------------------------------------------------------------------
    def started(self, name: str) -> None:
        with self._lock:
            self.running.add(name)
            self.status.pop(name, None)
            self.earlier.discard(name)
            self.errored.discard(name)          # restarted (a retry, or a resumed sweep)
            self.first_start = self.first_start or time.time()

    def finished(self, name: str, errored: bool = False) -> None:
        with self._lock:
            self.running.discard(name)
            self.finished_here += 1
            if errored:
                self.errored.add(name)
            self.awaiting.append(name)
        self._wake.set()

    # --- counts ------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            done = {n for n, s in self.status.items()}
            completed = sum(1 for s in self.status.values() if s == c.STATUS_COMPLETED)
            pending = len([n for n in self.planned if n not in done and n not in self.running
                           and n not in self.awaiting])
            return {"completed": completed, "failed": len(done) - completed, "running": len(self.running),
                    "pending": pending, "planned": len(self.planned),
                    "finished": len(done) + len(self.awaiting)}

    def eta(self) -> float | None:
        """Seconds left: the trials not finished yet at the rate trials finished in this run."""
        k = self.counts()
        if not self.finished_here or self.first_start is None:
            return None
        rate = (time.time() - self.first_start) / self.finished_here
        return rate * (k["pending"] + k["running"])

    # --- the frontier thread ----------------------------------------------------------------------------
    def _refresh(self, final: bool = False) -> None:
        if self.frontier is None:
            with self._lock:
                awaiting = list(self.awaiting)
                for name in awaiting:
                    self.status[name] = c.STATUS_FAILED if name in self.errored else c.STATUS_COMPLETED
                self.awaiting.clear()
            return self._lines(awaiting)
        with self._lock:
            awaiting = list(self.awaiting)
        try:
            snap = self.frontier.read()
        except Exception as exc:        # the store is unreachable for a moment: count from Tune alone
            snap = None
            self._warn(f"could not read the trials' runs: {type(exc).__name__}: {exc}")
        with self._lock:
            for name in awaiting:
                if snap is None:            # Tune's word only
                    st = c.STATUS_FAILED if name in self.errored else c.STATUS_COMPLETED
                else:
                    t = snap.trials.get(name)
                    st = t.status if t is not None else ""
                    if name in self.errored or st not in (c.STATUS_COMPLETED, c.STATUS_DIVERGED):
                        st = c.STATUS_FAILED
                self.status[name] = st
                self.awaiting.remove(name)
            k = self.counts()
        if snap is None:
            return self._lines(awaiting)
        try:
            snap = self.frontier.update(k, step=k["completed"] + k["failed"], snap=snap, final=final)
            with self._lock:
                self.snapshot = snap
            for w in snap.warnings:
                self._warn(w)
        except Exception as exc:
            self._warn(f"{type(exc).__name__}: {exc}")
        self._lines(awaiting)

    def _lines(self, names) -> None:
        for name in names:
            self._trial_line(name)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            self._refresh()

    def _warn(self, msg: str) -> None:
        print(f"WARNING protscale live frontier of sweep {self.sweep}: {msg}", file=sys.stderr, flush=True)
        if not self.warned:
            self.warned = True
            self.say(f"[sweep] warning: live frontier not updated ({msg[:160]}); the sweep goes on"
                     + (f"; details in {self.log_path}" if self.log_path and not self.verbose else ""))

    # --- output ------------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if self.live is not None:
            self.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            print(msg, file=self.term, flush=True)

    def _trial_line(self, name: str) -> None:
        """Line mode: one line per finished trial."""
        if self.live is not None:
            return
        k = self.counts()
        with self._lock:
            status = self.status.get(name, "?")
            snap = self.snapshot
        t = snap.trials.get(name) if snap else None
        loss = f", val_loss {t.val_loss:.4f}" if t is not None and t.val_loss == t.val_loss else ""
        best = ""
        if t is not None and snap and snap.best.get((t.objective, t.budget_flops), (None, None))[1] == name:
            best = f" (best of {t.objective} at {budget_key(t.budget_flops)})"
        eta = self.eta()
        self.say(f"[sweep] {k['finished']}/{k['planned']} | {k['completed']} completed, {k['failed']} failed, "
                 f"{k['running']} running | {_clock(time.time() - self.start)}"
                 + (f", ETA ~{_clock(eta)}" if eta is not None else "") + f" | {name} {status}{loss}{best}")

    def _render(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        k = self.counts()
        eta = self.eta()
        head = Table.grid(padding=(0, 1))
        head.add_row(Text(f"sweep {self.sweep}", style="bold"),
                     ProgressBar(total=max(1, k["planned"]), completed=k["finished"], width=30),
                     Text(f"{k['finished']}/{k['planned']} trials"))
        counts = Text.assemble((f"{k['completed']} completed", "green"), "  ",
                               (f"{k['failed']} failed", "red" if k["failed"] else ""), "  ",
                               (f"{k['running']} running", "cyan"), f"  {k['pending']} pending  ·  elapsed ",
                               _clock(time.time() - self.start),
                               "" if not k["pending"] + k["running"] else
                               "  ·  ETA " + (f"~{_clock(eta)}" if eta is not None else "after the first trial"))
        parts = [head, counts]
        with self._lock:
            snap = self.snapshot
        if snap and snap.best:
            budgets = sorted({b for _, b in snap.best})
            table = Table(title="best val_loss (completed trials)", title_justify="left", box=None,
                          padding=(0, 2), header_style="bold")
            table.add_column("objective")
            for b in budgets:
                table.add_column(f"C = {budget_key(b)}", justify="right")
            for obj in sorted({o for o, _ in snap.best}):
                cells = []
                for b in budgets:
                    v = snap.best.get((obj, b))
                    cells.append(f"{v[0]:.4f} {v[2]}" if v else "-")
                table.add_row(obj, *cells)
            parts.append(table)
        if snap:
            for obj, (n, lo, hi, used) in sorted(snap.exponents.items()):
                parts.append(Text(f"{obj}: N_opt ∝ C^{n:.3f}  95% [{lo:.3f}, {hi:.3f}]  from {used} budgets"))
        if self.log_path and not self.verbose:
            parts.append(Text(f"Ray output: {self.log_path}", style="dim"))
        return Group(*parts)

    def summary(self, details: bool = True) -> list[str]:
        """The closing lines (``details``: also the best losses and exponents the live display showed)."""
        k = self.counts()
        lines = [f"[sweep] {self.sweep}: {k['completed']} completed, {k['failed']} failed of {k['planned']} "
                 f"trial(s) in {_clock(time.time() - self.start)}"]
        snap = self.snapshot
        if snap and details:
            for obj in sorted({o for o, _ in snap.best}):
                best = ", ".join(f"{budget_key(b)}: {v[0]:.4f} ({v[2]})" for (o, b), v in sorted(snap.best.items()) if o == obj)
                lines.append(f"[sweep] best {obj} val_loss by budget: {best}")
            for obj, (n, lo, hi, used) in sorted(snap.exponents.items()):
                lines.append(f"[sweep] {obj}: N_opt ∝ C^{n:.3f} (95% [{lo:.3f}, {hi:.3f}], {used} budgets)")
        return lines

    # --- context ----------------------------------------------------------------------------------------
    def __enter__(self):
        global _ACTIVE
        if self.log_path and not self.verbose:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.term = self._stack.enter_context(_redirected(self.log_path, self))
            print(f"[sweep] Ray Tune tables, trial output and worker logs -> {self.log_path} "
                  "(--verbose shows them here)", file=self.term, flush=True)
        from rich.console import Console

        self.console = Console(file=self.term)
        if self.console.is_terminal and not self.verbose:
            from rich.live import Live

            self.live = Live(get_renderable=self._render, console=self.console, refresh_per_second=2,
                             redirect_stdout=False, redirect_stderr=False)
            self.live.start()
        self._thread = threading.Thread(target=self._run, name="protscale-live-frontier", daemon=True)
        self._thread.start()
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._refresh(final=True)      # the final state of the parent run, before the sweep returns
        finally:
            _ACTIVE = None
            live = self.live is not None
            if live:
                self.live.stop()
                self.live = None
            for line in self.summary(details=not live):
                print(line, file=self.term, flush=True)
            self._stack.close()


class _MainLines:
    """``sys.stdout`` during a quiet sweep: the driver's main thread outside ``tuner.fit()`` prints on the
    console (through the monitor), everything else goes to the log."""

    def __init__(self, log, monitor: SweepMonitor):
        self.log, self.monitor, self._buf = log, monitor, ""

    def _console(self) -> bool:
        return threading.current_thread() is threading.main_thread() and not self.monitor._tuning

    def write(self, s: str) -> int:
        if not self._console():
            return self.log.write(s)
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self.monitor.say(line)
        return len(s)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.log.fileno()

    def __getattr__(self, name):
        return getattr(self.log, name)


@contextlib.contextmanager
def _redirected(log_path: Path, monitor: SweepMonitor):
    """fds 1 and 2, ``sys.stderr`` and (see :class:`_MainLines`) ``sys.stdout`` into the log file; yields a
    stream on what stdout was (the console)."""
    log = open(log_path, "a", buffering=1, encoding="utf-8")
    log.write(f"\n===== sweep {monitor.sweep}, {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        term = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    except (AttributeError, OSError, ValueError):      # a stdout without a descriptor (a test's capture)
        term = sys.stdout
    saved = []
    try:
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(log.fileno(), fd)
    except OSError:
        pass
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _MainLines(log, monitor), log
    try:
        yield term
    finally:
        sys.stdout, sys.stderr = old
        log.flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if term is not old[0]:
            term.close()
        log.close()
