"""Listing and reading images: facts vs weather, only regular files, a byte cap, odd names.

The classification tests use real botocore ClientErrors translated by s3fs's own
`translate_boto_error` (what `S3FileSystem` raises), so they break if s3fs changes how it
hides the S3 error code. The local tests make the odd objects for real: a FIFO, a unix
socket, a symlink loop, a link to /dev/zero, a file name that is not UTF-8.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import pickle
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import yaml
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError
from PIL import Image
from s3fs.errors import translate_boto_error

from multitag.config import TagParams
from multitag.inference import faults, loading, reading, sources
from multitag.inference.faults import (
    NotRegularFileError,
    TooLargeError,
    TransientReadError,
    classify_read_error,
    read_error_reason,
)
from multitag.inference.reading import read_many
from multitag.inference.sources import is_image_name, list_source
from multitag.tagging import plan_run, summarize_run, tag_shard, validate_tags_table
from tests.tagging_helpers import TinyModel, read_tags, register_tiny_model, shape_images

REPO = Path(__file__).resolve().parents[2]


def s3fs_error(status: int, code: str, message: str = "the server's words") -> OSError:
    """What S3FileSystem raises for this S3 error response (the ClientError as __cause__)."""
    response = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return translate_boto_error(ClientError(response, "GetObject"))  # type: ignore[arg-type]


# ---------------------------------------------------------------- classifying read errors

WEATHER = [
    (403, "ExpiredToken"),
    (403, "InvalidAccessKeyId"),
    (403, "SignatureDoesNotMatch"),
    (403, "RequestTimeTooSkewed"),
    (503, "SlowDown"),
    (503, "ServiceUnavailable"),
    (500, "InternalError"),
    (502, "BadGateway"),
    (409, "ConditionalRequestConflict"),
    (404, "NoSuchBucket"),
    (400, "SomeCodeNobodyKnows"),
]


@pytest.mark.parametrize(("status", "code"), WEATHER)
def test_credentials_clock_throttling_and_5xx_are_weather_not_facts(status: int, code: str) -> None:
    failure = classify_read_error(s3fs_error(status, code))
    assert failure.transient
    assert failure.code == code
    assert failure.advice


def test_s3fs_hides_credential_errors_as_permission_errors_and_the_code_tells_them_apart() -> None:
    expired, denied = s3fs_error(403, "ExpiredToken"), s3fs_error(403, "AccessDenied")
    assert isinstance(expired, PermissionError) and isinstance(denied, PermissionError)
    assert classify_read_error(expired).transient
    assert "credentials" in classify_read_error(expired).advice
    assert "NTP" in classify_read_error(s3fs_error(403, "RequestTimeTooSkewed")).advice
    assert "throttling" in classify_read_error(s3fs_error(503, "SlowDown")).advice
    fact = classify_read_error(denied)
    assert not fact.transient
    assert fact.reason.startswith("unreadable: access denied to this object (AccessDenied")


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [(404, "NoSuchKey", "missing"), (403, "AccessDenied", "unreadable"),
     (403, "InvalidObjectState", "unreadable")],
)  # fmt: skip
def test_facts_about_one_object_become_error_rows(status: int, code: str, kind: str) -> None:
    failure = classify_read_error(s3fs_error(status, code))
    assert not failure.transient
    assert failure.reason.split(":", 1)[0] == kind
    assert code in failure.reason


def test_the_s3_code_is_found_through_implicit_chaining_too() -> None:
    try:
        try:
            raise s3fs_error(403, "ExpiredToken")
        except PermissionError:
            raise OSError("raised while handling it") from None  # only __context__ is left
    except OSError as outer:
        caught = outer
    assert caught.__cause__ is None and caught.__context__ is not None
    assert classify_read_error(caught).code == "ExpiredToken"


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
        ConnectionClosedError(endpoint_url="http://127.0.0.1:9"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        TimeoutError("read timed out"),
        aiohttp.ClientPayloadError("Response payload is not completed"),  # reset mid-body
        OSError(errno.EIO, "Input/output error"),
        OSError(errno.ESTALE, "Stale file handle"),
        PermissionError("no errno and no S3 code: not known to be about the object"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_network_and_machine_trouble_is_weather(exc: BaseException) -> None:
    assert classify_read_error(exc).transient


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), "missing"),
        (FileNotFoundError("an fsspec backend's, without errno"), "missing"),
        (PermissionError(errno.EACCES, "Permission denied"), "unreadable"),
        (OSError(errno.ELOOP, "Too many levels of symbolic links"), "not_a_regular_file"),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), "not_a_regular_file"),
        (TooLargeError(10, 5), "too_large"),
        (NotRegularFileError("a FIFO"), "not_a_regular_file"),
    ],
)
def test_local_facts_become_error_rows(exc: BaseException, kind: str) -> None:
    failure = classify_read_error(exc)
    assert not failure.transient
    assert failure.reason.split(":", 1)[0] == kind


def test_transient_read_error_names_object_code_and_remedy_and_pickles() -> None:
    exc = s3fs_error(403, "ExpiredToken", "The provided token has expired.")
    err = faults.transient_error("s3://b/k.jpg", exc, classify_read_error(exc))
    text = str(err)
    assert "s3://b/k.jpg" in text and "ExpiredToken" in text and "refresh" in text
    assert (err.uri, err.code) == ("s3://b/k.jpg", "ExpiredToken")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, TransientReadError) and (back.uri, back.code) == (err.uri, err.code)
    assert str(back) == text


# ------------------------------------------------------------- only regular files, a cap


@pytest.fixture
def odd_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A FIFO, a socket, a symlink loop and a link to /dev/zero, all named like photos."""
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(b"\xff\xd8good")
    (folder / "link.jpg").symlink_to("good.jpg")
    (folder / "x.jpg").symlink_to("x.jpg")
    os.mkfifo(folder / "y.jpg")
    (folder / "z.jpg").symlink_to("/dev/zero")
    (folder / "dir.jpg").mkdir()  # a folder named like a photo: walked into, not listed
    monkeypatch.chdir(folder)  # a unix socket path must be short: bind a relative one
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock.jpg")
    try:
        yield folder
    finally:
        sock.close()


