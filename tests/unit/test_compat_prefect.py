"""Canaries for the Prefect internals in flows/_compat_prefect.py.

They fail on a Prefect the internals were not verified for, and when an internal no longer
does what the project relies on; re-verify (and re-measure the justification written next to
each) before moving the pin in requirements.txt.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import prefect
import pytest

from flows import _compat_prefect

REPO = Path(__file__).resolve().parents[2]


def test_prefect_is_the_version_the_internals_were_verified_for() -> None:
    assert prefect.__version__ == _compat_prefect.VERIFIED_PREFECT, (
        f"Prefect {prefect.__version__} is installed; flows/_compat_prefect.py was verified "
        f"for {_compat_prefect.VERIFIED_PREFECT}: re-check each internal, then update it"
    )


def test_refresh_makes_an_api_url_set_after_import_every_threads_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    import prefect.context

    monkeypatch.setattr(prefect.context, "GLOBAL_SETTINGS_CONTEXT",
                        prefect.context.GLOBAL_SETTINGS_CONTEXT)  # fmt: skip
    url = "http://127.0.0.1:9/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    _compat_prefect.refresh_process_settings()
    seen: list[str | None] = []

    def read() -> None:  # a fresh thread has no context: it reads the process-wide settings
        seen.append(prefect.context.get_settings_context().settings.api.url)

    worker = threading.Thread(target=read)
    worker.start()
    worker.join()
    assert seen == [url]


def test_temporary_server_running_reads_prefects_own_server_without_importing_it() -> None:
    code = (
        "import sys; from flows import _compat_prefect as c; "
        "before = c.temporary_server_running(); "
        "loaded = 'prefect.server.api.server' in sys.modules; "
        "from prefect.server.api.server import SubprocessASGIServer as S; "
        "idle = c.temporary_server_running(); S().running = True; "
        "print(before, loaded, idle, c.temporary_server_running())"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "False", "True"]


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, _SCOPES))]
    return {
        id(n.body[0].value)
        for n in nodes
        if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
    }


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_PRIVATE_NAMES = {
    "refresh_global_settings_context",
    "SubprocessASGIServer",
    "_send_heartbeats",
    "_run_uvicorn_command",
}


def _private_uses(path: Path) -> list[str]:
    """Names, attributes, imports and strings (not docstrings) that touch Prefect internals."""
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prefect"):
            names = [a.name for a in node.names] + (node.module or "").split(".")
        elif isinstance(node, ast.Import):
            names = [
                p for a in node.names if a.name.startswith("prefect") for p in a.name.split(".")
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = ["PREFECT__"] if "PREFECT__" in node.value and id(node) not in docs else []
        bad = [n for n in names if n in _PRIVATE_NAMES or n == "PREFECT__"]
        if isinstance(node, ast.ImportFrom | ast.Import):
            bad += [n for n in names if n.startswith("_") and n != "__future__"]
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in bad]
    return found


def test_no_other_prefect_internal_is_used_outside_the_compat_module() -> None:
    """Every private Prefect name the project touches is fenced in flows/_compat_prefect.py."""
    offenders = [
        use
        for folder in ("multitag", "tasks", "flows")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path.name != "_compat_prefect.py"
        for use in _private_uses(path)
    ]
    assert offenders == []
    fenced = _private_uses(REPO / "flows" / "_compat_prefect.py")
    # the scan sees what it must fence: the import and call of one internal, one more's use
    assert len(fenced) == 3, fenced
