"""Shared test set-up: offline, quiet, CPU-friendly, never touching the user's ~/.multitag."""

from __future__ import annotations

import os
import sys

# Before anything imports torch or prefect (pytest imports conftest first).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Each test gets its own MULTITAG_HOME so no test reads another's models or datasets."""
    home = tmp_path_factory.mktemp("multitag-home")
    monkeypatch.setenv("MULTITAG_HOME", str(home))
    monkeypatch.setenv("MULTITAG_CACHE_DIR", str(tmp_path_factory.mktemp("multitag-cache")))
    monkeypatch.setenv("MULTITAG_STAGING", str(tmp_path_factory.mktemp("multitag-staging")))
    return home


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where torch sees a CUDA device."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible to torch)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """One Prefect ephemeral server (SQLite in a temp PREFECT_HOME) for all flow tests.

    Session-wide because starting it costs 10-15 s here; heartbeats off (they add ~1 s a run).
    """
    prefect_home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(prefect_home)
    # Prefect configures its console log handler when `prefect.main` is first imported, on
    # the sys.stderr of that moment: here, not inside a test whose capsys stream closes.
    import prefect.main  # noqa: F401
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
        _drain_prefect_workers(timeout_s=20)


def _drain_prefect_workers(timeout_s: float) -> None:
    """Stop Prefect's log and event workers, waiting at most `timeout_s` for each kind.

    Why: `prefect_test_harness` drains them on exit with no timeout, and a worker whose event
    loop is gone never answers: the whole suite (all tests passed) hung in that drain, twice,
    after the e2e and integration modules that run flows in this process against servers
    they stop. Draining here first, bounded, removes every worker, so the harness's own
    drain has nothing left to wait for.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit once the results are reported, even if a Prefect worker is still sending.

    Why: each Prefect events/log worker drains at interpreter exit with no timeout, and one
    holding a run's events for a server a test has already stopped retries them one by one
    (seen: 1,035 events, the process alive long after "838 passed"). Those events belong to
    finished tests, so such workers are named on stderr and the process exits with pytest's
    own status instead of waiting; with none left, exit is the normal one.
    """
    stuck = _unfinished_prefect_workers(wait_s=10.0)
    if not stuck:
        return
    sys.stderr.write(
        "tests/conftest.py: not waiting for Prefect workers still sending to stopped servers: "
        f"{stuck}\n"
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1] if _EXIT_STATUS else 1)


def _unfinished_prefect_workers(wait_s: float) -> list[str]:
    """Prefect queue workers (events, logs) started in this process and not yet done."""
    if "prefect" not in sys.modules:
        return []
    import gc
    import time

    from prefect._internal.concurrency.services import _QueueServiceBase
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=wait_s)  # healthy ones finish here; stuck ones stay
    EventsWorker.drain_all(timeout=wait_s)
    deadline = time.monotonic() + wait_s
    while True:
        stuck = [
            f"{type(o).__name__}({o._queue.qsize()} queued)"
            for o in gc.get_objects()
            if isinstance(o, _QueueServiceBase)
            and o._done_event is not None
            and not o._done_event.is_set()
        ]
        if not stuck or time.monotonic() > deadline:
            return stuck
        time.sleep(0.5)
