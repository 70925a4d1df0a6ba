"""Exactly once under retries and odd stores (issue 15 items 2, 5 and 6).

- A retried write whose first try landed (a lost response) is this run's own success: the
  shard, the manifest and the claim epoch recognise their own earlier write.
- S3's 409 ConditionalRequestConflict on a conditional create is retried.
- A store that ignores `If-None-Match: *` is refused, unless the run is single-writer.
- `retry_errors` re-tags images whose latest row is an error; the new rows supersede them
  (column `attempt`), and the current rows (pyarrow and DuckDB) are one per image.

S3 runs against moto's ThreadedMotoServer through the fault proxy (tests/s3_faults.py) on
127.0.0.1: the faults are real HTTP answers and resets that botocore and s3fs see.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from multitag import storage, tagging
from multitag.config import TagParams
from multitag.inference import loading
from multitag.tagging import (
    ConditionalWritesIgnoredError,
    Tagger,
    TagSummary,
    claims,
    current_rows,
    plan_run,
    read_current,
    shards,
    summarize_run,
    tag_shard,
    validate_tags_table,
    write_manifest,
)
from tests.local_servers import moto_server
from tests.s3_faults import (
    FaultProxy,
    Request,
    Rule,
    lost_response,
    s3_error,
    strip_conditional_writes,
)
from tests.tagging_helpers import TinyModel, read_tags, register_tiny_model, write_images

pytestmark = pytest.mark.slow  # a model to train, an S3 server to start


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str, Any]]:
    """(s3fs filesystem, fresh bucket, fault proxy): the pipeline reaches moto via the proxy."""
    import s3fs

    with FaultProxy(moto_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        bucket = f"multitag-{uuid.uuid4().hex[:12]}"
        fs.mkdir(bucket)
        yield fs, bucket, proxy
        assert proxy.rule_errors == []
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-model-once")
    return register_tiny_model(root / "home", root / "work")


@pytest.fixture(scope="module")
def tagger(tiny: TinyModel) -> Tagger:
    return loading.load_tagger(
        TagParams(source="-", home=str(tiny.home), batch_size=8, decode_workers=1)
    )


def params_for(tiny: TinyModel, source: str | Path, out: str | Path, **kw: object) -> TagParams:
    base: dict[str, object] = {
        "home": str(tiny.home),
        "out": str(out),
        "shard_size": 4,
        "batch_size": 4,
        "decode_workers": 1,
    }
    return TagParams(source=str(source), **{**base, **kw})


def run_all(params: TagParams, tagger: Tagger, run_id: str | None = None) -> TagSummary:
    """What the tag flow does, in this process: plan, tag every shard, write the manifest."""
    plan = plan_run(params, model_version=tagger.model_version, run_id=run_id)
    results = [tag_shard(spec, tagger, run_id=plan.run_id) for spec in plan.shards]
    summary = summarize_run(plan, results)
    write_manifest(summary)
    return summary


def first_put_of(fault_for: Callable[[], Any], *patterns: str) -> Rule:
    """A rule: the first PUT whose key matches each pattern gets `fault_for()`."""
    hit: set[str] = set()
    lock = threading.Lock()

    def rule(req: Request) -> Any:
        if req.method != "PUT":
            return None
        with lock:
            for pat in patterns:
                if pat not in hit and re.search(pat, req.key):
                    hit.add(pat)
                    return fault_for()
        return None

    return rule


def recording(log: list[Request]) -> Rule:
    def rule(req: Request) -> None:
        log.append(req)

    return rule


def read_partition(fs: Any, uri: str) -> pa.Table:
    return pads.dataset(uri.removeprefix("s3://"), filesystem=fs, format="parquet").to_table()


def current_rows_sql(partition: str) -> str:
    """The README's and the contract's DuckDB query for the current rows, sorted by image."""
    return (
        f"SELECT image_uri, attempt, error FROM read_parquet('{partition}/*.parquet', "
        "union_by_name=true) QUALIFY row_number() OVER (PARTITION BY image_uri ORDER BY "
        "coalesce(attempt, 1) DESC) = 1 ORDER BY image_uri"
    )


def upload_images(fs: Any, prefix: str, n: int) -> None:
    from tests.tagging_helpers import shape_images

    for i, data in enumerate(shape_images(n)):
        fs.pipe(f"{prefix}/img_{i:04d}.jpg", data)


# ------------------------------------------------------------- item 5: lost responses


def test_a_retried_shard_whose_write_landed_counts_as_written(
    tiny: TinyModel, tagger: Tagger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PUT/link succeeded, the caller saw an exception; the task's retry meets its own file."""
    write_images(tmp_path / "src", 6)
    plan = plan_run(params_for(tiny, tmp_path / "src", tmp_path / "out", shard_size=10))
    spec = plan.shards[0]
    real = shards.write_bytes_atomic

    def lands_then_fails(uri: str, data: bytes, *, exclusive: bool = False) -> None:
        real(uri, data, exclusive=exclusive)
        raise ConnectionResetError("the answer was lost after the write")

    with monkeypatch.context() as m:
        m.setattr(shards, "write_bytes_atomic", lands_then_fails)
        with pytest.raises(ConnectionResetError):
            tag_shard(spec, tagger, run_id=plan.run_id)
    stored = Path(spec.part_uri).read_bytes()

    retried = tag_shard(spec, tagger, run_id=plan.run_id)  # the retry sees the file exists
    assert (retried.status, retried.n_images, retried.n_tagged) == ("written", 6, 6)
    assert retried.scorer == tagger.scorer_note
    with monkeypatch.context() as m:
        m.setattr(shards, "_fresh_exists", lambda uri: False)  # the retry raced the check
        raced = tag_shard(spec, tagger, run_id=plan.run_id)
        other = tag_shard(spec, tagger, run_id="another-run")
    assert (raced.status, raced.n_tagged) == ("written", 6)
    assert other.status == "lost_race"  # someone else's file is never taken for ours
    assert tag_shard(spec, tagger, run_id="another-run").status == "exists"
    assert Path(spec.part_uri).read_bytes() == stored
    summary = summarize_run(plan, [retried])
    assert (summary.tagged, summary.shards_written, summary.skipped) == (6, 1, 0)


