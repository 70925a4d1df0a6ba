"""The early temporary Prefect server: Prefect's public command, clear errors, no heartbeats.

No real server boots here (that is tests/integration/test_cli_ephemeral.py); the server
process is replaced by tiny Python commands that exit or hang.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prefect.main  # noqa: F401  (see below)
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


# `import prefect.main` above: Prefect binds its console log handler to the sys.stderr of the
# moment it is first imported. Imported first inside a test that captures stderr (`main(...)`
# under capsys below), the handler would write to a stream closed after that test, and every
# later flow in the session would fail on its first log line.


def _fake_server(monkeypatch: pytest.MonkeyPatch, code: str, timeout_s: float = 20) -> EarlyServer:
    monkeypatch.setattr(ephemeral, "server_command", lambda port: [sys.executable, "-c", code])
    return EarlyServer(env={}, startup_timeout_s=timeout_s)


_SERVICES = """
import json
from prefect.server.services.base import Service
from prefect.server.services.perpetual_services import get_enabled_perpetual_services
def perpetual(ephemeral):
    return sorted(c.function.__name__ for c in get_enabled_perpetual_services(ephemeral=ephemeral))
loops = sorted(s.__name__ for s in Service.enabled_services())
print(json.dumps([perpetual(False), perpetual(True), loops]))
"""


def test_the_public_server_runs_exactly_the_services_of_prefects_temporary_one(
    tmp_path: Any,
) -> None:
    """Fails when a Prefect upgrade adds a service its temporary server does not run:
    `prefect server start` with `child_environment` must run what Prefect's own temporary
    server runs, and no scheduler, late-run marker or other long-lived server's service."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)
    ours = {**env, **ephemeral.SERVER_ENV}
    out = subprocess.run([sys.executable, "-c", _SERVICES], env=ours, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    full_server, temporary_server, loop_services = json.loads(out.stdout.splitlines()[-1])
    assert full_server == temporary_server and "schedule_deployments" not in full_server
    assert {"EventPersister", "TaskRunRecorder"} <= set(loop_services)
    cmd = ephemeral.server_command(8123)
    assert cmd[:5] == [sys.executable, "-m", "prefect", "server", "start"]
    assert cmd[cmd.index("--port") + 1] == "8123" and "--no-ui" in cmd
    assert SubprocessASGIServer._port_range == ephemeral.PORTS


_RESOLVE = """
import json, os
from prefect.settings import Settings
first = Settings()
os.environ.update(first.to_environment_variables(exclude_unset=True))
again = Settings()
print(json.dumps([first.model_dump(mode="json") == again.model_dump(mode="json"),
                  first.server.database.timeout, first.server.ephemeral.enabled]))
"""


def test_the_server_resolves_the_settings_prefect_would_have_passed_it(tmp_path: Any) -> None:
    """`child_environment` leaves out Prefect's copy of its settings: the server reads the
    same profile itself, and gets exactly what the copy would have given it."""
    import json
    import os

    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "mine"\n[profiles.mine]\nPREFECT_API_DATABASE_TIMEOUT = "17.5"\n'
        'PREFECT_SERVER_ALLOW_EPHEMERAL_MODE = "true"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    env.update({k: v for k, v in ephemeral.SERVER_ENV.items()})
    out = subprocess.run([sys.executable, "-c", _RESOLVE], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == [True, 17.5, True]


def test_the_early_server_is_spawned_before_prefect_is_imported() -> None:
    code = (
        "import sys; from flows import ephemeral; "
        "ephemeral.server_command = lambda port: [sys.executable, '-c', 'pass']; "
        "s = ephemeral.start_early(); s.process.wait(); "
        "print(s is not None, 'prefect' in sys.modules)"
    )
    import os

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False"]


@pytest.mark.usefixtures("no_temporary_server")
def test_no_early_server_when_the_environment_configures_a_server_or_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert ephemeral.start_early() is None
    monkeypatch.delenv("PREFECT_API_URL")
    for switch in ("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "PREFECT_SERVER_EPHEMERAL_ENABLED"):
        with monkeypatch.context() as m:
            m.setenv(switch, "False")
            assert ephemeral.start_early() is None


@pytest.mark.usefixtures("no_temporary_server")
def test_a_server_configured_only_in_the_settings_stops_the_early_one_unused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    early = _fake_server(monkeypatch, "import time; time.sleep(60)")
    for updates in ({"api.url": "http://127.0.0.1:9/api"}, {"server.ephemeral.enabled": False}):
        with temporary_settings(updates=updates):
            assert early.adopt() is False
        assert early.process.wait(timeout=10) is not None and not early.adopted
        early = _fake_server(monkeypatch, "import time; time.sleep(60)")
    early.stop()


_HEALTHY = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/api/health" else 404); self.end_headers()
        self.wfile.write(b"true")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.mark.usefixtures("no_temporary_server")
def test_an_adopted_server_is_this_process_api_and_stops_at_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import prefect.context

    # adopt() replaces the process's settings; put back the test session's afterwards
    monkeypatch.setattr(prefect.context, "GLOBAL_SETTINGS_CONTEXT",
                        prefect.context.GLOBAL_SETTINGS_CONTEXT)  # fmt: skip
    monkeypatch.setenv("PREFECT_API_URL", "")  # recorded, so teardown removes adopt()'s value
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setattr(ephemeral, "server_command",
                        lambda port: [sys.executable, "-c", _HEALTHY, str(port)])  # fmt: skip
    early = EarlyServer(env=dict(__import__("os").environ), startup_timeout_s=30)
    try:
        assert early.adopt() is True
        assert __import__("os").environ["PREFECT_API_URL"] == early.api_url
        # every thread sees it: the process-global settings, not a context variable
        assert prefect.context.GLOBAL_SETTINGS_CONTEXT.settings.api.url == early.api_url
        with temporary_settings(updates={"api.url": early.api_url}):
            with ephemeral.no_heartbeats_on_temporary_server(ours=True) as off:
                assert off  # ours, although an API URL is set
            with ephemeral.no_heartbeats_on_temporary_server() as off:
                assert not off  # a configured server that outlives the run keeps them
        assert early.process.poll() is None  # running until this process exits
    finally:
        early.stop()
    assert early.process.poll() is not None


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
ephemeral.server_command = lambda port: [sys.executable, "-c", "import time; time.sleep(300)"]
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


def _refused_url() -> str:
    import socket

    with socket.socket() as s:  # a port that was just free: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variable: the API check connects directly (a proxy would skip it)."""
    for var in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


@pytest.mark.usefixtures("no_proxy")
def test_a_configured_api_that_refuses_or_does_not_resolve_is_reported_in_one_line() -> None:
    refused = _refused_url()
    with pytest.raises(ephemeral.ApiUnreachableError, match="connection refused") as e:
        ephemeral.check_configured_api(refused)
    assert refused in str(e.value) and "prefect server start" in str(e.value)
    with pytest.raises(ephemeral.ApiUnreachableError, match="does not resolve"):
        ephemeral.check_configured_api("http://no-such-host.invalid:4200/api")
    for bad in ("http://127.0.0.1:42oo/api", "http://127.0.0.1:99999/api"):
        with pytest.raises(ephemeral.ApiUnreachableError, match="not a valid URL") as e:
            ephemeral.check_configured_api(bad)
        assert bad in str(e.value) and "PREFECT_API_URL" in str(e.value)


def test_a_listening_api_no_api_or_a_proxy_is_left_to_prefect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        ephemeral.check_configured_api(f"http://127.0.0.1:{s.getsockname()[1]}/api")
    ephemeral.check_configured_api(None)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    ephemeral.check_configured_api(_refused_url())  # the proxy may reach what we cannot


@pytest.mark.usefixtures("no_proxy")
def test_tag_cli_with_an_unreachable_configured_api_fails_in_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    url = _refused_url()
    monkeypatch.setenv("PREFECT_API_URL", url)  # no early server is started either
    (tmp_path / "images").mkdir()
    out = tmp_path / "out"
    with temporary_settings(updates={"api.url": url}):
        rc = main(["tag", str(tmp_path / "images"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists()
    assert err.strip().splitlines() == [
        f"multitag tag: nothing answers at the Prefect API {url} (connection refused): start "
        "it (`prefect server start`), or unset PREFECT_API_URL to run on a temporary local "
        "server"
    ]