@pytest.mark.timeout(10)  # a FIFO opened for reading would block here forever
def test_only_regular_files_are_read_and_the_rest_are_error_rows(odd_folder: Path) -> None:
    names = ["good.jpg", "link.jpg", "x.jpg", "y.jpg", "z.jpg", "sock.jpg"]
    out = read_many([str(odd_folder / n) for n in names])
    assert out[:2] == [b"\xff\xd8good", b"\xff\xd8good"]  # a link to a photo is a photo
    reasons = [read_error_reason(o) for o in out[2:]]  # type: ignore[arg-type]
    assert all(r.startswith("not_a_regular_file: ") for r in reasons), reasons
    assert "symbolic link loop" in reasons[0]
    assert "FIFO" in reasons[1]
    assert "character device" in reasons[2]
    assert "socket" in reasons[3]


def test_the_folder_listing_includes_odd_objects_so_each_gets_a_row(odd_folder: Path) -> None:
    listed = [Path(u).name for u in list_source(str(odd_folder)).uris]
    assert sorted(listed) == ["good.jpg", "link.jpg", "sock.jpg", "x.jpg", "y.jpg", "z.jpg"]


def test_files_over_the_byte_cap_are_too_large_rows_and_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    big.write_bytes(b"x" * 1001)
    small.write_bytes(b"x" * 1000)
    opened: list[str] = []
    real_open = os.open

    def spy_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    out = read_many([str(big), str(small)], max_bytes=1000)
    assert isinstance(out[0], TooLargeError)
    assert read_error_reason(out[0]).startswith("too_large: 1001 bytes > max_bytes 1000")
    assert out[1] == b"x" * 1000
    assert opened == [str(small)]  # the big one was decided from its size, never opened
    assert read_many([str(big)], max_bytes=None) == [b"x" * 1001]


def test_a_file_that_grows_past_the_cap_while_read_is_still_too_large(tmp_path: Path) -> None:
    path = tmp_path / "growing.jpg"
    path.write_bytes(b"x" * 10)
    assert isinstance(reading._refuse(os.stat(path), 9), TooLargeError)
    assert reading._refuse(os.stat(path), 10) is None


def test_local_disk_trouble_fails_the_read_instead_of_writing_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x")

    def eio(path: str, max_bytes: int | None) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(reading, "_read_local", eio)
    with pytest.raises(TransientReadError, match=r"a\.jpg failed with EIO") as info:
        read_many([str(path)])
    assert info.value.code == "EIO"


