"""multitag.storage: exclusive create, S3's 409 conflict retried, the conditional-write probe.

The S3 side of each (real HTTP through the fault proxy) is in
tests/integration/test_exactly_once.py; here the local disk and the error classification.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from multitag import storage
from multitag.storage import (
    honours_exclusive_create,
    is_conditional_conflict,
    remove,
    store_description,
    write_bytes_atomic,
)


def s3fs_error(status: int, code: str, **extra: str) -> OSError:
    """What s3fs raises for an S3 error answer: botocore's ClientError, translated."""
    response = {
        "Error": {"Code": code, "Message": f"{code} message", **extra},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return translate_boto_error(ClientError(response, "PutObject"))


def test_exclusive_create_on_local_disk_refuses_an_existing_name(tmp_path: Path) -> None:
    target = tmp_path / "part.bin"
    write_bytes_atomic(str(target), b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_bytes_atomic(str(target), b"second", exclusive=True)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["part.bin"]  # no temp file left behind


def test_conflict_409_is_recognised_and_412_is_file_exists() -> None:
    conflict = s3fs_error(409, "ConditionalRequestConflict")
    assert type(conflict) is OSError and is_conditional_conflict(conflict)  # s3fs: EIO
    exists = s3fs_error(412, "PreconditionFailed", Condition="If-None-Match")
    assert isinstance(exists, FileExistsError) and not is_conditional_conflict(exists)
    for status, code in [(503, "SlowDown"), (403, "ExpiredToken"), (500, "InternalError")]:
        assert not is_conditional_conflict(s3fs_error(status, code)), code
    assert not is_conditional_conflict(ConnectionResetError("reset"))
    wrapped = RuntimeError("while writing")
    wrapped.__cause__ = conflict
    assert is_conditional_conflict(wrapped)


class _ScriptedFs:
    """An fsspec-like `open(path, "xb")` that fails with the scripted errors, then writes."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.opens = 0
        self.written: bytes | None = None

    @contextlib.contextmanager
    def open(self, path: str, mode: str) -> Iterator[io.BytesIO]:
        assert mode == "xb"
        self.opens += 1
        buf = io.BytesIO()
        yield buf
        if self.errors:
            raise self.errors.pop(0)  # raised at commit, as s3fs does on close
        self.written = buf.getvalue()


def test_a_409_conflict_is_retried_with_backoff_then_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    fs = _ScriptedFs([s3fs_error(409, "ConditionalRequestConflict")] * 2)
    storage._create_exclusive(fs, "bucket/key", b"data")  # type: ignore[arg-type]
    assert (fs.opens, fs.written) == (3, b"data")
    assert len(slept) == 2 and slept[0] < slept[1]


def test_conflicts_that_never_end_and_other_errors_are_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    tries = len(storage.CONFLICT_RETRY_DELAYS_S) + 1
    endless = _ScriptedFs([s3fs_error(409, "ConditionalRequestConflict")] * (tries + 5))
    with pytest.raises(OSError, match="ConditionalRequestConflict"):
        storage._create_exclusive(endless, "bucket/key", b"data")  # type: ignore[arg-type]
    assert endless.opens == tries
    for error in [
        s3fs_error(412, "PreconditionFailed", Condition="If-None-Match"),
        s3fs_error(503, "SlowDown"),
    ]:
        once = _ScriptedFs([error])
        with pytest.raises(type(error)):
            storage._create_exclusive(once, "bucket/key", b"data")  # type: ignore[arg-type]
        assert once.opens == 1  # a 412 is an answer, and throttling is s3fs's to retry


def test_an_empty_exclusive_create_on_an_object_store_is_refused() -> None:
    """s3fs writes a 0-byte file with a plain PUT (no If-None-Match): it would overwrite."""
    with pytest.raises(ValueError, match="at least one byte"):
        write_bytes_atomic("memory://bucket/empty.bin", b"", exclusive=True)


def test_local_disk_honours_exclusive_create_without_probing(tmp_path: Path) -> None:
    assert honours_exclusive_create(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing written: link(2) is known to refuse
    assert store_description(str(tmp_path)).startswith("local disk")


def test_remove_ignores_a_missing_file(tmp_path: Path) -> None:
    target = tmp_path / "x"
    target.write_bytes(b"1")
    remove(str(target))
    remove(str(target))
    assert not target.exists()
