"""Every use of a Prefect internal in this project, fenced, with why it earns its place.

Rule (issue 16): a private or undocumented Prefect API stays only if dropping it costs >= 10%
of a 10,000-image `multitag tag` run (60-125 s here: resnet18 at 80-170 img/s) or loses a
property users rely on. Each use below names the public path it was measured against.
tests/unit/test_compat_prefect.py fails on a Prefect other than `VERIFIED_PREFECT`, and checks
that each internal still behaves as relied on; re-verify both before changing the pin.

Dropped in issue 16 (public path measured, cost under the bar; benchmarks/RESULTS.md):
- a copy of `SubprocessASGIServer._run_uvicorn_command` and its private `PREFECT__SERVER_*`
  variables: the early server is now `prefect server start` (public CLI) with the services a
  temporary server does not run switched off by their public settings.
- patching `flow_engine._send_heartbeats` so a run against a configured server did not wait
  for its heartbeat thread: ~0.8-1.0 s per run, 1-2% of a 10,000-image run. Heartbeats on the
  temporary server are turned off with the public `flows.heartbeat_frequency` setting.

Importing this module imports nothing from Prefect: the CLI spawns its server before Prefect
is imported (~0.8 s), and `temporary_server_running` must not import it either.
"""

from __future__ import annotations

import sys

VERIFIED_PREFECT = "3.9.1"


def refresh_process_settings() -> None:
    """Make an environment variable set after `import prefect` (PREFECT_API_URL) the settings
    of every thread in this process.

    Internal: `prefect.context.refresh_global_settings_context` (not in Prefect's documented
    API). Public alternative measured: Prefect's own temporary server
    (`prefect.server.api.server.SubprocessASGIServer`), which Prefect finds by itself. Why it
    is kept: that server is a plain child process, so a CLI killed by SIGKILL (OOM killer,
    `kill -9`, a scheduler's hard timeout) leaves it running, holding a port and ~200 MB
    (tests/unit/test_ephemeral.py::test_the_server_stops_when_the_cli_is_killed_without_cleanup
    holds the property); it also boots only after Prefect and the model are imported, and
    importing its module costs ~2.3 CPU-s on the cores the tagger uses (2.7 CPU-s and 0.7 s
    wall more per `multitag tag`, measured when the early server replaced it).
    `temporary_settings` is not a substitute: it is a context variable, and Prefect's log,
    event and heartbeat threads read the process-wide settings.
    """
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


def temporary_server_running() -> bool:
    """Whether Prefect itself already runs its temporary server in this process.

    Internal: `SubprocessASGIServer().running` (undocumented). Read only when Prefect's server
    module is already imported: importing it would cost ~2.3 CPU-s. Why it is kept: without it
    a second command in one process (tests, notebooks) would start a second server while
    Prefect's own one is what its client uses, and the flow's records would land in the one
    the CLI does not report. No public API tells it.
    """
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:
        return False
    return bool(server_module.SubprocessASGIServer().running)
