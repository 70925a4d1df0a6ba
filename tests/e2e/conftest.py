"""Fixtures of the end-to-end tests: a Prefect server per module, Chromium per session."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import TEST_OUTPUT, PrefectStack, base_env, tail
from tests.local_servers import free_port


def _apt_install_chromium(log: Path) -> None:
    """Install Debian's chromium; refresh the package lists only if the first try fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "chromium"]
    with log.open("ab") as out:
        if subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode == 0:
            return
        subprocess.run(["apt-get", "update"], env=env, stdout=out, stderr=subprocess.STDOUT)
        subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    """A fresh `prefect server start` on a free port, its own PREFECT_HOME and SQLite file."""
    root = tmp_path_factory.mktemp("prefect-e2e")
    port = free_port()
    env = base_env(
        {
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Deployments carry a weekly cron; the scheduler would pre-create runs of it that a
            # worker might race for. The schedule itself is still stored and checked.
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
    )
    stack = PrefectStack(root=root, port=port, env=env)
    try:
        stack.start_server()
        yield stack
    finally:
        stack.stop()
        stack.keep_logs(TEST_OUTPUT / "logs")


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a chromium binary, installed with apt-get when the machine has none."""
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if found is None:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.fail(
                "the e2e UI check needs Debian's `chromium` package: install it "
                "(`apt-get install -y chromium`) or run the tests as root on Debian/Ubuntu"
            )
        log = tmp_path_factory.mktemp("chromium-install") / "apt.log"
        _apt_install_chromium(log)
        found = shutil.which("chromium")
        if found is None:
            pytest.fail(f"`apt-get install chromium` did not provide a binary:\n{tail(log)}")
    return Path(found)