# ------------------------------------------------------------------------------ odd names


def test_names_are_read_literally(tmp_path: Path) -> None:
    names = ["a::b.jpg", "#.jpg", "q?.jpg", "sp ace.jpg", "ünï.jpg", "img[1]*.jpg", "b.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "a").write_bytes(b"decoy: fsspec's chain parsing would look here")
    listed = list_source(str(tmp_path)).uris
    assert sorted(Path(u).name for u in listed) == sorted(names)
    assert read_many(listed) == [Path(u).name.encode() for u in listed]
    assert read_many([f"file://{tmp_path}/a::b.jpg"]) == [b"a::b.jpg"]


def test_a_name_that_is_not_utf8_is_counted_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "ok.jpg").write_bytes(b"x")
    root = os.fsencode(tmp_path)
    for raw in (b"caf\xe9.jpg", b"r\xe9sum\xe9.txt"):
        with open(root + b"/" + raw, "wb") as f:
            f.write(b"x")
    listing = list_source(str(tmp_path))
    assert listing.uris == [str(tmp_path / "ok.jpg")]
    assert listing.bad_names.count == 1
    assert listing.bad_names.examples == [f"{tmp_path}/caf\\xe9.jpg"]
    assert listing.not_images.count == 1  # the .txt: skipped for its extension, name aside
    import pyarrow as pa

    pa.array(listing.uris + listing.bad_names.examples, type=pa.string())  # all UTF-8


def test_files_skipped_for_their_extension_are_counted_with_examples(tmp_path: Path) -> None:
    for i in range(8):
        (tmp_path / f"notes_{i}.txt").write_bytes(b"x")
    (tmp_path / "clip.MOV").write_bytes(b"x")
    (tmp_path / "photo.jpg").write_bytes(b"x")
    listing = list_source(str(tmp_path))
    assert [Path(u).name for u in listing.uris] == ["photo.jpg"]
    assert listing.not_images.count == 9
    assert len(listing.not_images.examples) == sources.N_EXAMPLES
    assert all(Path(e).parent == tmp_path for e in listing.not_images.examples)


def test_image_extensions_follow_what_pillow_decodes_for_us() -> None:
    for name in ["a.jpg", "B.JPEG", "c.mpo", "d.png", "e.webp", "f.tif", "g.avif", "h.HEIC"]:
        assert is_image_name(name), name
    for name in ["a.txt", "b.pdf", "c.eps", "d.psd", "e.mov", "f", "g.jpg.part"]:
        assert not is_image_name(name), name


# ------------------------------------------------------- the whole pipeline on odd objects


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-model-sources")
    return register_tiny_model(root / "home", root / "work")


