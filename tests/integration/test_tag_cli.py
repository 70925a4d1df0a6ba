"""`multitag tag` as users run it: a killed worker, a rerun, an unreachable bucket.

Each command is a real process running the Prefect flow on its own ephemeral server, so a
SIGKILL lands mid-flow exactly as a lost worker would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tagging_helpers import TinyModel, read_tags, register_tiny_model, write_images

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 240


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-model-cli")
    return register_tiny_model(root / "home", root / "work")


def _env(tiny: TinyModel, prefect_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MULTITAG_HOME": str(tiny.home),
        "PREFECT_HOME": str(prefect_home),
        "PYTHONPATH": str(REPO),
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())", *args]


def test_killed_tag_run_leaves_finished_shards_and_rerun_completes(
    tiny: TinyModel, tmp_path: Path
) -> None:
    src = tmp_path / "imgs"
    write_images(src, N_IMAGES, seed=5)
    out = tmp_path / "out"
    env = _env(tiny, tmp_path / "prefect")
    cmd = _cli("tag", str(src), "--out", str(out), "--shard-size", "8", "--batch-size", "4")
    partition = out / src.name / f"model={tiny.version}"
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:
        while not any(partition.glob("part-*.parquet")):
            assert proc.poll() is None, f"run ended before a shard: {proc.communicate()[0]}"
            assert time.monotonic() < deadline, "no shard appeared in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    written = len(list(partition.glob("part-*.parquet")))
    assert 1 <= written < N_IMAGES // 8, "the kill came after the run had finished"

    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tagged" in done.stdout
    uris = read_tags(partition).column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == N_IMAGES

    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "tagged 0," in again.stdout, again.stdout + again.stderr


def test_unreachable_bucket_fails_fast_naming_the_uri(tiny: TinyModel, tmp_path: Path) -> None:
    env = {
        **_env(tiny, tmp_path / "prefect"),
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_MAX_ATTEMPTS": "1",
    }
    t0 = time.monotonic()
    done = subprocess.run(
        _cli("tag", "s3://no-such-bucket/photos", "--out", str(tmp_path / "o"), "--json"),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "cannot list s3://no-such-bucket/photos" in done.stderr
    assert "AWS_ENDPOINT_URL" in done.stderr
    # No task-level retries on top of the client's own (the ephemeral server start dominates).
    assert "Retrying" not in done.stdout + done.stderr
    assert time.monotonic() - t0 < 120
    answer = json.loads(done.stdout)  # --json: one object on stdout, the logs on stderr
    assert answer["exit_code"] == 1 and "s3://no-such-bucket/photos" in answer["error"]


def test_json_result_is_the_only_thing_on_stdout(tiny: TinyModel, tmp_path: Path) -> None:
    """A script reads the run's result from stdout; Prefect's logs and the summary go to stderr."""
    src = tmp_path / "imgs"
    write_images(src, 12, seed=6)
    out = tmp_path / "out"
    done = subprocess.run(
        _cli("tag", str(src), "--out", str(out), "--shard-size", "8", "--json"),
        env=_env(tiny, tmp_path / "prefect"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert (result["exit_code"], result["tagged"], result["failed"]) == (0, 12, 0)
    assert result["model_version"] == tiny.version
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["tagged"] == 12
    assert "tagged 12, failed 0" in done.stderr and "Finished in state" in done.stderr
