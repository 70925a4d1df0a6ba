"""Tagging an s3:// prefix into s3:// Parquet, against moto's S3 server (real HTTP, real s3fs).

The server runs the way s3fs tests itself: `ThreadedMotoServer` on 127.0.0.1 and a free
port, reached through AWS_ENDPOINT_URL with dummy credentials. Everything goes through the
same fsspec code path as production: paginated listing, concurrent object reads, exclusive
creates (If-None-Match) for claim files and shards, and pyarrow reading the result back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest

from multitag import tagging
from multitag.config import TagParams
from multitag.inference.faults import TransientReadError
from multitag.storage import write_bytes_atomic
from multitag.tagging import claims, list_images, plan_run, shards, tag_shard, validate_tags_table
from tests.local_servers import moto_server
from tests.s3_faults import FaultProxy, Request, expired_token, reset, s3_error
from tests.tag_runs import run_tag_flow, summary_from_dict
from tests.tagging_helpers import (
    TinyModel,
    hostile_files,
    register_tiny_model,
    shape_images,
)

pytestmark = pytest.mark.slow  # a model to train and an S3 server to start


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str]]:
    """An s3fs filesystem on the moto server and a fresh bucket."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"multitag-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, bucket
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-model-s3")
    return register_tiny_model(root / "home", root / "work")


def upload_images(fs: Any, prefix: str, n: int, *, seed: int = 0) -> list[str]:
    uris = []
    for i, data in enumerate(shape_images(n, seed=seed)):
        key = f"{prefix}/{'sub/' if i % 3 == 0 else ''}img_{seed}_{i:04d}.jpg"
        fs.pipe(key, data)
        uris.append(f"s3://{key}")
    return sorted(uris)


def params(tiny: TinyModel, source: str, out: str, **kw: object) -> TagParams:
    base: dict[str, object] = {
        "home": str(tiny.home),
        "out": out,
        "shard_size": 8,
        "batch_size": 4,
        "decode_workers": 1,
    }
    return TagParams(source=source, **{**base, **kw})


def read_partition(fs: Any, uri: str):  # -> pyarrow.Table
    return pads.dataset(uri.removeprefix("s3://"), filesystem=fs, format="parquet").to_table()


