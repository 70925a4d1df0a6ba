"""Helpers of the end-to-end tests: a real Prefect server, CLI and worker as subprocesses.

Why subprocesses and not `prefect_test_harness`: the point of these tests is what a user runs —
`prefect server start`, `prefect deploy`, `prefect worker start`, `prefect deployment run` —
talking HTTP to each other, with flow runs executed by a worker from the deployed code.
Each process gets its own session (process group), so teardown can stop it and everything it
spawned without touching any other process on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
TEST_OUTPUT = REPO_ROOT / "test-output" / "e2e"
# The CLI of the interpreter running the tests, whatever is on PATH.
PREFECT_CMD = (sys.executable, "-m", "prefect")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# Telemetry off and no network look-ups: the server otherwise contacts a telemetry host.
QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLI_PROMPT": "false",
    "PREFECT_CLI_COLORS": "false",
    "PREFECT_CLI_WRAP_LINES": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
    "MPLBACKEND": "Agg",
    "PYTHONUNBUFFERED": "1",
}


def tail(path: Path, n_chars: int = 4000) -> str:
    """The end of a log file, for assertion messages that say why a process failed."""
    if not path.exists():
        return f"<{path} does not exist>"
    return path.read_text(errors="replace")[-n_chars:]


def stop_process_group(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM the process group started for `proc`, then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


def base_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment minus any Prefect profile or API settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(QUIET_ENV)
    env.update(extra)
    return env


@dataclass
class PrefectStack:
    """A running Prefect server and the processes and CLI calls the tests start against it."""

    root: Path
    port: int
    env: dict[str, str]
    server: subprocess.Popen[bytes] | None = None
    workers: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def server_log(self) -> Path:
        return self.root / "server.log"

    def start_server(self, timeout_s: float = 180.0) -> None:
        with self.server_log.open("wb") as log:
            self.server = subprocess.Popen(
                [
                    *PREFECT_CMD,
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=self.env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_healthy(timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        assert self.server is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(
                    f"prefect server exited with {self.server.returncode}:\n{tail(self.server_log)}"
                )
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"prefect server not healthy after {timeout_s:.0f} s:\n{tail(self.server_log)}"
        )

    def cli(
        self,
        *args: str,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `prefect <args>` against this server; a non-zero exit fails with its output."""
        proc = subprocess.run(
            [*PREFECT_CMD, *args],
            cwd=cwd or REPO_ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"`prefect {' '.join(args)}` exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
            )
        return proc

    def start_worker(self, pool: str, env: Mapping[str, str], name: str = "e2e-worker") -> Path:
        log_path = self.root / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    *PREFECT_CMD,
                    "worker",
                    "start",
                    "--pool",
                    pool,
                    "--type",
                    "process",
                    "--name",
                    name,
                    "--limit",
                    "1",
                ],
                env={**self.env, **env},
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append((proc, log_path))
        return log_path

    def client(self) -> Any:
        """A sync client bound to this server (not to whatever the test process has set)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def wait_for_flow_run(self, flow_run_id: UUID, timeout_s: float) -> Any:
        """Poll until the run is terminal; on timeout say which state it is stuck in."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                run = client.read_flow_run(flow_run_id)
                if run.state is not None and run.state.type.value in TERMINAL_STATES:
                    return run
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"flow run {flow_run_id} still {run.state and run.state.name} after "
                        f"{timeout_s:.0f} s\n{self.worker_logs()}"
                    )
                self._check_workers_alive()
                time.sleep(1.0)

    def _check_workers_alive(self) -> None:
        for proc, log_path in self.workers:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{tail(log_path)}")

    def worker_logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{tail(path)}" for _, path in self.workers)

    def stop(self) -> None:
        for proc, _ in self.workers:
            stop_process_group(proc)
        if self.server is not None:
            stop_process_group(self.server)

    def keep_logs(self, dest: Path) -> None:
        """Copy the logs next to the screenshot so a failed CI run can be read afterwards."""
        dest.mkdir(parents=True, exist_ok=True)
        for path in [self.server_log, *(p for _, p in self.workers)]:
            if path.exists():
                shutil.copyfile(path, dest / path.name)


# ---------------------------------------------------------------------------------------------
# Headless Chromium (Debian's `chromium` package)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,900",
    "--virtual-time-budget=15000",
)


def run_chromium(
    binary: Path, url: str, profile_dir: Path, extra: Sequence[str], timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """One headless Chromium call on `url`; its own profile dir and process group."""
    proc = subprocess.run(
        [str(binary), *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", *extra, url],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        start_new_session=True,
    )
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited {proc.returncode} on {url}:\n{proc.stderr[-3000:]}")
    return proc
