"""Where the images come from: listing a folder or an s3:// prefix, and reading their bytes.

Why a module of its own: the listing and reading rules (which names are images, which read
errors are facts about an object and which are weather worth a retry) are shared by
planning, the tagger and the fast-path sampling, and none of them needs a model. Also home
of the tagging error types, as the bottom layer of the tagging pipeline.

Facts and weather (see DESIGN.md, "Faults"): a read failure becomes the image's error row
only when it is a fact about that object (gone after listing, access denied on it, not a
regular file, over the byte cap). Everything else (expired or wrong credentials, clock skew,
throttling, 5xx, resets, timeouts, a code we do not know) raises `TransientReadError`, so the
shard writes nothing, fails, and is retried; a rerun tags those images.

Names are taken literally: local paths never go through fsspec's URL parsing (which reads
`a::b.jpg` as a chain of two filesystems), and an S3 key is sent to s3fs as `bucket/key`
exactly as listed. A local file whose name is not valid UTF-8 cannot be an `image_uri`
(Arrow strings are UTF-8, and an escaped stand-in could name another file): it is left out
of the listing and counted with examples, so the run goes on and the summary says which to
rename.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import posixpath
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from multitag.errors import InputError, RunFailedError
from multitag.inference.imaging import decodable_extensions
from multitag.storage import fs_and_path, unstrip

# Listed besides what Pillow decodes for us (imaging.decodable_extensions: its own registry,
# MPO included): HEIC/HEIF. Pillow cannot decode those, but listing them makes phone photos
# show up as "unrecognised" error rows instead of vanishing from the counts.
UNDECODED_PHOTO_EXTENSIONS = frozenset({".heic", ".heif"})
# Why 100 MiB: camera JPEGs are 3-25 MB and even a 50 MP photo stays under 40 MB; a file
# over this is a video, a disk image or an uncompressed scan (raise max_bytes for those).
DEFAULT_MAX_BYTES = 100 * 2**20
N_EXAMPLES = 5  # skipped files named in a summary, per reason
_S3_FETCH_CONCURRENCY = 32
_BODY_READ_ATTEMPTS = 3  # a reset mid-body: s3fs retried the request, we retry the body
_LOCAL_PROTOCOLS = ("file://", "local://")
log = logging.getLogger(__name__)


class TaggingError(InputError):
    """Tagging cannot start or continue; the message says what to change."""


class SourceUnavailableError(RunFailedError, TaggingError):
    """The image source could not be listed (unreachable endpoint, denied, bad credentials)."""


class TransientReadError(RunFailedError, TaggingError):
    """Reading an image failed for a reason that is not a fact about it: retry the shard.

    `uri` and `code` (the S3 error code, an errno name or an exception type) say which object
    and why. Pickles with its attributes (Prefect and Dask move exceptions between processes).
    """

    def __init__(self, message: str, *, uri: str = "", code: str = "") -> None:
        super().__init__(message)
        self.uri = uri
        self.code = code


class UnreadableImageError(InputError, OSError):
    """A fact about one object that keeps it from being read; `reason` is its error row."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotRegularFileError(UnreadableImageError):
    """A FIFO, socket, device, directory or symlink loop listed under an image name."""

    def __init__(self, what: str) -> None:
        super().__init__(f"not_a_regular_file: {what}, not a regular file; it is never read")


class TooLargeError(UnreadableImageError):
    """More bytes than `max_bytes`, decided from the file's size before reading it."""

    def __init__(self, size: int, max_bytes: int) -> None:
        super().__init__(
            f"too_large: {size} bytes > max_bytes {max_bytes}; not read (raise max_bytes to tag it)"
        )


# ================================================================================ listing


@dataclass(frozen=True)
class SkippedFiles:
    """Files a listing left out for one reason: how many, and the first few by name."""

    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SourceListing:
    """Every image under a source, sorted, and what was left out of it and why."""

    uris: list[str]
    not_images: SkippedFiles  # extension not an image format (e.g. .txt, .mov)
    bad_names: SkippedFiles  # local names that are not valid UTF-8 (shown with \\x escapes)


