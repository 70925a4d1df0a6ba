"""Prefect's temporary API server for one CLI process: started early, heartbeats off.

Why start it ourselves: with no PREFECT_API_URL, Prefect starts a temporary server (a uvicorn
subprocess, ~3.5-4 s to boot here) only when the first flow needs the API, after this process
has imported everything else. Spawning the same subprocess first (before prefect, torch or the
model are even imported: the decision reads only the environment) lets it boot on the other
core meanwhile. `EarlyServer.adopt` then makes it this process's PREFECT_API_URL, so Prefect
talks to it as to any configured server; importing `prefect.server.api.server` to install it
as Prefect's own `SubprocessASGIServer` instead cost ~2.3 s of CPU in this process, on the
cores the server boots on (measured on 2 cores, with the compiled model that loads without
torch: 2.7 s less CPU and 0.7 s less wall per `multitag tag`).

The server is `prefect server start` (Prefect's public command; in the foreground it runs
uvicorn in its own process) with no UI and with the services Prefect's temporary server does
not run (scheduler, late runs, foreman, ...) switched off by their public settings. It reads
Prefect's settings from the same environment and profile files as this process
(tests/unit/test_ephemeral.py checks it). Against the copy of Prefect's private temporary-server
command it replaced it costs ~0.3 CPU-s more to boot (benchmarks/RESULTS.md, issue 16).

Why it dies with this process: Prefect's own temporary server is a plain child process, so a
CLI killed by SIGKILL (the OOM killer, `kill -9`, a scheduler's hard timeout) leaves it
running forever, holding a port and ~200 MB. On Linux the early server asks the kernel for
SIGTERM when its parent dies (PR_SET_PDEATHSIG), so uvicorn shuts down cleanly instead. On a
normal exit it is stopped by an atexit handler, which runs after Prefect's log and event
workers have drained (those are stopped at thread shutdown, before atexit handlers).

Why no heartbeats on it: each flow run's heartbeat thread sleeps in 1 s steps and the engine
joins it when the run ends (~0.5-1 s per flow run, two per `multitag tag`). Heartbeats let a
server notice a flow process that died; a temporary server lives and dies with that process.
With a configured server they stay on (and the run ends up to ~1 s after its last task).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from flows._compat_prefect import refresh_process_settings, temporary_server_running
from multitag.errors import RunFailedError

# Services Prefect's own temporary server does not run (Prefect 3.9.1: every perpetual service
# without `run_in_ephemeral`), off by their public settings: a server that lives for one run
# schedules, reschedules and cleans up nothing.
_EPHEMERAL_SERVICES_OFF = (
    "SCHEDULER",
    "LATE_RUNS",
    "FOREMAN",
    "CANCELLATION_CLEANUP",
    "PAUSE_EXPIRATIONS",
    "REPOSSESSOR",
    "CLEANUP_RECONCILER",
)
SERVER_ENV = {
    f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in _EPHEMERAL_SERVICES_OFF
}
PORTS = range(8000, 9000)  # Prefect's own range for temporary servers
_STARTUP_FAILURE = 3  # uvicorn's exit code when it could not start (e.g. the port was taken)
# (`prefect server start` itself exits 1 when the port is taken before uvicorn binds it)
_MAX_RESPAWNS = 3


class PrefectApiError(RunFailedError, RuntimeError):
    """No Prefect API to run the flow against; the CLI reports it in one line."""


class EphemeralServerError(PrefectApiError):
    """The temporary Prefect server started for this run did not come up."""


class ApiUnreachableError(PrefectApiError):
    """The configured Prefect API (PREFECT_API_URL) is malformed, refuses connections or has
    no address."""


def server_command(port: int) -> list[str]:
    """`prefect server start` on 127.0.0.1:`port`, without the UI, in the foreground.

    Run as `python -m prefect` of this interpreter, found without importing prefect (~0.8 s
    that would delay the spawn).
    """
    if importlib.util.find_spec("prefect") is None:
        raise EphemeralServerError("prefect is not installed in this environment")
    return [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-ui",
    ]


_PR_SET_PDEATHSIG = 1


def parent_death_hook() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get SIGTERM when this process dies; None if unusable.

    Only on Linux, and only from the main thread: the kernel ties the signal to the thread
    that forked, so a child spawned from a worker thread would be stopped when that thread
    ended. The hook calls a libc function resolved here, before the fork, and exits at once
    if the parent died between fork and prctl.
    """
    on_main_thread = threading.current_thread() is threading.main_thread()
    if not sys.platform.startswith("linux") or not on_main_thread:
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent is already gone: no signal will come
            os._exit(1)

    return hook


