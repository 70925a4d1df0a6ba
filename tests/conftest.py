"""Shared test set-up: offline, quiet, CPU-friendly, never touching the user's ~/.multitag."""

from __future__ import annotations

import os

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