class _Skips:
    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, name: str) -> None:
        self.count += 1
        if len(self.examples) < N_EXAMPLES:
            self.examples.append(name)

    def frozen(self) -> SkippedFiles:
        return SkippedFiles(self.count, sorted(self.examples))


def is_image_name(name: str) -> bool:
    """Image files are recognised by extension, case-insensitively (IMG_001.JPG counts)."""
    ext = posixpath.splitext(name)[1].lower()
    return ext in UNDECODED_PHOTO_EXTENSIONS or ext in decodable_extensions()


def list_images(source: str) -> Iterator[str]:
    """Every image under `source` (recursively), as full URIs in sorted order.

    See `list_source` (which also says what was skipped).
    """
    return iter(list_source(source).uris)


def list_source(source: str) -> SourceListing:
    """Every image under `source` (recursively) as sorted URIs, plus the files left out.

    Local folders yield absolute paths, s3:// prefixes `s3://bucket/key`. S3 is listed page
    by page keeping only the keys (never the per-object metadata), so a 100k-object prefix
    costs the list of its image keys and no more. A missing folder, or a prefix with no
    objects at all, raises FileNotFoundError (a typo must not look like "nothing to tag").
    """
    not_images, bad_names = _Skips(), _Skips()
    local = local_path(source)
    if local is not None:
        uris = _list_local(local, not_images, bad_names)
    else:
        fs, path = fs_and_path(source)
        if hasattr(fs, "call_s3"):
            uris = _list_s3_or_explain(fs, path, source, not_images)
        else:
            if not fs.exists(path):
                raise FileNotFoundError(f"image source {source} does not exist")
            uris = []
            for p in fs.find(path):
                if is_image_name(p):
                    uris.append(unstrip(fs, p))
                else:
                    not_images.add(unstrip(fs, p))
    uris.sort()
    if bad_names.count:
        log.warning(
            "%d file(s) under %s have names that are not valid UTF-8 and were not listed "
            "(rename them to tag them), e.g. %s",
            bad_names.count,
            source,
            bad_names.examples,
        )
    return SourceListing(uris, not_images.frozen(), bad_names.frozen())


def local_path(uri: str) -> str | None:
    """The local path a URI names (a bare path, file:// or local://), else None.

    Why not fsspec: its URL parsing treats `::` as a filesystem chain and would read another
    file for `/photos/a::b.jpg`; a local path is used exactly as written.
    """
    if "://" not in uri:
        return uri
    for prefix in _LOCAL_PROTOCOLS:
        if uri.startswith(prefix):
            return uri[len(prefix) :]
    return None


def _list_local(root: str, not_images: _Skips, bad_names: _Skips) -> list[str]:
    if os.path.isfile(root):
        return [os.path.abspath(root)] if is_image_name(root) else []
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image source {root} is not a folder (or does not exist)")
    found: list[str] = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.abspath(os.path.join(folder, name))
            if not _is_utf8(path):
                if is_image_name(name):
                    bad_names.add(_escaped(path))
                else:
                    not_images.add(_escaped(path))
            elif is_image_name(name):
                found.append(path)
            else:
                not_images.add(path)
    return found


def _is_utf8(name: str) -> bool:
    """os.walk hands undecodable bytes back as lone surrogates; Arrow refuses those."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(name: str) -> str:
    """A printable stand-in for a name with undecodable bytes (b'caf\\xe9' -> 'caf\\\\xe9')."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _list_s3_or_explain(fs: Any, path: str, source: str, not_images: _Skips) -> list[str]:
    try:
        return _list_s3(fs, path, source, not_images)
    except (FileNotFoundError, TaggingError):
        raise
    except Exception as e:
        raise SourceUnavailableError(
            f"cannot list {source}: {type(e).__name__}: {e}. Check the bucket name, the "
            "endpoint (AWS_ENDPOINT_URL) and the credentials (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) of this worker"
        ) from e


