"""`multitag tag` with no PREFECT_API_URL: one temporary server, started early, nothing lost.

Each test runs the CLI in a fresh process with its own PREFECT_HOME, so the temporary server
(and its SQLite database) is the one a user gets on a laptop.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tagging_helpers import TinyModel, register_tiny_model, write_images

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-model-ephemeral")
    return register_tiny_model(root / "home", root / "work")


def _run_tag(tiny: TinyModel, tmp_path: Path, pythonpath: str) -> subprocess.CompletedProcess:
    src = tmp_path / "imgs"
    write_images(src, 24, seed=11)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        MULTITAG_HOME=str(tiny.home), PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=pythonpath
    )
    cmd = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]
    cmd += ["tag", str(src), "--out", str(tmp_path / "out"), "--shard-size", "8"]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_tag_runs_on_one_early_server_and_its_records_are_complete(
    tiny: TinyModel, tmp_path: Path
) -> None:
    done = _run_tag(tiny, tmp_path, str(REPO))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "tagged 24, failed 0" in done.stdout
    # The early server ran the flow; Prefect found it and did not start one of its own.
    assert output.count("Using temporary server on http://127.0.0.1:") == 1, output
    assert "Starting temporary server" not in output, output

    db = sqlite3.connect(f"file:{tmp_path / 'prefect' / 'prefect.db'}?mode=ro", uri=True)
    flows = dict(db.execute("select name, state_type from flow_run").fetchall())
    assert flows == {"tag-imgs": "COMPLETED"}, flows  # shards run in it: no subflow on threads
    tasks = db.execute("select name, state_type from task_run").fetchall()
    assert {state for _, state in tasks} == {"COMPLETED"}, tasks
    assert sum(name.startswith("tag-shard-0") for name, _ in tasks) == 3
    # What the head start tagged while the server booted was written by the first shard only.
    manifest = json.loads(next((tmp_path / "out").glob("*/_manifests/*.json")).read_text())
    head = [shard["n_head_start"] for shard in manifest["shards"]]
    assert head[1:] == [0, 0] and 0 <= head[0] <= 8 and manifest["tagged"] == 24, head
    artifacts = dict(db.execute("select key, data from artifact").fetchall())
    # Keys carry the dataset (the source folder `imgs`), so datasets' histories stay apart.
    assert {"tagging-progress-imgs", "tagging-summary-imgs", "label-rates-imgs"} <= set(artifacts)
    assert float(artifacts["tagging-progress-imgs"]) == 100.0
    # The outer flow's last log line is written after its final state, just before exit.
    last_logs = db.execute(
        "select l.message from log l join flow_run f on f.id = l.flow_run_id "
        "where f.name = 'tag-imgs' and l.task_run_id is null "
        "and l.message like 'Finished in state%'"
    ).fetchall()
    assert last_logs == [("Finished in state Completed()",)]
    events = {e for (e,) in db.execute("select distinct event from events").fetchall()}
    assert "prefect.flow-run.Completed" in events
    assert "prefect.flow-run.heartbeat" not in events


def test_a_server_that_cannot_start_is_reported_without_a_traceback(
    tiny: TinyModel, tmp_path: Path
) -> None:
    fake = tmp_path / "fake" / "uvicorn"
    fake.mkdir(parents=True)
    # `prefect server start` runs uvicorn in its own process (`uvicorn.run`), Prefect's
    # private temporary server as `python -m uvicorn`: both fail here as uvicorn would
    (fake / "__init__.py").write_text(
        "import sys\ndef run(*args, **kwargs):\n    sys.exit('fake uvicorn: cannot start')\n"
    )
    (fake / "__main__.py").write_text("import sys\nsys.exit('fake uvicorn: cannot start')\n")

    done = _run_tag(tiny, tmp_path, os.pathsep.join([str(fake.parent), str(REPO)]))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "multitag tag: the temporary Prefect server exited with code 1" in done.stderr
    assert "PREFECT_API_URL" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
