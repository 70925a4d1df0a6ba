"""One code path for local folders and object stores: every location is an fsspec URL.

Why: the same pipeline runs on a laptop folder and on `s3://bucket/prefix`; branching per
backend in each module would drift. Keep backend-specific knowledge here.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from fsspec import AbstractFileSystem


def fs_and_path(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for a URI and the path inside it (a bare path means the local disk)."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def is_local(uri: str) -> bool:
    fs, _ = fs_and_path(uri)
    return is_local_fs(fs)


def is_local_fs(fs: AbstractFileSystem) -> bool:
    """The local disk (read with plain open() calls), not an object store."""
    proto = fs.protocol
    return "file" in ((proto,) if isinstance(proto, str) else tuple(proto))


def join(base: str, *parts: str) -> str:
    """Join URL-ish paths with '/', keeping the scheme (os.path.join would break `s3://`)."""
    base = str(base)
    out = base.rstrip("/") if len(base) > 1 else base
    for part in parts:
        out = posixpath.join(out, str(part).lstrip("/"))
    return out


def unstrip(fs: AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-internal path back into a full URI (`bucket/k` -> `s3://bucket/k`)."""
    if is_local_fs(fs):
        return path
    return fs.unstrip_protocol(path)


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_bytes_atomic(uri: str, data: bytes, *, exclusive: bool = False) -> None:
    """Write a whole object or nothing: readers never see a half-written file.

    Local: write a temp file in the same folder, fsync, then rename (or hard-link when
    `exclusive`, which fails if the target exists). Object stores: a PUT is already atomic;
    `exclusive` uses a conditional create (`If-None-Match`) and raises FileExistsError.
    """
    fs, path = fs_and_path(uri)
    if is_local_fs(fs):
        _write_local_atomic(path, data, exclusive=exclusive)
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if exclusive:
        _create_exclusive(fs, path, data)
    else:
        fs.pipe_file(path, data)


# Seconds to wait before each retry of a conditional create that S3 answered with 409
# ConditionalRequestConflict (two conditional writes of one key overlapped; S3's documented
# answer is "retry"). A retry then either creates the object or gets 412 -> FileExistsError.
CONFLICT_RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0, 2.0)


def _create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """One PUT with `If-None-Match: *` (s3fs mode "x"), retried only on a 409 conflict."""
    if not data:
        # s3fs commits an empty file with a plain touch(), without the condition.
        raise ValueError(f"an exclusive create of {path} needs at least one byte")
    for delay in (*CONFLICT_RETRY_DELAYS_S, None):
        try:
            with fs.open(path, "xb") as f:
                f.write(data)
            return
        except FileExistsError:
            raise
        except OSError as exc:
            if delay is None or not is_conditional_conflict(exc):
                raise
            time.sleep(delay * (1.0 + random.random()))  # jitter: racers do not meet again


def is_conditional_conflict(exc: BaseException) -> bool:
    """S3's 409 `ConditionalRequestConflict`: a conditional write raced another; retry it.

    s3fs has no mapping for this code and raises a plain `OSError(EIO)` whose `__cause__`
    is botocore's `ClientError`; its `response` names the code and the HTTP status.
    """
    for response in s3_responses(exc):
        code = (response.get("Error") or {}).get("Code")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code == "ConditionalRequestConflict" or (code is None and status == 409):
            return True
    return False


