"""Shared fixtures: a real local Ray cluster and a prepared copy of the bundled proteins."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Each test process (each pytest-xdist worker, with `-n`) gets its own temporary directory, so
# its local Ray (sockets, session files, and `ray_current_cluster`, which a bare `ray.init()` joins) and
# the Ray of every subprocess it starts never meet another process's, nor a cluster a developer started.
# (Short names: Ray's socket paths under it must stay within the 107 characters of a Unix socket.)

_tmp = Path(os.environ.setdefault("PS_TEST_TMPBASE", tempfile.gettempdir())) / f"ps{os.getpid()}"
_tmp.mkdir(exist_ok=True)
os.environ["TMPDIR"] = str(_tmp)
tempfile.tempdir = None


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (4 logical CPUs so 2-worker trials fit beside the driver)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for attempt in (1, 2, 3):   # Ray gives its raylet 30 s to start: a loaded 2-core machine can miss it
        if ray.is_initialized():
            break
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=True, logging_level="WARNING")
        except Exception:
            ray.shutdown()
            if attempt == 3:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory, ray_local) -> Path:
    """The bundled proteins prepared once: rows of 128 tokens, IID validation and an OOD test split
    (``prepare`` runs on Ray Data: on the session's Ray, not on one it would start by itself)."""
    from protscale.data import MAIN, OOD
    from protscale.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "bundled-128"
    prepare([MAIN], out, ood=OOD, seq_len=128, val_fraction=0.05, progress=False)
    return out


# Tests that start Ray (the session's local Ray, a cluster, or a command that prepares data or runs a
# sweep) run on one pytest-xdist worker, one after another (`make test`: ``-n 2 --dist loadgroup``); the
# tests whose multi-node cluster is their own (chaos, live elastic resizes, preparation on two nodes) run
# on the other worker, beside the tests that start no Ray.
# On 2 cores, two local Rays side by side missed Ray's start-up timeouts or hung a sweep. A test outside
# these groups that starts a Ray fails (``_no_ray_outside_the_groups``).
RAY_FIXTURES = {"ray_local", "demo_data"}
RAY_MODULES = {"test_adaptive_sweep", "test_data_prepare", "test_data_storage",
               "test_submit", "test_sweep", "test_sweep_progress", "test_train"}
RAY_TESTS = {"test_ctrl_c_during_data_prepare_leaves_nothing_and_a_rerun_works",
             "test_every_command_fails_in_one_line_on_hostile_input"}
OWN_CLUSTER_MODULES = {"test_chaos", "test_data_cluster", "test_elastic_live"}


def _group(item) -> str | None:
    if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in RAY_MODULES \
            or item.originalname in RAY_TESTS:
        return "ray"
    return "own-cluster" if item.module.__name__ in OWN_CLUSTER_MODULES else None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The soak (hours) runs only when selected: ``pytest -m soak``. The tests that start Ray form
    xdist groups. First among the hooks: pytest-xdist's own reads the group markers to suffix the test ids
    (``...::test@ray``), and a marker added after it is ignored without a word."""
    if "soak" not in (config.getoption("markexpr") or ""):
        skip = [item for item in items if item.get_closest_marker("soak")]
        if skip:
            config.hook.pytest_deselected(items=skip)
            items[:] = [item for item in items if not item.get_closest_marker("soak")]
    for item in items:
        if _group(item):
            item.add_marker(pytest.mark.xdist_group(_group(item)))


@pytest.fixture(autouse=True)
def _no_ray_outside_the_groups(request):
    """Under xdist, a test outside the Ray groups must not start a Ray: it would run beside the groups'.
    A test of a group must carry it in its id, or xdist spreads the group over both workers."""
    group = _group(request.node)
    if group and getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith(f"@{group}"), (
            f"{request.node.nodeid}: not in xdist group {group!r}; pytest-xdist ignored the marker")
    if not os.environ.get("PYTEST_XDIST_WORKER") or group:
        yield
        return
    sessions = lambda: {*_tmp.glob("ray/session_2*"), *_tmp.glob("*/ray/session_2*")}  # noqa: E731
    before = sessions()
    yield
    started = sessions() - before
    assert not started, (f"{request.node.nodeid} started a Ray ({sorted(started)[0]}): add it to "
                         "RAY_MODULES or RAY_TESTS in tests/conftest.py")


FIGURES: list[str] = []


def pytest_runtest_logreport(report):
    """Figures a test reports with ``record_figure`` (they travel from xdist workers with the report)."""
    if report.when == "call":
        FIGURES.extend(v for k, v in report.user_properties if k == "figure")


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture
def record_figure(record_property):
    """``record_figure("CHAOS faults=12 ...")``: printed in the session's summary, also under xdist."""
    return lambda line: (print(line, flush=True), record_property("figure", line))