def free_port() -> int:
    """A port in Prefect's range that nothing listens on now (uvicorn may still lose a race)."""
    for _ in range(20):
        port = random.choice(PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise EphemeralServerError(
        f"no free port in {PORTS.start}-{PORTS.stop - 1} on 127.0.0.1 for the temporary Prefect "
        "server; free one or set PREFECT_API_URL to a running server"
    )


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class EarlyServer:
    """A temporary Prefect server spawned by this process and not yet handed to Prefect."""

    def __init__(self, env: dict[str, str], startup_timeout_s: float | None = None) -> None:
        """`startup_timeout_s` None: Prefect's setting, read when `adopt()` waits."""
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.process = self._spawn()
        self.adopted = False
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
                server_command(self.port),
                env=self.env,
                stdout=subprocess.DEVNULL,  # its welcome banner; errors go to stderr
                preexec_fn=parent_death_hook(),
            )
        except OSError as e:
            raise EphemeralServerError(
                f"could not start the temporary Prefect server ({e}); "
                "set PREFECT_API_URL to a running server instead"
            ) from e

    def stop(self) -> None:
        """Stop the server (atexit: after Prefect's log and event workers have drained)."""
        if self.process.poll() is not None:
            return
        if self.adopted:
            logging.getLogger("prefect").info(f"Stopping temporary server on {self.address}")
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def adopt(self) -> bool:
        """Wait until the server answers, then point this process's Prefect at it.

        It becomes PREFECT_API_URL for this process (and the processes it starts, e.g. Dask
        workers), so the client, the log worker and the events worker use it as they would a
        configured server. Why not install it as Prefect's own `SubprocessASGIServer`: every
        one of those looks that class up in `prefect.server.api.server`, and importing that
        module costs ~2.3 s of CPU, on the cores the server is booting on.

        False (and the server stopped) when Prefect's settings, now read in full, configure a
        server or turn ephemeral mode off: a profile or prefect.toml that `start_early` could
        not see without importing prefect.
        """
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        if settings.api.url or not settings.server.ephemeral.enabled:
            self.stop()
            return False
        if self.startup_timeout_s is None:
            self.startup_timeout_s = float(settings.server.ephemeral.startup_timeout_seconds)
        if temporary_server_running():
            self.stop()
            raise EphemeralServerError(
                "Prefect already runs a temporary server in this process; "
                "the one started early for this command was stopped"
            )
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        logging.getLogger("prefect").info(
            f"Using temporary server on {self.address}, started while multitag "
            "loaded\nSee https://www.prefect.io/docs/v3/concepts/server#how-to-guides "
            "for more information on running a dedicated Prefect server."
        )
        os.environ["PREFECT_API_URL"] = self.api_url
        refresh_process_settings()
        self.adopted = True
        return True

    def _wait_until_healthy(self) -> None:
        import httpx

        timeout_s = self.startup_timeout_s or 0.0
        deadline = time.monotonic() + timeout_s
        respawns = 0
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.process.poll()
                lost_port = code == _STARTUP_FAILURE or (code == 1 and _port_taken(self.port))
                if lost_port and respawns < _MAX_RESPAWNS:
                    respawns += 1  # most likely the port was taken after free_port chose it
                    self.port = free_port()
                    self.process = self._spawn()
                    continue
                if code is not None:
                    raise EphemeralServerError(
                        f"the temporary Prefect server exited with code {code} before it "
                        f"answered (port {self.port}, {respawns} restart(s)); its error is "
                        "printed above. Fix it or set PREFECT_API_URL to a running server."
                    )
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() >= deadline:
                    raise EphemeralServerError(
                        f"the temporary Prefect server on port {self.port} did not answer within "
                        f"{timeout_s:g} s; raise "
                        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a slow or busy "
                        "machine, or set PREFECT_API_URL to a running server"
                    )
                time.sleep(0.1)