def test_a_retried_manifest_and_claim_recognise_their_own_write(
    tiny: TinyModel, tagger: Tagger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_images(tmp_path / "src", 5)
    params = params_for(tiny, tmp_path / "src", tmp_path / "out")
    real = claims.write_bytes_atomic
    lost: list[str] = []

    def epoch_lands_twice(uri: str, data: bytes, *, exclusive: bool = False) -> None:
        real(uri, data, exclusive=exclusive)
        if uri.endswith(".arrow") and not lost:  # a client's own retry of the same PUT: 412
            lost.append(uri)
            real(uri, data, exclusive=exclusive)

    with monkeypatch.context() as m:
        m.setattr(claims, "write_bytes_atomic", epoch_lands_twice)
        plan = plan_run(params, model_version=tagger.model_version, run_id="run-own")
    assert lost and (plan.epoch, plan.n_new, len(plan.shards)) == (1, 5, 2)
    assert all(s.planned_by == "run-own" for s in plan.shards)

    again = plan_run(params, model_version=tagger.model_version, run_id="run-own")
    assert (again.n_new, again.n_resumed, again.epoch) == (5, 0, None)  # a retried plan task
    results = [tag_shard(s, tagger, run_id=plan.run_id) for s in plan.shards]
    summary = summarize_run(plan, results)
    uri = write_manifest(summary)
    first = Path(uri).read_text()
    assert write_manifest(summarize_run(plan, results)) == uri  # the retry: success
    assert Path(uri).read_text() == first  # the stored manifest is kept
    foreign = dataclasses.replace(summary, run_id="someone-else")
    with pytest.raises(FileExistsError):
        write_manifest(foreign)  # same file name, another run's id: not ours


def test_lost_responses_on_s3_are_this_runs_own_writes(
    tiny: TinyModel, tagger: Tagger, s3: tuple[Any, str, Any]
) -> None:
    """The proxy forwards the PUT of the claim, a shard and the manifest, then resets: the
    write landed, botocore retries it, S3 answers 412, and the run still counts each once."""
    fs, bucket, proxy = s3
    upload_images(fs, f"{bucket}/photos", 10)
    patterns = (r"/_plans/.*epoch-000001\.arrow$", r"/part-000001-000001\.parquet$",
                r"/_manifests/.*\.json$")  # fmt: skip
    proxy.set_rule(first_put_of(lost_response, *patterns))
    summary = run_all(params_for(tiny, f"s3://{bucket}/photos", f"s3://{bucket}/tags"), tagger)
    assert proxy.counts["lost response"] == 3
    assert (summary.status, summary.tagged, summary.shards_written) == ("completed", 10, 3)
    assert [s.status for s in summary.shards] == ["written"] * 3
    table = read_partition(fs, summary.output_uri)
    assert table.num_rows == 10 and validate_tags_table(table) == []
    manifest = json.loads(fs.cat(summary.manifest_uri.removeprefix("s3://")))
    assert (manifest["run_id"], manifest["tagged"]) == (summary.run_id, 10)


def test_a_409_conditional_conflict_on_s3_is_retried(
    tiny: TinyModel, tagger: Tagger, s3: tuple[Any, str, Any]
) -> None:
    fs, bucket, proxy = s3
    upload_images(fs, f"{bucket}/photos", 5)

    def conflict() -> Any:
        return s3_error(409, "ConditionalRequestConflict", "A conflicting operation occurred.")

    proxy.set_rule(first_put_of(conflict, r"epoch-000001\.arrow$", r"part-000001-000000"))
    summary = run_all(params_for(tiny, f"s3://{bucket}/photos", f"s3://{bucket}/tags"), tagger)
    assert proxy.counts["409 ConditionalRequestConflict"] == 2
    assert (summary.tagged, summary.shards_written) == (5, 2)
    assert read_partition(fs, summary.output_uri).num_rows == 5


# ------------------------------------------------------ item 6: conditional-write probe


def test_exclusive_create_on_s3_sends_if_none_match(s3: tuple[Any, str, Any]) -> None:
    _, bucket, proxy = s3
    seen: list[Request] = []
    proxy.set_rule(recording(seen))
    storage.write_bytes_atomic(f"s3://{bucket}/a/x.bin", b"1", exclusive=True)
    storage.write_bytes_atomic(f"s3://{bucket}/a/y.bin", b"2")
    puts = {r.key: r.headers for r in seen if r.method == "PUT"}
    assert puts["a/x.bin"].get("If-None-Match") == "*"
    assert "If-None-Match" not in puts["a/y.bin"]


def test_a_store_that_ignores_conditional_writes_is_refused(
    tiny: TinyModel, tagger: Tagger, s3: tuple[Any, str, Any]
) -> None:
    fs, bucket, proxy = s3
    upload_images(fs, f"{bucket}/photos", 5)
    proxy.set_rule(strip_conditional_writes())
    out = f"s3://{bucket}/tags-stripped"
    params = params_for(tiny, f"s3://{bucket}/photos", out)
    with pytest.raises(ConditionalWritesIgnoredError) as info:
        plan_run(params, model_version=tagger.model_version)
    message = str(info.value)
    assert proxy.endpoint in message and f"s3://{bucket}" in message
    assert "If-None-Match: *" in message and "--single-writer" in message
    assert isinstance(info.value, tagging.TaggingError)
    assert proxy.counts["strip If-None-Match"] == 2  # the probe's two creates
    fs.invalidate_cache()
    assert fs.find(f"{bucket}/tags-stripped") == []  # nothing claimed, the probe removed

    single = run_all(params.model_copy(update={"single_writer": True}), tagger)
    assert (single.status, single.tagged) == ("completed", 5)
    assert read_partition(fs, single.output_uri).num_rows == 5


def test_the_probe_runs_once_per_root_and_an_honest_store_passes(
    tiny: TinyModel, tagger: Tagger, s3: tuple[Any, str, Any]
) -> None:
    fs, bucket, proxy = s3
    upload_images(fs, f"{bucket}/photos", 3)
    seen: list[Request] = []
    proxy.set_rule(recording(seen))
    params = params_for(tiny, f"s3://{bucket}/photos", f"s3://{bucket}/tags")
    first = run_all(params, tagger)
    second = run_all(params, tagger)
    probes = [r for r in seen if "/_probe/" in f"/{r.key}"]
    assert [r.method for r in probes] == ["PUT", "PUT", "DELETE"]  # once, then cached
    assert all(r.headers.get("If-None-Match") == "*" for r in probes if r.method == "PUT")
    assert (first.tagged, second.skipped) == (3, 3)
    fs.invalidate_cache()
    assert not fs.find(f"{bucket}/tags/_probe")


# ---------------------------------------------------------------- item 2: retry errors


def _truncated_jpeg(good: bytes) -> bytes:
    return good[: len(good) // 3]


def test_retry_errors_retags_only_the_fixed_images_and_supersedes_their_rows(
    tiny: TinyModel, tagger: Tagger, tmp_path: Path
) -> None:
    import duckdb

    src, out = tmp_path / "src", tmp_path / "out"
    files = write_images(src, 7)
    good = files[3].read_bytes()
    files[3].write_bytes(_truncated_jpeg(good))  # a fact about the image: an error row
    params = params_for(tiny, src, out)

    first = run_all(params, tagger)
    assert (first.tagged, first.failed, first.retried) == (6, 1, 0)
    plain = run_all(params, tagger)  # without the flag an error row is final
    assert (plain.tagged, plain.failed, plain.skipped, plain.shards_written) == (0, 0, 7, 0)

    files[3].write_bytes(good)  # the operator restores the object
    retry = run_all(params.model_copy(update={"retry_errors": True}), tagger)
    assert (retry.tagged, retry.failed, retry.skipped) == (1, 0, 6)
    assert (retry.retried, retry.retried_tagged, retry.shards_written) == (1, 1, 1)
    assert [s.n_images for s in retry.shards] == [1]
    manifest = json.loads(Path(retry.manifest_uri).read_text())
    assert (manifest["retried"], manifest["retried_tagged"]) == (1, 1)
    assert "retried 1 error row(s): 1 now tagged" in retry.format_text()

    table = read_tags(retry.output_uri)
    assert table.num_rows == 8 and validate_tags_table(table, model_version=tiny.version) == []
    history = {(r["attempt"], r["error"] is None) for r in table.to_pylist()
               if r["image_uri"] == str(files[3])}  # fmt: skip
    assert history == {(1, False), (2, True)}  # the error row stays, superseded

    current = current_rows(table)
    assert sorted(current.column("image_uri").to_pylist()) == sorted(str(f) for f in files)
    assert current.column("error").null_count == 7
    assert read_current(retry.output_uri).equals(current)
    rows = duckdb.sql(current_rows_sql(retry.output_uri)).fetchall()
    assert [(u, a, e) for u, a, e in rows] == [
        (u, a, e)
        for u, a, e in zip(
            current.column("image_uri").to_pylist(),
            current.column("attempt").to_pylist(),
            current.column("error").to_pylist(),
            strict=True,
        )
    ]
    again = run_all(params.model_copy(update={"retry_errors": True}), tagger)
    assert (again.retried, again.tagged, again.skipped) == (0, 0, 7)  # nothing failed now


def test_retry_errors_on_s3(tiny: TinyModel, tagger: Tagger, s3: tuple[Any, str, Any]) -> None:
    fs, bucket, _ = s3
    upload_images(fs, f"{bucket}/photos", 5)
    good = fs.cat(f"{bucket}/photos/img_0001.jpg")
    fs.pipe(f"{bucket}/photos/img_0001.jpg", _truncated_jpeg(good))
    params = params_for(tiny, f"s3://{bucket}/photos", f"s3://{bucket}/tags", retry_errors=True)
    assert run_all(params, tagger).failed == 1
    fs.pipe(f"{bucket}/photos/img_0001.jpg", good)  # restored
    retry = run_all(params, tagger)
    assert (retry.retried, retry.retried_tagged, retry.skipped) == (1, 1, 4)
    table = read_partition(fs, retry.output_uri)
    assert table.num_rows == 6 and validate_tags_table(table) == []
    current = read_current(retry.output_uri)
    assert current.num_rows == 5 and current.column("error").null_count == 5


def test_a_retry_that_fails_again_adds_the_next_attempt(
    tiny: TinyModel, tagger: Tagger, tmp_path: Path
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src, 3)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (src / "gone.jpg").write_bytes(b"\xff\xd8 not a jpeg either")
    params = params_for(tiny, src, out, retry_errors=True)
    run_all(params, tagger)
    (src / "gone.jpg").unlink()  # no longer listed: not retried (nothing to read)
    second = run_all(params, tagger)
    third = run_all(params, tagger)
    assert (second.retried, second.retried_tagged, third.retried) == (1, 0, 1)
    table = read_tags(second.output_uri)
    attempts = sorted(
        r["attempt"] for r in table.to_pylist() if r["image_uri"].endswith("broken.jpg")
    )
    assert attempts == [1, 2, 3] and validate_tags_table(table) == []
    gone = [r for r in current_rows(table).to_pylist() if r["image_uri"].endswith("gone.jpg")]
    assert len(gone) == 1 and gone[0]["attempt"] == 1 and gone[0]["error"]


def test_two_retry_runs_never_retry_one_image_twice(
    tiny: TinyModel, tagger: Tagger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B plans from a view older than A's retry claim: B loses the epoch and drops the image."""
    src, out = tmp_path / "src", tmp_path / "out"
    files = write_images(src, 5)
    good = files[0].read_bytes()
    files[0].write_bytes(_truncated_jpeg(good))
    params = params_for(tiny, src, out)
    run_all(params, tagger)  # epoch 1, finished, with one error row
    files[0].write_bytes(good)
    retry = params.model_copy(update={"retry_errors": True})

    a = plan_run(retry, model_version=tagger.model_version, run_id="A")
    real = claims._list_epochs
    monkeypatch.setattr(claims, "_list_epochs", lambda plans: [e for e in real(plans) if e < 2])
    b = plan_run(retry, model_version=tagger.model_version, run_id="B")
    monkeypatch.setattr(claims, "_list_epochs", real)
    assert (a.epoch, a.n_retried, a.shards[0].attempts) == (2, 1, (2,))
    assert (b.epoch, b.n_retried, b.n_new) == (None, 0, 0)  # B lost epoch 2 and saw A's claim
    assert [s.shard_id for s in b.shards] == [s.shard_id for s in a.shards]  # B may resume it
    results = [tag_shard(s, tagger, run_id=r) for r, p in (("B", b), ("A", a)) for s in p.shards]
    assert sorted(r.status for r in results) == ["exists", "written"]
    table = read_tags(a.partition_uri)
    assert validate_tags_table(table) == [] and table.num_rows == 6
    c = plan_run(retry, model_version=tagger.model_version, run_id="C")
    assert (c.n_retried, c.shards) == (0, ())  # the latest row is no error any more


def test_two_retry_runs_at_once_in_threads_retry_each_image_once(
    tiny: TinyModel, tagger: Tagger, tmp_path: Path
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    files = write_images(src, 12)
    goods = {f: f.read_bytes() for f in files[::3]}
    for f, data in goods.items():
        f.write_bytes(_truncated_jpeg(data))
    params = params_for(tiny, src, out, shard_size=2)
    assert run_all(params, tagger).failed == 4
    for f, data in goods.items():
        f.write_bytes(data)
    retry = params.model_copy(update={"retry_errors": True})
    barrier = threading.Barrier(2)
    summaries: list[TagSummary] = []

    def run() -> None:
        barrier.wait()
        summaries.append(run_all(retry, tagger))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(summaries) == 2 and sum(s.retried for s in summaries) == 4
    table = read_tags(summaries[0].output_uri)
    assert table.num_rows == 16 and validate_tags_table(table) == []
    assert current_rows(table).column("error").null_count == 12


def test_validate_tags_table_checks_attempts() -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    ok = tagging.TagRow("a.jpg", ["x"], {"x": 0.9}, "x", 0.9, 10, 20, now)
    err = tagging.TagRow("a.jpg", None, None, None, None, None, None, now, "truncated: cut")
    good = tagging.rows_to_table([err, ok], "v1", [1, 2])
    assert validate_tags_table(good) == []
    twice = tagging.rows_to_table([err, ok], "v1", [1, 1])
    assert any(p.startswith("unique_image_per_model:") for p in validate_tags_table(twice))
    gap = tagging.rows_to_table([err, ok], "v1", [1, 3])
    assert any("missing attempts" in p for p in validate_tags_table(gap))
    superseded_ok = tagging.rows_to_table([ok, err], "v1", [1, 2])
    assert any("without an error" in p for p in validate_tags_table(superseded_ok))
    old = good.drop_columns(["attempt"]).slice(0, 1)  # a contract 1.0 file: attempt 1
    assert validate_tags_table(old) == [] and current_rows(old).column("attempt").to_pylist() == [1]


def test_read_current_of_a_partition_with_files_from_before_attempts(
    tiny: TinyModel, tagger: Tagger, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    write_images(tmp_path / "src", 4)
    params = params_for(tiny, tmp_path / "src", tmp_path / "out", shard_size=2)
    summary = run_all(params, tagger)  # two part files; the first is then rewritten as 1.0
    part = sorted(Path(summary.output_uri).glob("part-*.parquet"))[0]
    old = pq.read_table(part).drop_columns(["attempt"])
    part.unlink()
    pq.write_table(old, part)  # as contract 1.0 wrote it
    current = read_current(summary.output_uri)
    assert current.num_rows == 4 and set(current.column("attempt").to_pylist()) == {1}
    import duckdb

    rows = duckdb.sql(current_rows_sql(summary.output_uri)).fetchall()
    assert [u for u, _, _ in rows] == current.column("image_uri").to_pylist()
    assert sorted(str(a) for _, a, _ in rows) == ["1", "1", "None", "None"]


@pytest.mark.usefixtures("prefect_harness")
def test_the_tag_flow_retries_errors_when_asked(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.tag_runs import run_tag_flow

    src, out = tmp_path / "src", tmp_path / "out"
    files = write_images(src, 5)
    good = files[2].read_bytes()
    files[2].write_bytes(_truncated_jpeg(good))
    params = params_for(tiny, src, out)
    assert run_tag_flow(params).failed == 1
    files[2].write_bytes(good)
    assert run_tag_flow(params).shards_written == 0
    retried = run_tag_flow(params.model_copy(update={"retry_errors": True}))
    assert (retried.retried, retried.retried_tagged, retried.tagged) == (1, 1, 1)
    assert read_current(retried.output_uri).column("error").null_count == 5


def test_the_tag_command_passes_retry_errors_and_single_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's flags reach the flow's parameters (the flow itself is tested above)."""
    import flows.cli as cli
    from multitag.errors import RunFailedError

    seen: list[TagParams] = []
    monkeypatch.setattr(cli, "_prepare_runtime", lambda: None)
    monkeypatch.setattr(cli, "_start_server_early", lambda: None)
    monkeypatch.setattr(cli, "_prefetch", lambda params: None)

    def run_flow(cmd: str, fn: object, params: TagParams, server: object = None) -> None:
        seen.append(params)  # a failed run: `_run_flow` raises (exit 1), it returns no result
        raise RunFailedError("recorded, not run")

    monkeypatch.setattr(cli, "_run_flow", run_flow)
    assert cli.main(["tag", str(tmp_path), "--retry-errors", "--single-writer"]) == 1
    assert cli.main(["tag", str(tmp_path)]) == 1
    assert [(p.retry_errors, p.single_writer) for p in seen] == [(True, True), (False, False)]
