"""Two promoters racing, as two real processes, on the local disk and on S3 (moto's server).

Each round starts one `promote_if_better` per process on a different candidate. A file
barrier placed right after each process has read the promotion chain holds them until all
have read the same champion, so their compare-and-swaps really collide (a round that ran one
after the other would record no lost swap, and the test asserts one per round). What must
hold: the best model is champion, the decision log's promotions form one unbroken chain that
ends at the pointer, and every decision was judged against the champion the pointer held.
The candidates share one model name (NAME), so they race on that name's chain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from multitag import registry
from multitag.storage import join, read_bytes
from multitag.training.thresholds import ThresholdSet
from tests.local_servers import moto_server

ROOT = Path(__file__).resolve().parents[2]
VOCAB = ["a", "b"]
NAME = "race"
# Candidates per round, each raced by its own process, both better than the champion before
# the round (so both attempt a swap); the best overall must end up champion.
ROUNDS = [(0.60, 0.80), (0.90, 0.85), (0.97, 0.99)]

_PROMOTER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from multitag import registry
    from multitag.registry import champion

    home, version, barrier, parties = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    real_head = champion._chain_head
    first = [True]

    def head_then_wait(h, name):
        head = real_head(h, name)
        if first[0]:  # only the first read: a lost swap re-reads without waiting
            first[0] = False
            (barrier / str(os.getpid())).touch()
            deadline = time.monotonic() + 60
            while len(list(barrier.iterdir())) < parties:
                if time.monotonic() > deadline:
                    sys.exit("barrier timed out: the other promoter never read the chain")
                time.sleep(0.002)
        return head

    champion._chain_head = head_then_wait  # promote_if_better looks it up there
    print(json.dumps(registry.promote_if_better(home, version, "mAP").to_dict()))
    """
)


def register(home: str, work: Path, value: float, version: str) -> str:
    learner = work / f"{version}.pkl"
    learner.write_bytes(b"pretend pickle " + uuid.uuid4().bytes)
    thresholds = ThresholdSet(
        vocab=list(VOCAB),
        objective="f1",
        policy="global",
        global_threshold=0.5,
        per_label=dict.fromkeys(VOCAB, 0.5),
        support=dict.fromkeys(VOCAB, 10),
    ).to_json()
    return registry.register_model(
        home,
        learner_file=learner,
        thresholds=thresholds,
        metrics={"validation": {"mAP": value}},
        inference={"img_size": 8, "mean": [0.5] * 3, "std": [0.2] * 3, "vocab": VOCAB},
        report_files={},
        version=version,
        name=NAME,
    )


def race(home: str, versions: list[str], barrier: Path) -> list[dict[str, Any]]:
    """Start one promoter process per version at once; their decisions."""
    barrier.mkdir()
    script = barrier.parent / "promoter.py"
    script.write_text(_PROMOTER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), home, v, str(barrier), str(len(versions))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for v in versions
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def run_rounds(home: str, tmp_path: Path) -> None:
    values: dict[str, float] = {}
    for i, pair in enumerate(ROUNDS):
        versions = [register(home, tmp_path, v, f"r{i}-{j}") for j, v in enumerate(pair)]
        values.update(zip(versions, pair, strict=True))
        decisions = race(home, versions, tmp_path / f"barrier-{i}")

        # The race happened: both read the same champion, so one swap lost.
        assert sum(d["lost_swaps"] for d in decisions) >= 1, decisions
        best = max(values, key=values.__getitem__)
        champion = registry.get_champion(home)
        assert champion["version"] == best and champion == registry.get_champion(home, NAME)
        pointer = join(home, "models", "_champion", NAME, "champion.json")
        assert json.loads(read_bytes(pointer)) == champion
        assert_log_is_one_chain_ending_at(home, champion, values, n_decisions=len(values))


def assert_log_is_one_chain_ending_at(
    home: str, champion: dict[str, Any], values: dict[str, float], *, n_decisions: int
) -> None:
    log = registry.list_decisions(home)
    promoted = sorted((d for d in log if d["promoted"]), key=lambda d: d["generation"])
    assert [d["generation"] for d in promoted] == list(range(1, len(promoted) + 1))
    previous = None
    for d in promoted:
        assert d["champion_version"] == previous  # judged against the champion it replaced
        if previous is not None:
            assert d["candidate_value"] > values[previous]
        previous = d["version"]
    assert previous == champion["version"] and promoted[-1]["generation"] == champion["generation"]
    for d in log:  # a rejection was judged against a champion at least as good
        if not d["promoted"]:
            assert d["champion_value"] >= d["candidate_value"]
    assert len(log) == n_decisions  # one decision per promoter, none lost or doubled


def test_two_processes_racing_on_local_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MULTITAG_CACHE_DIR", str(tmp_path / "cache"))
    run_rounds(str(tmp_path / "home"), tmp_path)


@pytest.fixture
def s3_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import s3fs

    with moto_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"multitag-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem().mkdir(bucket)
        try:
            yield f"s3://{bucket}/home"
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_two_processes_racing_on_s3(s3_home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MULTITAG_CACHE_DIR", str(tmp_path / "cache"))
    run_rounds(s3_home, tmp_path)
