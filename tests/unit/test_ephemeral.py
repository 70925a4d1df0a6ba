"""The early temporary Prefect server: same command as Prefect's, clear errors, no heartbeats.

No real server boots here (that is tests/integration/test_cli_ephemeral.py); the server
process is replaced by tiny Python commands that exit or hang.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import get_current_settings, temporary_settings

from flows import ephemeral
from flows.cli import _run_flow
from flows.ephemeral import EarlyServer, EphemeralServerError


@pytest.fixture
def no_temporary_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process-wide state as the CLI sees it: no API URL, no temporary server running yet."""
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})
    with temporary_settings(updates={"api.url": None, "server.ephemeral.enabled": True}):
        yield


def _fake_server(monkeypatch: pytest.MonkeyPatch, code: str, timeout_s: float = 20) -> EarlyServer:
    monkeypatch.setattr(ephemeral, "uvicorn_command", lambda port: [sys.executable, "-c", code])
    return EarlyServer(env={}, startup_timeout_s=timeout_s)


def test_command_and_environment_are_prefects_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails when a Prefect upgrade changes how it starts its temporary server."""
    seen: dict[str, Any] = {}

    def record(args: list[str], env: dict[str, str]) -> None:
        seen.update(args=args, env=env)

    monkeypatch.setattr(subprocess, "Popen", record)
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})
    SubprocessASGIServer(port=8123)._run_uvicorn_command()
    assert seen["args"] == ephemeral.uvicorn_command(8123)
    assert seen["env"] == ephemeral.server_environment(get_current_settings())
    assert SubprocessASGIServer._port_range == ephemeral.PORTS


@pytest.mark.usefixtures("no_temporary_server")
def test_no_early_server_when_a_server_is_configured_or_ephemeral_mode_is_off() -> None:
    with temporary_settings(updates={"api.url": "http://127.0.0.1:9/api"}):
        assert ephemeral.start_early() is None
    with temporary_settings(updates={"server.ephemeral.enabled": False}):
        assert ephemeral.start_early() is None


@pytest.mark.usefixtures("no_temporary_server")
def test_a_server_that_exits_gives_a_clear_error_and_stays_unadopted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    early = _fake_server(monkeypatch, "import sys; sys.exit(1)")
    with pytest.raises(EphemeralServerError, match="exited with code 1 before it answered"):
        early.adopt()
    assert not SubprocessASGIServer().running
    assert not early.adopted


@pytest.mark.usefixtures("no_temporary_server")
def test_a_lost_port_race_respawns_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    early = _fake_server(monkeypatch, "import sys; sys.exit(3)")  # uvicorn: could not start
    with pytest.raises(EphemeralServerError, match=r"code 3 .* 3 restart\(s\)"):
        early.adopt()


@pytest.mark.usefixtures("no_temporary_server")
def test_a_server_that_never_answers_times_out_and_is_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    early = _fake_server(monkeypatch, "import time; time.sleep(60)", timeout_s=0.3)
    with pytest.raises(EphemeralServerError, match=r"did not answer within 0\.3 s"):
        early.adopt()
    assert early.process.wait(timeout=5) is not None


@pytest.mark.usefixtures("no_temporary_server")
def test_heartbeats_off_only_for_a_temporary_server_without_an_explicit_frequency() -> None:
    with ephemeral.no_heartbeats_on_temporary_server() as off:
        assert off and get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency is not None
    explicit = temporary_settings(updates={"flows.heartbeat_frequency": 60})
    with explicit, ephemeral.no_heartbeats_on_temporary_server() as off:
        assert not off and get_current_settings().flows.heartbeat_frequency == 60
    configured = temporary_settings(updates={"api.url": "http://127.0.0.1:9/api"})
    with configured, ephemeral.no_heartbeats_on_temporary_server() as off:
        assert not off and get_current_settings().flows.heartbeat_frequency is not None


@pytest.mark.usefixtures("no_temporary_server")
def test_run_flow_hands_the_server_to_prefect_before_the_flow_runs() -> None:
    order: list[str] = []

    class Server:
        def adopt(self) -> None:
            order.append("adopt")

    class Done:
        def is_completed(self) -> bool:
            return True

        def result(self) -> str:
            return "summary"

    def flow_fn(params: object, return_state: bool) -> Done:
        order.append(f"flow heartbeat={get_current_settings().flows.heartbeat_frequency}")
        return Done()

    assert _run_flow("tag", flow_fn, None, Server()) == "summary"
    assert order == ["adopt", "flow heartbeat=None"]


@pytest.mark.usefixtures("no_temporary_server")
def test_run_flow_does_not_start_the_flow_when_the_server_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    early = _fake_server(monkeypatch, "import sys; sys.exit(1)")

    def flow_fn(params: object, return_state: bool) -> None:
        raise AssertionError("the flow must not run without its server")

    with pytest.raises(EphemeralServerError):
        _run_flow("tag", flow_fn, None, early)


_PARENT = """
import sys, time
from flows import ephemeral
ephemeral.uvicorn_command = lambda port: [sys.executable, "-c", "import time; time.sleep(300)"]
server = ephemeral.EarlyServer(env={}, startup_timeout_s=60)
print(server.process.pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_server_stops_when_the_cli_is_killed_without_cleanup(tmp_path: Any) -> None:
    import os
    import signal
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], cwd=repo, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(repo)}, text=True)  # fmt: skip
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.kill()  # SIGKILL: no atexit, no finally, nothing of ours runs
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the temporary server outlived the killed CLI"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_no_parent_death_hook_off_the_main_thread() -> None:
    import threading

    hooks: list[Any] = []
    worker = threading.Thread(target=lambda: hooks.append(ephemeral.parent_death_hook()))
    worker.start()
    worker.join()
    assert hooks == [None]  # the kernel would stop the child when this thread ended
    assert (ephemeral.parent_death_hook() is not None) == sys.platform.startswith("linux")