def _list_s3(fs: Any, path: str, source: str, not_images: _Skips) -> list[str]:
    bucket, key, _ = fs.split_path(path)
    if not bucket:
        raise TaggingError(f"image source {source} names no bucket; use s3://bucket/prefix")
    prefix = key.rstrip("/") + "/" if key else ""
    keys: list[str] = []
    n_objects = 0
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            n_objects += 1
            name = obj["Key"]
            if name.endswith("/"):
                continue  # a "folder" marker object, not a file
            if is_image_name(name):
                keys.append(f"s3://{bucket}/{name}")
            else:
                not_images.add(f"s3://{bucket}/{name}")
        if not page.get("IsTruncated"):
            break
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
    if n_objects == 0:
        raise FileNotFoundError(f"no objects under {source} (s3://{bucket}/{prefix}); check it")
    return keys


def default_dataset_name(source: str) -> str:
    """The last folder of the source (`s3://b/photos/2024` -> `2024`), made path-safe."""
    path = local_path(source)
    if path is None:
        _, path = fs_and_path(source)
    base = posixpath.basename(path.rstrip("/")) or path.strip("/").split("/")[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")
    if not name:
        raise TaggingError(f"cannot derive a dataset name from {source!r}; pass dataset_name")
    return name


# ======================================================================= classifying errors


@dataclass(frozen=True)
class ReadFailure:
    """What a read error means: a fact about the object (an error row) or weather (retry).

    `code`: the S3 error code, an errno name or the exception type. `reason`: for a fact,
    the error-row text; for weather, what happened. `advice`: what an operator can do.
    """

    transient: bool
    code: str
    reason: str
    advice: str = ""


# S3 codes that are facts about one object. Everything else S3 says (credentials, clock,
# throttling, 5xx, conflicts, and codes we do not know) is retried, never recorded.
_S3_FACTS = {
    "NoSuchKey": "missing: object not found (deleted after listing?)",
    "404": "missing: object not found (deleted after listing?)",
    "NotFound": "missing: object not found (deleted after listing?)",
    "AccessDenied": "unreadable: access denied to this object",
    "InvalidObjectState": "unreadable: object is archived (restore it to tag it)",
}
_CREDENTIAL_CODES = frozenset({
    "ExpiredToken", "ExpiredTokenException", "InvalidAccessKeyId", "InvalidToken",
    "SignatureDoesNotMatch", "TokenRefreshRequired", "InvalidClientTokenId", "403",
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
})  # fmt: skip
_THROTTLE_CODES = frozenset({
    "SlowDown", "503", "ServiceUnavailable", "Throttling", "ThrottlingException",
    "TooManyRequests", "429", "RequestLimitExceeded",
})  # fmt: skip
_CONFLICT_CODES = frozenset({"409", "ConditionalRequestConflict", "OperationAborted"})
_NETWORK = (
    "the store could not be reached or stopped answering: check the endpoint "
    "(AWS_ENDPOINT_URL) and the network; the shard is retried"
)


def _advice(code: str, status: int = 0) -> str:
    """What an operator can do about a transient read error with this code."""
    if code in _CREDENTIAL_CODES:
        return (
            "the store refused this worker's credentials: refresh them (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN or AWS_PROFILE) and rerun"
        )
    if code == "RequestTimeTooSkewed":
        return "this machine's clock is more than 15 minutes off the store's: sync it (NTP)"
    if code in _THROTTLE_CODES:
        return (
            "the store is throttling requests: the shard is retried with backoff; lower "
            "max_concurrency if it keeps happening"
        )
    if code in _CONFLICT_CODES:
        return "a conflicting operation on the object was in progress: the shard is retried"
    if code == "NoSuchBucket":
        return "the bucket is gone or not at this endpoint: check AWS_ENDPOINT_URL"
    if status >= 500 or code == "InternalError":
        return "the store failed on its side (5xx): the shard is retried"
    return ""


_LOCAL_NOT_REGULAR = {
    errno.ELOOP: "a symbolic link loop",
    errno.ENXIO: "a socket or a device without a reader",
    errno.EISDIR: "a directory",
    errno.ENODEV: "a device",
}


def classify_read_error(exc: BaseException) -> ReadFailure:
    """A fact about the object (an error row) or weather (retry the shard)?

    Pure: looks only at the exception, its errno, and the botocore ClientError s3fs keeps as
    `__cause__` (s3fs turns ExpiredToken, SignatureDoesNotMatch and AccessDenied alike into
    PermissionError; the S3 code tells them apart). Unknown means weather: recording a
    transient failure as a fact loses the image for good, retrying a fact costs a retry.
    """
    if isinstance(exc, UnreadableImageError):
        return ReadFailure(False, type(exc).__name__, exc.reason)
    s3 = _s3_error(exc)
    if s3 is not None:
        return _classify_s3(*s3)
    if isinstance(exc, OSError) and exc.errno is not None:
        return _classify_errno(exc)
    if isinstance(exc, FileNotFoundError):  # fsspec backends raise it without an errno
        return ReadFailure(False, "FileNotFoundError", "missing: file not found")
    name = type(exc).__name__
    return ReadFailure(True, name, _one_line(f"{name}: {exc}"), _advice(name) or _NETWORK)


def _s3_error(exc: BaseException) -> tuple[str, int, str] | None:
    """(code, HTTP status, message) of the botocore ClientError behind `exc`, if any."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            err = response["Error"]
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = str(err.get("Code") or status or "unknown")
            return code, int(status), str(err.get("Message") or "")
        cur = cur.__cause__ or cur.__context__
    return None


def _classify_s3(code: str, status: int, message: str) -> ReadFailure:
    text = _one_line(f"{code}: {message}" if message else code)
    if code in _S3_FACTS:
        return ReadFailure(False, code, f"{_S3_FACTS[code]} ({text})")
    advice = _advice(code, status) or "not known to be a fact about the object; retried"
    return ReadFailure(True, code, text, advice)


def _classify_errno(exc: OSError) -> ReadFailure:
    num = exc.errno or 0
    name = errno.errorcode.get(num, str(num))
    detail = _one_line(exc.strerror or str(exc))
    if num in (errno.ENOENT, errno.ENOTDIR):
        return ReadFailure(False, name, "missing: file not found (deleted after listing?)")
    if num in (errno.EACCES, errno.EPERM):
        return ReadFailure(False, name, f"unreadable: permission denied ({detail})")
    if num in _LOCAL_NOT_REGULAR:
        return ReadFailure(False, name, NotRegularFileError(_LOCAL_NOT_REGULAR[num]).reason)
    if num == errno.ENAMETOOLONG:
        return ReadFailure(False, name, f"unreadable: name too long ({detail})")
    # EIO, ESTALE (NFS), EMFILE, ENOMEM, ETIMEDOUT, ECONNRESET...: the machine or the network.
    return ReadFailure(True, name, f"{name}: {detail}", _NETWORK)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_error_reason(exc: BaseException) -> str:
    """The error-row text of a read failure that `read_many` returned (always a fact)."""
    return classify_read_error(exc).reason


def transient_error(uri: str, exc: BaseException, failure: ReadFailure) -> TransientReadError:
    """The exception that fails a shard: which object, which code, what to do."""
    return TransientReadError(
        f"reading {uri} failed with {failure.code} ({failure.reason}): {failure.advice}. "
        "This is not a fact about the image, so no error row is written: the shard fails "
        "without writing anything and its images are tagged when it is retried or rerun",
        uri=uri,
        code=failure.code,
    )


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
