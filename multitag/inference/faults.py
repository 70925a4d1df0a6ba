"""Read failures: a fact about the image (an error row) or weather (retry the shard).

Why a module of its own: the rule decides whether an image is ever tagged. A read failure
becomes the image's error row only when it is a fact about that object (gone after listing,
access denied on it, not a regular file, over the byte cap). Everything else (expired or
wrong credentials, clock skew, throttling, 5xx, resets, timeouts, a code we do not know)
raises `TransientReadError`, so the shard writes nothing, fails, and is retried; a rerun
tags those images (DESIGN.md, "Faults"). Also home of the tagging error types, as the
bottom layer of the tagging pipeline.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from multitag.errors import InputError, RunFailedError
from multitag.storage import s3_responses


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
    for response in s3_responses(exc):
        if isinstance(response.get("Error"), dict):
            err = response["Error"]
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = str(err.get("Code") or status or "unknown")
            return code, int(status), str(err.get("Message") or "")
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
