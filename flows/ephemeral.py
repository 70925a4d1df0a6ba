"""Prefect's temporary API server for one CLI process: started early, heartbeats off.

Why start it ourselves: with no PREFECT_API_URL, Prefect starts a temporary server (a uvicorn
subprocess, ~3.5 s to boot here) only when the first flow needs the API, which is after this
process has imported `prefect.server` (~1.5 s) just to reach `SubprocessASGIServer`. Spawning
the same subprocess before those imports lets it boot on the other core meanwhile (measured on
2 cores: the flow starts ~1.2 s sooner). `EarlyServer.adopt` then installs it as Prefect's own
singleton `SubprocessASGIServer()` (as `prefect_test_harness` does), the one `get_client`, the
log worker and the events worker look up, so every call reaches it exactly as before,
PREFECT_API_URL stays unset, and Prefect's own atexit `stop()` shuts it down after the log and
event workers have drained.

The command and environment copy `SubprocessASGIServer._run_uvicorn_command` of the pinned
Prefect (3.9.1); tests/unit/test_ephemeral.py fails if a Prefect upgrade changes them.

Why it dies with this process: Prefect's own temporary server is a plain child process, so a
CLI killed by SIGKILL (the OOM killer, `kill -9`, a scheduler's hard timeout) leaves it
running forever, holding a port and ~200 MB. On Linux the early server asks the kernel for
SIGTERM when its parent dies (PR_SET_PDEATHSIG), so uvicorn shuts down cleanly instead.

Why no heartbeats on it: each flow run's heartbeat thread sleeps in 1 s steps and the engine
joins it when the run ends (~0.5-1 s per flow run, two per `multitag tag`). Heartbeats let a
server notice a flow process that died; a temporary server lives and dies with that process.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
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

# Environment Prefect gives its temporary server (no UI, ephemeral services only).
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
PORTS = range(8000, 9000)  # Prefect's own range for temporary servers
_STARTUP_FAILURE = 3  # uvicorn's exit code when it could not start (e.g. the port was taken)
_MAX_RESPAWNS = 3


class EphemeralServerError(RuntimeError):
    """The temporary Prefect server started for this run did not come up."""


def uvicorn_command(port: int) -> list[str]:
    """The exact command Prefect runs for its temporary server on `port`."""
    import prefect

    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(prefect.__module_path__.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
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


def _already_running() -> bool:
    """True if this process already has Prefect's temporary server (e.g. a second command)."""
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:
        return False
    return bool(server_module.SubprocessASGIServer().running)


class EarlyServer:
    """A temporary Prefect server spawned by this process and not yet handed to Prefect."""

    def __init__(self, env: dict[str, str], startup_timeout_s: float) -> None:
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
                uvicorn_command(self.port), env=self.env, preexec_fn=parent_death_hook()
            )
        except OSError as e:
            raise EphemeralServerError(
                f"could not start the temporary Prefect server ({e}); "
                "set PREFECT_API_URL to a running server instead"
            ) from e

    def stop(self) -> None:
        """Until adopted the server is ours to stop, e.g. when the CLI fails before its flow."""
        if self.adopted or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def adopt(self) -> None:
        """Wait until the server answers, then make it Prefect's temporary server."""
        from prefect.server.api.server import SubprocessASGIServer, subprocess_server_logger

        server = SubprocessASGIServer()
        if server.running:
            self.stop()
            raise EphemeralServerError(
                f"Prefect already runs a temporary server on {server.address} in this process; "
                "the one started early for this command was stopped"
            )
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        subprocess_server_logger.info(
            f"Using temporary server on http://127.0.0.1:{self.port}, started while multitag "
            "loaded\nSee https://www.prefect.io/docs/v3/concepts/server#how-to-guides "
            "for more information on running a dedicated Prefect server."
        )
        server.port = self.port
        server.server_process = self.process
        server.running = True
        self.adopted = True
        atexit.unregister(self.stop)
        atexit.register(server.stop)

    def _wait_until_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        respawns = 0
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.process.poll()
                if code == _STARTUP_FAILURE and respawns < _MAX_RESPAWNS:
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
                        f"{self.startup_timeout_s:g} s; raise "
                        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a slow or busy "
                        "machine, or set PREFECT_API_URL to a running server"
                    )
                time.sleep(0.1)


def start_early() -> EarlyServer | None:
    """Spawn the temporary server now if this process's first flow would start one anyway.

    Call it as soon as the CLI's environment is final (settings are read here) and before the
    heavy imports; call `adopt()` on the result before the first flow. None: a server is
    configured (PREFECT_API_URL), ephemeral mode is off, or this process already has one.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled or _already_running():
        return None
    startup_timeout_s = float(settings.server.ephemeral.startup_timeout_seconds)
    return EarlyServer(server_environment(settings), startup_timeout_s)


def server_environment(settings: Any) -> dict[str, str]:
    """The environment Prefect gives its temporary server: ours, its flags, these settings."""
    return {
        **os.environ,
        **SERVER_ENV,
        **settings.to_environment_variables(exclude_unset=True),
    }


def _heartbeats_are_useless(settings: Any) -> bool:
    """Temporary server, and the user did not ask for a heartbeat frequency."""
    return (
        not settings.api.url
        and settings.server.ephemeral.enabled
        and "heartbeat_frequency" not in settings.flows.model_fields_set
    )


@contextmanager
def no_heartbeats_on_temporary_server() -> Iterator[bool]:
    """Run flows without heartbeat threads when their server ends with this process.

    Yields whether heartbeats were turned off. An explicit PREFECT_FLOWS_HEARTBEAT_FREQUENCY
    or a configured PREFECT_API_URL (a server that outlives the run) keeps them.
    """
    from prefect.settings import get_current_settings, temporary_settings

    if not _heartbeats_are_useless(get_current_settings()):
        yield False
        return
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield True
