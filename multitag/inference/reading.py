"""Reading images' bytes: regular files only, under a byte cap, one GET per S3 object.

Why a module of its own: this is where a hostile file (a FIFO, a symlink to /dev/zero, a
100 GB "photo") or a failing store meets the pipeline; each read ends as bytes, a fact
(an OSError that becomes the image's error row) or weather (`TransientReadError`), as
`multitag.inference.faults` classifies it.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from multitag.inference.faults import (
    NotRegularFileError,
    ReadFailure,
    TooLargeError,
    UnreadableImageError,
    classify_read_error,
    transient_error,
)
from multitag.inference.sources import local_path
from multitag.storage import fs_and_path

# Why 100 MiB: camera JPEGs are 3-25 MB and even a 50 MP photo stays under 40 MB; a file
# over this is a video, a disk image or an uncompressed scan (raise max_bytes for those).
DEFAULT_MAX_BYTES = 100 * 2**20
_S3_FETCH_CONCURRENCY = 32
_BODY_READ_ATTEMPTS = 3  # a reset mid-body: s3fs retried the request, we retry the body


# ======================================================================== reading bytes


def read_many(
    uris: Sequence[str], *, max_bytes: int | None = DEFAULT_MAX_BYTES
) -> list[bytes | OSError]:
    """The bytes of each URI, or the fact (an OSError) that explains why there are none.

    Facts: gone after listing, permission/access denied on it, not a regular file, more than
    `max_bytes` (decided from its size, without reading it; None: no cap). Anything else
    raises TransientReadError (after s3fs's own retries), so the whole shard is retried.
    Object stores are fetched concurrently (one GET per object, up to 32 in flight).
    """
    out: list[bytes | OSError] = [b""] * len(uris)
    by_protocol: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        proto = "file" if local_path(uri) is not None else uri.partition("://")[0]
        by_protocol.setdefault(proto, []).append(i)
    for proto, idxs in by_protocol.items():
        if proto == "file":
            for i in idxs:
                out[i] = _read_local_or_raise(uris[i], max_bytes)
            continue
        fs, _ = fs_and_path(f"{proto}://")  # never the object's URI: `::` would chain
        paths = [uris[i][len(proto) + 3 :] for i in idxs]
        if getattr(fs, "async_impl", False):
            from fsspec.asyn import sync

            blobs = sync(fs.loop, _fetch_async, fs, paths, max_bytes, _S3_FETCH_CONCURRENCY)
        else:
            blobs = [_read_sync(fs, p, max_bytes) for p in paths]
        for i, blob in zip(idxs, blobs, strict=True):
            if isinstance(blob, _Weather):
                raise transient_error(uris[i], blob.exc, blob.failure) from blob.exc
            out[i] = blob
    return out


@dataclass(frozen=True)
class _Weather:
    exc: BaseException
    failure: ReadFailure


def _fact_or_weather(exc: BaseException) -> OSError | _Weather:
    failure = classify_read_error(exc)
    if failure.transient:
        return _Weather(exc, failure)
    if isinstance(exc, OSError):
        return exc
    return UnreadableImageError(failure.reason)


def _read_local_or_raise(uri: str, max_bytes: int | None) -> bytes | OSError:
    path = local_path(uri) or uri
    try:
        return _read_local(path, max_bytes)
    except Exception as exc:
        got = _fact_or_weather(exc)
        if isinstance(got, _Weather):
            raise transient_error(uri, exc, got.failure) from exc
        return got


def _read_local(path: str, max_bytes: int | None) -> bytes | OSError:
    """A regular file's bytes; never opens a FIFO/socket/device, never reads past the cap.

    stat first (follows symlinks: a link to a photo is fine, a loop raises ELOOP), so a FIFO
    or /dev/zero is refused without being opened; then open non-blocking and fstat the
    descriptor, so a file swapped for one of those in between is refused too.
    """
    st = os.stat(path)
    refused = _refuse(st, max_bytes)
    if refused is not None:
        return refused
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        refused = _refuse(st, max_bytes)
        if refused is not None:
            return refused
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(-1 if max_bytes is None else max_bytes + 1)
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:  # grew after the fstat
        return TooLargeError(len(data), max_bytes)
    return data


def _refuse(st: os.stat_result, max_bytes: int | None) -> OSError | None:
    if not stat.S_ISREG(st.st_mode):
        return NotRegularFileError(_file_kind(st.st_mode))
    if max_bytes is not None and st.st_size > max_bytes:
        return TooLargeError(st.st_size, max_bytes)
    return None


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISFIFO, "a FIFO/named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ]
    return next((what for test, what in kinds if test(mode)), f"file mode {mode:o}")


def _read_sync(fs: Any, path: str, max_bytes: int | None) -> bytes | OSError | _Weather:
    try:
        if max_bytes is not None:
            size = fs.size(path)
            if size is not None and size > max_bytes:
                return TooLargeError(int(size), max_bytes)
        return fs.cat_file(path)
    except Exception as exc:
        return _fact_or_weather(exc)


async def _fetch_async(
    fs: Any, paths: list[str], max_bytes: int | None, limit: int
) -> list[bytes | OSError | _Weather]:
    """Fetch concurrently; once one read is weather, start no more (the shard will fail)."""
    sem = asyncio.Semaphore(limit)
    stop = asyncio.Event()

    async def one(path: str) -> bytes | OSError | _Weather | None:
        async with sem:
            if stop.is_set():
                return None
            try:
                if hasattr(fs, "_call_s3"):
                    return await _s3_get(fs, path, max_bytes)
                return await _generic_get(fs, path, max_bytes)
            except Exception as exc:
                got = _fact_or_weather(exc)
                if isinstance(got, _Weather):
                    stop.set()
                return got

    blobs = await asyncio.gather(*(one(p) for p in paths))
    weather = next((b for b in blobs if isinstance(b, _Weather)), None)
    if weather is not None:
        return [weather] * len(paths)  # the caller raises on the first
    return [b for b in blobs if b is not None]


async def _s3_get(fs: Any, path: str, max_bytes: int | None) -> bytes | OSError:
    """One GetObject: the size comes from its headers, so an object over the cap is never
    downloaded, and no HEAD is spent (s3fs's own `_cat_file` asks for the size first).

    `_call_s3` is s3fs's coroutine form of `call_s3` (fsspec's async convention): it retries
    throttling and connection errors itself and raises s3fs's translated errors, with the
    ClientError as `__cause__`. A reset while the body streams is retried here.
    """
    bucket, key, version = fs.split_path(path)
    kw = {"VersionId": version} if version else {}
    for attempt in range(_BODY_READ_ATTEMPTS):
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kw)
        body = resp["Body"]
        try:
            size = resp.get("ContentLength")
            if max_bytes is not None and size is not None and int(size) > max_bytes:
                return TooLargeError(int(size), max_bytes)
            return bytes(await body.read())
        except Exception as exc:
            if attempt + 1 == _BODY_READ_ATTEMPTS or not classify_read_error(exc).transient:
                raise
            await asyncio.sleep(0.2 * 2**attempt)
        finally:
            body.close()
    raise AssertionError("unreachable")  # the loop returns or raises


async def _generic_get(fs: Any, path: str, max_bytes: int | None) -> bytes | OSError:
    if max_bytes is not None:
        size = await fs._size(path)
        if size is not None and size > max_bytes:
            return TooLargeError(int(size), max_bytes)
    return bytes(await fs._cat_file(path))
