"""Real processes: SIGKILL a tagging run part-way, rerun, and run two at once.

Each run is `tag_source` in its own Python process loading the registered model, so the
claim log, exclusive creates and temp-file clean-up are exercised across process
boundaries exactly as two CLI invocations (or a crashed worker and its retry) would.
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

from multitag.config import TagParams
from multitag.tagging import list_images, tag_source, validate_tags_table
from tests.tagging_helpers import TinyModel, read_tags, register_tiny_model, write_images

pytestmark = pytest.mark.slow  # trains a model and starts Python processes that import torch

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 400
RUN_SCRIPT = (
    "import sys\n"
    "from multitag.config import TagParams\n"
    "from multitag.runtime import configure_cpu_runtime\n"
    "from multitag.tagging import tag_source\n"
    "configure_cpu_runtime(1)\n"
    "summary = tag_source(TagParams.model_validate_json(sys.argv[1]))\n"
    "print(summary.run_id, summary.tagged, summary.skipped, summary.resumed)\n"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-model-kill")
    return register_tiny_model(root / "home", root / "work")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("kill-src")
    write_images(src, N_IMAGES, seed=11)
    return src


def start_run(params: TagParams) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, params.model_dump_json()],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_parts(partition: Path, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(partition.glob("part-*.parquet")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before writing a shard: {proc.communicate()}")
        time.sleep(0.01)
    raise AssertionError("no shard appeared in time")


def assert_exactly_once(partition: Path, source: Path) -> None:
    table = read_tags(partition)
    listed = list(list_images(str(source)))
    assert sorted(table.column("image_uri").to_pylist()) == listed
    assert validate_tags_table(table) == []


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def test_sigkill_mid_run_then_rerun_tags_every_image_exactly_once(
    tiny: TinyModel, source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    params = TagParams(
        source=str(source),
        out=str(out),
        home=str(tiny.home),
        shard_size=8,
        batch_size=4,
        decode_workers=1,
    )
    partition = out / source.name / f"model={tiny.version}"

    proc = start_run(params)
    try:
        wait_for_parts(partition, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()  # reaped: its pid no longer exists, so its temp files count as stale
    assert proc.returncode == -signal.SIGKILL
    n_parts_at_kill = len(list(partition.glob("part-*.parquet")))
    n_shards = -(-N_IMAGES // params.shard_size)
    assert 1 <= n_parts_at_kill < n_shards, "the kill came after the run had finished"
    assert not list((out / source.name / "_manifests").glob("*.json"))  # it never finished

    summary = tag_source(params)

    assert summary.status == "completed"
    assert summary.tagged == N_IMAGES - summary.skipped
    assert summary.resumed == summary.tagged  # all work was the killed run's unfinished shards
    assert summary.skipped >= n_parts_at_kill * params.shard_size - params.shard_size
    assert_exactly_once(partition, source)
    assert temp_files(out) == []
    assert len(list(partition.glob("part-*.parquet"))) == n_shards


def test_two_processes_at_once_tag_each_image_exactly_once(
    tiny: TinyModel, source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    params = TagParams(
        source=str(source),
        out=str(out),
        home=str(tiny.home),
        shard_size=10,
        batch_size=5,
        decode_workers=1,
    )
    procs = [start_run(params) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs

    partition = out / source.name / f"model={tiny.version}"
    assert_exactly_once(partition, source)
    manifests = [json.loads(m.read_text()) for m in (out / source.name / "_manifests").glob("*")]
    assert len(manifests) == 2
    assert sum(m["tagged"] for m in manifests) == N_IMAGES
    assert sum(m["shards_written"] for m in manifests) == len(list(partition.glob("*.parquet")))
    assert temp_files(out) == []