def test_listing_is_paginated_sorted_and_filtered(
    s3: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, bucket = s3
    expected = upload_images(fs, f"{bucket}/photos", 20)
    fs.pipe(f"{bucket}/photos/notes.txt", b"not an image")
    fs.pipe(f"{bucket}/photos/UPPER.PNG", b"x")
    fs.pipe(f"{bucket}/photos-elsewhere/img.jpg", b"x")  # shares the string prefix only
    expected = sorted([*expected, f"s3://{bucket}/photos/UPPER.PNG"])

    pages: list[int] = []
    real_call = type(fs).call_s3

    def small_pages(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "list_objects_v2":
            kwargs["MaxKeys"] = 7
            pages.append(1)
        return real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(type(fs), "call_s3", small_pages)
    assert list(list_images(f"s3://{bucket}/photos")) == expected
    assert len(pages) == 4  # 22 objects, 7 per page


def test_missing_prefix_is_an_error(s3: tuple[Any, str]) -> None:
    _, bucket = s3
    with pytest.raises(FileNotFoundError, match="no objects under"):
        list_images(f"s3://{bucket}/typo")


@pytest.mark.usefixtures("prefect_harness")  # runs the tag flow
def test_tag_s3_prefix_into_s3_parquet_and_resume(tiny: TinyModel, s3: tuple[Any, str]) -> None:
    fs, bucket = s3
    uris = upload_images(fs, f"{bucket}/photos", 18)
    for name, (data, _) in hostile_files().items():
        fs.pipe(f"{bucket}/photos/hostile/{name}", data)
    n_total = len(uris) + len(hostile_files())
    out = f"s3://{bucket}/tags"

    first = run_tag_flow(params(tiny, f"s3://{bucket}/photos", out))

    assert first.output_uri == f"{out}/photos/model={tiny.version}"
    assert (first.listed, first.tagged + first.failed) == (n_total, n_total)
    assert first.failed == sum(1 for _, kind in hostile_files().values() if kind)
    table = read_partition(fs, first.output_uri)
    assert sorted(table.column("image_uri").to_pylist()) == sorted(
        [*uris, *(f"s3://{bucket}/photos/hostile/{n}" for n in hostile_files())]
    )
    assert validate_tags_table(table, model_version=tiny.version) == []
    assert fs.exists(first.manifest_uri)

    again = run_tag_flow(params(tiny, f"s3://{bucket}/photos", out))
    assert (again.tagged, again.failed, again.skipped) == (0, 0, n_total)

    more = upload_images(fs, f"{bucket}/photos/new", 5, seed=7)
    grown = run_tag_flow(params(tiny, f"s3://{bucket}/photos", out))
    assert (grown.tagged, grown.skipped) == (5, n_total)
    table = read_partition(fs, grown.output_uri)
    assert table.num_rows == n_total + len(more)
    assert validate_tags_table(table) == []


def test_exclusive_create_on_s3(s3: tuple[Any, str]) -> None:
    fs, bucket = s3
    write_bytes_atomic(f"s3://{bucket}/x/part.bin", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_bytes_atomic(f"s3://{bucket}/x/part.bin", b"second", exclusive=True)
    assert fs.cat(f"{bucket}/x/part.bin") == b"first"


def test_racing_runs_on_s3_claim_and_write_each_image_once(
    tiny: TinyModel, s3: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, bucket = s3
    upload_images(fs, f"{bucket}/photos", 12)
    p = params(tiny, f"s3://{bucket}/photos", f"s3://{bucket}/tags")
    a = plan_run(p, run_id="A")
    with monkeypatch.context() as m:
        m.setattr(claims, "_list_epochs", lambda plans: [])  # B planned before A's claim landed
        b = plan_run(p, run_id="B")
    assert (a.epoch, b.epoch, b.n_new) == (1, None, 0)
    assert sorted(s.shard_id for s in b.shards) == sorted(s.shard_id for s in a.shards)

    tagger = tagging.tagger_for(p, a.model_version)
    first = tag_shard(a.shards[0], tagger)
    with monkeypatch.context() as m:
        m.setattr(shards, "_fresh_exists", lambda uri: False)  # raced past the existence check
        late = tag_shard(b.shards[-1], tagger)  # B does A's first shard too (reverse order)
    assert (first.status, late.status) == ("written", "lost_race")
    rest = [tag_shard(s, tagger) for s in b.shards]
    assert [r.status for r in rest] == ["written", "exists"]
    table = read_partition(fs, a.partition_uri)
    assert table.num_rows == 12 and validate_tags_table(table) == []


@pytest.mark.usefixtures("prefect_harness")  # runs the tag flow
def test_duckdb_style_glob_does_not_pick_up_claim_files(
    tiny: TinyModel, s3: tuple[Any, str], tmp_path: Path
) -> None:
    """Claim files live outside the model partition and are not .parquet."""
    fs, bucket = s3
    upload_images(fs, f"{bucket}/photos", 3)
    summary = run_tag_flow(params(tiny, f"s3://{bucket}/photos", f"s3://{bucket}/tags"))
    parquet = fs.glob(f"{bucket}/tags/photos/**/*.parquet")
    assert parquet and all("/model=" in p and "/_plans/" not in p for p in parquet)
    assert fs.glob(f"{bucket}/tags/photos/_plans/model={summary.model_version}/epoch-*.arrow")


# ------------------------------------------- issue 15: weather vs facts, odd keys, byte cap


@pytest.fixture
def s3_proxied(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, str, FaultProxy]]:
    """A fresh bucket, and an s3fs filesystem that reaches moto through the fault proxy.

    Every s3fs instance made in the test (the pipeline's too) uses the proxy's endpoint.
    """
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        bucket = f"multitag-{uuid.uuid4().hex[:12]}"
        fs.mkdir(bucket)
        yield fs, bucket, proxy
        s3fs.S3FileSystem.clear_instance_cache()


def photo_gets(req: Request) -> bool:
    """Object reads of the source photos (not listings, not the output's own files)."""
    return req.method == "GET" and req.key.startswith("photos/")


NO_RETRY_WAIT = [0.0, 0.0]  # retries without the 5-120 s production backoff


@pytest.mark.usefixtures("prefect_harness")  # runs the tag flow, the one shard runner
def test_expired_token_fails_the_run_without_error_rows_and_a_rerun_tags_every_image(
    tiny: TinyModel, s3_proxied: tuple[Any, str, FaultProxy]
) -> None:
    from flows.tag import ShardsFailedError

    fs, bucket, proxy = s3_proxied
    uris = upload_images(fs, f"{bucket}/photos", 6)
    p = params(
        tiny, f"s3://{bucket}/photos", f"s3://{bucket}/tags", shard_retry_delays_s=NO_RETRY_WAIT
    )

    proxy.set_rule(expired_token(only=photo_gets))  # expired for the whole run
    with pytest.raises(ShardsFailedError, match="ExpiredToken") as failed:
        run_tag_flow(p)
    cause = failed.value.__cause__
    assert isinstance(cause, TransientReadError) and cause.code == "ExpiredToken"
    assert cause.uri in uris and "credentials" in str(cause)
    # The shard was tried three times (the run's two retries), each met the expired token.
    assert proxy.counts["403 ExpiredToken"] >= 3
    assert fs.glob(f"{bucket}/tags/photos/model=*/*.parquet") == []  # nothing written
    (manifest,) = fs.glob(f"{bucket}/tags/photos/_manifests/*.json")
    failed_run = summary_from_dict(json.loads(fs.cat_file(manifest)))
    assert (failed_run.status, failed_run.tagged, failed_run.failed) == ("failed", 0, 0)

    proxy.set_rule(None)  # the credentials were renewed
    summary = run_tag_flow(p)
    assert (summary.resumed, summary.tagged, summary.failed) == (6, 6, 0)
    table = read_partition(fs, summary.output_uri)
    assert sorted(table.column("image_uri").to_pylist()) == uris
    assert table.column("error").null_count == 6  # no error row came from the expired token


@pytest.mark.usefixtures("prefect_harness")
def test_a_token_that_expires_mid_run_is_retried_within_the_run(
    tiny: TinyModel, s3_proxied: tuple[Any, str, FaultProxy]
) -> None:
    """A credential refreshed while the shard waits for its retry: the run completes."""
    fs, bucket, proxy = s3_proxied
    uris = upload_images(fs, f"{bucket}/photos", 6)
    expired = expired_token(only=photo_gets)
    hits = {"n": 0}

    def first_reads_expired(req: Request) -> Any:
        fault = expired(req)
        if fault is not None and hits["n"] < 2:
            hits["n"] += 1
            return fault
        return None

    proxy.set_rule(first_reads_expired)
    summary = run_tag_flow(
        params(
            tiny,
            f"s3://{bucket}/photos",
            f"s3://{bucket}/tags",
            shard_retry_delays_s=NO_RETRY_WAIT,
        )
    )
    assert (summary.status, summary.tagged, summary.failed) == ("completed", 6, 0)
    assert proxy.counts["403 ExpiredToken"] == 2
    table = read_partition(fs, summary.output_uri)
    assert sorted(table.column("image_uri").to_pylist()) == uris
    assert table.column("error").null_count == 6


@pytest.mark.parametrize(
    "fault",
    [s3_error(503, "SlowDown", "Please reduce your request rate."), reset()],
    ids=["slowdown", "reset"],
)
def test_a_read_s3fs_gives_up_on_is_weather_not_an_error_row(
    tiny: TinyModel,
    s3_proxied: tuple[Any, str, FaultProxy],
    monkeypatch: pytest.MonkeyPatch,
    fault: Any,
) -> None:
    import s3fs

    fs, bucket, proxy = s3_proxied
    upload_images(fs, f"{bucket}/photos", 3)
    p = params(tiny, f"s3://{bucket}/photos", f"s3://{bucket}/tags")
    plan = plan_run(p)
    tagger = tagging.tagger_for(p, plan.model_version)
    # Fewer retries than the defaults (botocore 5 attempts x s3fs 5) only to keep this short:
    # what is tested is what happens once both give up.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.set_rule(lambda req: fault if photo_gets(req) else None)

    with pytest.raises(TransientReadError) as info:
        tag_shard(plan.shards[0], tagger, run_id=plan.run_id)
    assert proxy.counts[fault.label] >= 4  # s3fs and botocore did retry before giving up
    assert info.value.code != ""
    assert fs.glob(f"{bucket}/tags/photos/model=*/*.parquet") == []


@pytest.mark.usefixtures("prefect_harness")
def test_access_denied_on_one_object_is_its_error_row_and_the_rest_are_tagged(
    tiny: TinyModel, s3_proxied: tuple[Any, str, FaultProxy]
) -> None:
    fs, bucket, proxy = s3_proxied
    uris = upload_images(fs, f"{bucket}/photos", 4)
    denied_key = uris[1].removeprefix(f"s3://{bucket}/")
    denied = s3_error(403, "AccessDenied", "Access Denied")
    proxy.set_rule(lambda req: denied if photo_gets(req) and req.key == denied_key else None)

    summary = run_tag_flow(params(tiny, f"s3://{bucket}/photos", f"s3://{bucket}/tags"))

    rows = {r["image_uri"]: r["error"] for r in read_partition(fs, summary.output_uri).to_pylist()}
    assert rows.pop(uris[1]).startswith("unreadable: access denied to this object (AccessDenied")
    assert list(rows.values()) == [None] * 3
    assert (summary.tagged, summary.failed) == (3, 1)


@pytest.mark.usefixtures("prefect_harness")
def test_odd_keys_are_read_literally_and_the_byte_cap_uses_no_extra_request(
    tiny: TinyModel, s3_proxied: tuple[Any, str, FaultProxy]
) -> None:
    fs, bucket, proxy = s3_proxied
    good = shape_images(7, seed=5)
    names = ["a::b.jpg", "#.jpg", "q?.jpg", "sp ace.jpg", "ünï.jpg", "100%.jpg", "img[1]*.jpg"]
    for name, data in zip(names, good, strict=True):
        fs.call_s3("put_object", Bucket=bucket, Key=f"photos/{name}", Body=data)
    for name, data in [("a", b"decoy"), ("notes.txt", b"x"), ("huge.jpg", b"\xff" * 50_001)]:
        fs.call_s3("put_object", Bucket=bucket, Key=f"photos/{name}", Body=data)

    gets: list[str] = []
    heads: list[str] = []

    def spy(req: Request) -> None:
        if req.key.startswith("photos/"):
            seen = {"GET": gets, "HEAD": heads}.get(req.method, [])
            seen.append(req.key)

    proxy.set_rule(spy)  # type: ignore[arg-type]
    p = params(tiny, f"s3://{bucket}/photos", f"s3://{bucket}/tags", max_bytes=50_000)
    summary = run_tag_flow(p)

    rows = {r["image_uri"]: r["error"] for r in read_partition(fs, summary.output_uri).to_pylist()}
    expected = {f"s3://{bucket}/photos/{n}": None for n in names}
    huge = f"s3://{bucket}/photos/huge.jpg"
    assert rows.pop(huge).startswith("too_large: 50001 bytes > max_bytes 50000")
    assert rows == expected  # every odd key read as exactly itself, and tagged
    assert (summary.not_images, summary.not_image_examples) == (
        2,
        [f"s3://{bucket}/photos/a", f"s3://{bucket}/photos/notes.txt"],
    )
    assert heads == []  # the size comes from the GET's headers: one request per image
    assert sorted(gets) == sorted(f"photos/{n}" for n in [*names, "huge.jpg"])