def mpo_bytes() -> bytes:
    frames = [Image.new("RGB", (48, 40), c) for c in ((200, 30, 30), (30, 30, 200))]
    buf = io.BytesIO()
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def noisy_jpeg(size: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(300)  # training the tiny model included; the FIFO must not hang it
def test_a_folder_of_odd_objects_plans_and_tags_with_one_row_each(
    tiny: TinyModel, odd_folder: Path, tmp_path: Path
) -> None:
    good = shape_images(8, seed=3)
    tagged_names = ["good.jpg", "a::b.jpg", "#.jpg", "q?.jpg", "sp ace.jpg", "ünï.jpg"]
    for name, data in zip(tagged_names, good, strict=False):
        (odd_folder / name).write_bytes(data)
    (odd_folder / "photo2.jpg").write_bytes(good[7])
    (odd_folder / "a").write_bytes(b"decoy")
    (odd_folder / "camera.mpo").write_bytes(mpo_bytes())
    (odd_folder / "huge.jpg").write_bytes(noisy_jpeg(300))
    (odd_folder / "notes.txt").write_text("not an image")
    with open(os.fsencode(odd_folder) + b"/caf\xe9.jpg", "wb") as f:
        f.write(good[6])
    max_bytes = 20_000
    assert len(noisy_jpeg(300)) > max_bytes > len(mpo_bytes())
    params = TagParams(
        source=str(odd_folder), home=str(tiny.home), out=str(tmp_path / "out"),
        shard_size=5, batch_size=4, decode_workers=1, max_bytes=max_bytes,
    )  # fmt: skip
    tagger = loading.load_tagger(params)
    assert tagger.max_bytes == max_bytes

    plan = plan_run(params)
    results = [tag_shard(spec, tagger, run_id=plan.run_id) for spec in plan.shards]
    summary = summarize_run(plan, results)

    table = read_tags(plan.partition_uri)
    rows = {Path(r["image_uri"]).name: r["error"] for r in table.to_pylist()}
    assert table.num_rows == len(rows) == summary.listed == 14  # one row per listed image
    expected_tagged = [*tagged_names, "photo2.jpg", "link.jpg", "camera.mpo"]
    assert {n: rows[n] for n in expected_tagged} == dict.fromkeys(expected_tagged)
    for name in ["x.jpg", "y.jpg", "z.jpg", "sock.jpg"]:
        assert rows[name].startswith("not_a_regular_file: "), (name, rows[name])
    assert rows["huge.jpg"].startswith(f"too_large: {len(noisy_jpeg(300))} bytes > max_bytes")
    assert validate_tags_table(table, model_version=plan.model_version) == []
    contract = yaml.safe_load((REPO / "data_contracts" / "tags_output.yaml").read_text())
    error_prop = next(p for p in contract["schema"][0]["properties"] if p["name"] == "error")
    pattern = re.compile(error_prop["logicalTypeOptions"]["pattern"])
    assert all(pattern.fullmatch(e) for e in rows.values() if e is not None), rows
    assert (summary.tagged, summary.failed) == (9, 5)
    assert summary.error_kinds == {"not_a_regular_file": 4, "too_large": 1}
    assert (summary.not_images, summary.not_image_examples) == (
        2,
        sorted([str(odd_folder / "a"), str(odd_folder / "notes.txt")]),
    )
    assert (summary.bad_names, summary.bad_name_examples) == (1, [f"{odd_folder}/caf\\xe9.jpg"])
    text = summary.format_text()
    assert "not listed: 2 not images" in text and "not listed: 1 names not valid UTF-8" in text
    manifest = summary.to_dict()
    assert (manifest["not_images"], manifest["bad_names"]) == (2, 1)
    assert json.loads(json.dumps(manifest))["bad_name_examples"] == summary.bad_name_examples


class _Body:
    """aiobotocore's streaming body, as far as `_s3_get` uses it."""

    def __init__(self, fail: bool) -> None:
        self.fail, self.closed, self.was_read = fail, False, False

    async def read(self) -> bytes:
        self.was_read = True
        if self.fail:
            raise aiohttp.ClientPayloadError("Response payload is not completed")
        return b"data"

    def close(self) -> None:
        self.closed = True


class _FakeS3:
    """Answers GetObject with a body that breaks mid-stream for the first `failures` calls."""

    def __init__(self, failures: int) -> None:
        self.failures, self.bodies = failures, []  # type: ignore[var-annotated]

    def split_path(self, path: str) -> tuple[str, str, None]:
        bucket, _, key = path.partition("/")
        return bucket, key, None

    async def _call_s3(self, method: str, **kwargs: object) -> dict[str, object]:
        assert method == "get_object" and kwargs == {"Bucket": "b", "Key": "k.jpg"}
        self.bodies.append(_Body(fail=len(self.bodies) < self.failures))
        return {"Body": self.bodies[-1], "ContentLength": 4}


def test_a_reset_while_the_body_streams_is_retried_and_then_is_weather() -> None:
    fs = _FakeS3(failures=reading._BODY_READ_ATTEMPTS - 1)
    assert asyncio.run(reading._s3_get(fs, "b/k.jpg", 100)) == b"data"
    assert len(fs.bodies) == reading._BODY_READ_ATTEMPTS and all(b.closed for b in fs.bodies)

    fs = _FakeS3(failures=reading._BODY_READ_ATTEMPTS)
    with pytest.raises(aiohttp.ClientPayloadError) as info:
        asyncio.run(reading._s3_get(fs, "b/k.jpg", 100))
    assert classify_read_error(info.value).transient  # read_many raises TransientReadError


def test_an_object_over_the_cap_is_refused_from_its_headers_without_reading_the_body() -> None:
    fs = _FakeS3(failures=0)
    got = asyncio.run(reading._s3_get(fs, "b/k.jpg", 3))
    assert isinstance(got, TooLargeError) and "4 bytes > max_bytes 3" in got.reason
    assert [(b.was_read, b.closed) for b in fs.bodies] == [(False, True)]