def start_early() -> EarlyServer | None:
    """Spawn the temporary server now if this process's first flow may start one.

    Call it as soon as the CLI's environment is final and before the heavy imports; call
    `adopt()` on the result before the first flow. Decided from the environment alone: reading
    Prefect's settings means importing prefect (~0.8 s here), which would delay the server's
    boot by as much. None: PREFECT_API_URL is set, ephemeral mode is turned off in the
    environment, or this process already has a temporary server. A server or ephemeral mode
    configured only in a profile or prefect.toml is seen by `adopt()`, which then stops the
    server unused.
    """
    if (
        os.environ.get("PREFECT_API_URL")
        or _ephemeral_off_in_environment()
        or temporary_server_running()
    ):
        return None
    return EarlyServer(child_environment())


_EPHEMERAL_SWITCHES = ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE")
_FALSE = {"0", "false", "f", "no", "n", "off"}  # what pydantic reads as False


def _ephemeral_off_in_environment() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _FALSE for k in _EPHEMERAL_SWITCHES)


def child_environment() -> dict[str, str]:
    """This process's environment with the services a temporary server does not run off.

    Prefect, for its own temporary server, also copies its resolved settings into the
    server's environment (`settings.to_environment_variables(exclude_unset=True)`) so that
    settings changed inside the parent process reach the server. The CLI changes none before
    the spawn, and the child resolves the same settings itself from the same environment,
    profile files and working directory (tests/unit/test_ephemeral.py checks it), so nothing
    is lost by not importing prefect here.
    """
    return {**os.environ, **SERVER_ENV}


def _heartbeats_are_useless(settings: Any, ours: bool) -> bool:
    """Temporary server, and the user did not ask for a heartbeat frequency."""
    temporary = ours or (not settings.api.url and settings.server.ephemeral.enabled)
    return temporary and "heartbeat_frequency" not in settings.flows.model_fields_set


@contextmanager
def no_heartbeats_on_temporary_server(ours: bool = False) -> Iterator[bool]:
    """Run flows without heartbeat threads when their server ends with this process.

    `ours`: the API is this process's adopted early server (PREFECT_API_URL then points at it,
    so the settings alone cannot tell it from a server that outlives the run). Yields whether
    heartbeats were turned off. An explicit PREFECT_FLOWS_HEARTBEAT_FREQUENCY or a configured
    PREFECT_API_URL (a server that outlives the run) keeps them.
    """
    from prefect.settings import get_current_settings, temporary_settings

    if not _heartbeats_are_useless(get_current_settings(), ours):
        yield False
        return
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield True


_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def check_configured_api(api_url: str | None) -> None:
    """Fail before the flow starts when the configured API cannot be connected to at all.

    Why: Prefect reports it from deep inside its flow engine, as a 40-line traceback that
    ends in "Failed to reach API", after the model has loaded. Only what is certain is
    reported here: nothing listens on the port, or the host name does not resolve. A slow
    server, any HTTP answer (Prefect Cloud answers 401 without a key), TLS settings and
    proxies (when a proxy variable is set, nothing is checked) are left to Prefect's client.
    """
    if not api_url or any(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARIABLES):
        return
    local = "unset PREFECT_API_URL to run on a temporary local server"
    try:
        parts = urlsplit(api_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:  # a bad port or IPv6 literal: Prefect fails on it too, later
        raise ApiUnreachableError(
            f"the Prefect API URL {api_url!r} is not a valid URL ({e}): fix PREFECT_API_URL, "
            f"or {local}"
        ) from None
    if not parts.hostname:
        return
    hint = f"start it (`prefect server start`), or {local}"
    try:
        with socket.create_connection((parts.hostname, port), timeout=5):
            return
    except ConnectionRefusedError:
        raise ApiUnreachableError(
            f"nothing answers at the Prefect API {api_url} (connection refused): {hint}"
        ) from None
    except socket.gaierror as e:
        raise ApiUnreachableError(
            f"the Prefect API's host {parts.hostname!r} ({api_url}) does not resolve "
            f"({e.strerror}): check PREFECT_API_URL, or {local}"
        ) from None
    except OSError:  # timeouts, unreachable networks: Prefect's client retries and reports
        return