def s3_responses(exc: BaseException) -> Iterator[dict[str, Any]]:
    """The botocore `ClientError.response` dicts behind `exc`, nearest first.

    Why walk the chain: s3fs re-raises S3 errors as OSError, PermissionError or
    FileNotFoundError and keeps botocore's ClientError as `__cause__` (or `__context__`); its
    `response` holds the S3 error code and HTTP status, which tell a fact about an object
    from weather (storage, tagging's read faults and dataset pulls all ask).
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            yield response
        cur = cur.__cause__ or cur.__context__


def remove(uri: str) -> None:
    """Delete one file or object; a missing one is not an error (someone removed it first)."""
    fs, path = fs_and_path(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        return


def store_description(uri: str) -> str:
    """Where `uri` really lives, for messages: the local disk, or the object store's endpoint.

    Why the endpoint: two stores can share a bucket name; the endpoint is what an operator
    changes (AWS_ENDPOINT_URL, a proxy) and what decides whether conditional writes work.
    """
    fs, path = fs_and_path(uri)
    if is_local_fs(fs):
        return f"local disk ({path})"
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    endpoint = getattr(fs, "endpoint_url", None)
    client = getattr(fs, "s3", None) if proto in ("s3", "s3a") else None
    meta = getattr(client, "meta", None)
    endpoint = endpoint or getattr(meta, "endpoint_url", None) or "its default endpoint"
    bucket = path.split("/", 1)[0]
    return f"{proto}://{bucket} at {endpoint}"


PROBE_DIR = "_probe"
_probe_lock = threading.Lock()
_exclusive_create_honoured: dict[tuple[str, str], bool] = {}


def honours_exclusive_create(root_uri: str) -> bool:
    """Whether the store under `root_uri` refuses a second exclusive create of one key.

    Why probe: exactly-once rests on `If-None-Match: *`, and some S3-compatible stores
    accept the header and overwrite anyway (s3fs documents mode "x" as known to work on AWS
    only). The probe creates one fresh key twice and deletes it: the second create must
    raise FileExistsError. Three requests per (root, endpoint) and process: the answer is
    cached. The local disk always honours it (link(2) fails on an existing name).
    """
    fs, _ = fs_and_path(root_uri)
    if is_local_fs(fs):
        return True
    key = (root_uri.rstrip("/"), store_description(root_uri))
    with _probe_lock:
        if key in _exclusive_create_honoured:
            return _exclusive_create_honoured[key]
        honoured = _probe_exclusive_create(root_uri)
        _exclusive_create_honoured[key] = honoured
        return honoured


def _probe_exclusive_create(root_uri: str) -> bool:
    probe = join(root_uri, PROBE_DIR, f"{time.time_ns()}-{secrets.token_hex(8)}.probe")
    try:
        write_bytes_atomic(probe, b"first", exclusive=True)
        write_bytes_atomic(probe, b"second", exclusive=True)
    except FileExistsError:
        # The second create was refused; or the first one's response was lost and its
        # retry refused, which also proves the store checks the condition (the key is new).
        return True
    finally:
        remove(probe)
    return False


def _write_local_atomic(path: str, data: bytes, *, exclusive: bool) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # raises FileExistsError if someone else got there first
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


TEMP_PREFIX = ".tmp-"


def temp_prefix() -> str:
    """`.tmp-<pid>-<host>-`: lets a later run tell a dead writer's leftovers from a live one's."""
    return f"{TEMP_PREFIX}{os.getpid()}-{socket.gethostname()}-"


def remove_stale_temp_files(folder_uri: str, *, max_age_s: float = 86_400.0) -> list[str]:
    """Delete temp files that a killed writer left in a local folder; returns what was removed.

    A SIGKILL between the temp write and the rename leaves `.tmp-*` behind (`temp_is_stale`
    says which are). Object stores need nothing: an unfinished PUT leaves no object. Live
    writers' temp files are never touched.
    """
    fs, path = fs_and_path(folder_uri)
    if not is_local_fs(fs) or not os.path.isdir(path):
        return []
    removed = []
    for entry in os.scandir(path):
        if not entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        mtime = entry.stat(follow_symlinks=False).st_mtime
        if not temp_is_stale(entry.name, mtime, max_age_s=max_age_s):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # another cleaner or the writer itself got there first
        removed.append(entry.path)
    return removed


def temp_is_stale(name: str, mtime: float, *, max_age_s: float = 86_400.0) -> bool:
    """Whether a `temp_prefix()` file or folder was left by a writer that is gone.

    On this host: its pid is gone (a live writer's is never stale, however old). From another
    host sharing the folder, or a name we cannot parse: older than `max_age_s`.
    """
    pid, owner_host = _temp_owner(name)
    if pid is not None and owner_host == socket.gethostname():
        return not pid_alive(pid)
    return time.time() - mtime >= max_age_s


def _temp_owner(name: str) -> tuple[int | None, str | None]:
    rest = name[len(TEMP_PREFIX) :]
    pid_text, _, host_rand = rest.partition("-")
    host, sep, _rand = host_rand.rpartition("-")
    if not pid_text.isdigit() or not sep:
        return None, None
    return int(pid_text), host


def pid_alive(pid: int) -> bool:
    """A process with this pid exists on this host (perhaps another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def write_json_atomic(uri: str, obj: Any, *, exclusive: bool = False) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")
    write_bytes_atomic(uri, data, exclusive=exclusive)


def publish_folder(staged: Path, target: Path, *, aside: Path | None = None) -> bool:
    """Put a fully written local folder at `target`, replacing any folder there; False when a
    concurrent publisher's folder took `target` first (then `staged` is discarded).

    Why renames: on one filesystem each rename is atomic, so readers see the old folder or the
    new one, never a half-written tree. The old folder is renamed to `aside` (default a
    `<target>.old-<pid>` sibling; pass a path inside a temp folder that a later run cleans,
    so a kill in between leaves nothing in the published tree) and deleted once replaced. Any
    other failure puts the old folder back and raises.
    """
    aside = aside or target.with_name(f"{target.name}.old-{os.getpid()}")
    moved = False
    if _present(target):
        try:
            os.rename(target, aside)
            moved = True
        except FileNotFoundError:
            pass  # a concurrent publisher moved it first
    try:
        os.rename(staged, target)
    except OSError:
        if _present(target):  # another publisher's folder landed in between: theirs stays
            shutil.rmtree(staged, ignore_errors=True)
            return False
        if moved:
            os.rename(aside, target)
            moved = False
        raise
    finally:
        if moved:
            _remove_tree(aside)
    return True


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove_tree(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
