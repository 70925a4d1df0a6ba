"""One code path for local folders and object stores: every location is an fsspec URL.

Why: the same pipeline runs on a laptop folder and on `s3://bucket/prefix`; branching per
backend in each module would drift. Keep backend-specific knowledge here.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem


def fs_and_path(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for a URI and the path inside it (a bare path means the local disk)."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def is_local(uri: str) -> bool:
    fs, _ = fs_and_path(uri)
    return "file" in _protocols(fs)


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def join(base: str, *parts: str) -> str:
    """Join URL-ish paths with '/', keeping the scheme (os.path.join would break `s3://`)."""
    base = str(base)
    out = base.rstrip("/") if len(base) > 1 else base
    for part in parts:
        out = posixpath.join(out, str(part).lstrip("/"))
    return out


def unstrip(fs: AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-internal path back into a full URI (`bucket/k` -> `s3://bucket/k`)."""
    if "file" in _protocols(fs):
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
    if "file" in _protocols(fs):
        _write_local_atomic(path, data, exclusive=exclusive)
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if exclusive:
        with fs.open(path, "xb") as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)


def _write_local_atomic(path: str, data: bytes, *, exclusive: bool) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{uuid.uuid4().hex[:8]}", dir=folder)
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


def write_json_atomic(uri: str, obj: Any, *, exclusive: bool = False) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")
    write_bytes_atomic(uri, data, exclusive=exclusive)
