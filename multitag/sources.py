"""Where the images come from: listing a folder or an s3:// prefix, and reading their bytes.

Why a module of its own: the listing and reading rules (which names are images, which read
errors are facts about an object and which are worth a retry) are shared by planning, the
tagger and the fast-path sampling, and none of them needs a model. Also home of the tagging
error types, as the bottom layer of the tagging pipeline.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from typing import Any

from multitag.storage import fs_and_path, is_local_fs, unstrip

# Pillow's raster formats, plus HEIC/HEIF: Pillow cannot decode those, but listing them makes
# phone photos show up as "unrecognised" error rows instead of vanishing from the counts.
# fmt: off
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".avif", ".heic", ".heif",
})
# fmt: on
_S3_FETCH_CONCURRENCY = 32
# Read failures that are facts about the object, not the network: they become error rows.
_PERMANENT_READ_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class TaggingError(Exception):
    """Tagging cannot start or continue; the message says what to change."""


# ================================================================================ sources


class SourceUnavailableError(TaggingError):
    """The image source could not be listed (unreachable endpoint, denied, bad credentials)."""


def is_image_name(name: str) -> bool:
    """Image files are recognised by extension, case-insensitively (IMG_001.JPG counts)."""
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(source: str) -> Iterator[str]:
    """Every image under `source` (recursively), as full URIs in sorted order.

    Local folders yield absolute paths, s3:// prefixes `s3://bucket/key`. S3 is listed page
    by page keeping only the keys (never the per-object metadata), so a 100k-object prefix
    costs the list of its image keys and no more. A missing folder, or a prefix with no
    objects at all, raises FileNotFoundError (a typo must not look like "nothing to tag").
    """
    fs, path = fs_and_path(source)
    if is_local_fs(fs):
        keys = _list_local(path)
    elif hasattr(fs, "call_s3"):
        try:
            keys = _list_s3(fs, path, source)
        except (FileNotFoundError, TaggingError):
            raise
        except Exception as e:
            raise SourceUnavailableError(
                f"cannot list {source}: {type(e).__name__}: {e}. Check the bucket name, the "
                "endpoint (AWS_ENDPOINT_URL) and the credentials (AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) of this worker"
            ) from e
    else:
        if not fs.exists(path):
            raise FileNotFoundError(f"image source {source} does not exist")
        keys = [unstrip(fs, p) for p in fs.find(path) if is_image_name(p)]
    keys.sort()
    return iter(keys)


def _list_local(root: str) -> list[str]:
    if os.path.isfile(root):
        return [os.path.abspath(root)] if is_image_name(root) else []
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image source {root} is not a folder (or does not exist)")
    found: list[str] = []
    for folder, _dirs, files in os.walk(root):
        found.extend(os.path.join(folder, f) for f in files if is_image_name(f))
    return [os.path.abspath(p) for p in found]


def _list_s3(fs: Any, path: str, source: str) -> list[str]:
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
            if not name.endswith("/") and is_image_name(name):
                keys.append(f"s3://{bucket}/{name}")
        if not page.get("IsTruncated"):
            break
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
    if n_objects == 0:
        raise FileNotFoundError(f"no objects under {source} (s3://{bucket}/{prefix}); check it")
    return keys


def default_dataset_name(source: str) -> str:
    """The last folder of the source (`s3://b/photos/2024` -> `2024`), made path-safe."""
    _, path = fs_and_path(source)
    base = posixpath.basename(path.rstrip("/")) or path.strip("/").split("/")[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")
    if not name:
        raise TaggingError(f"cannot derive a dataset name from {source!r}; pass dataset_name")
    return name


# ======================================================================== reading bytes


def read_many(uris: Sequence[str]) -> list[bytes | OSError]:
    """The bytes of each URI, or the permanent error that explains why there are none.

    Objects stores are fetched concurrently (one request per object, up to 32 in flight);
    transient errors propagate so the whole shard can be retried.
    """
    out: list[bytes | OSError] = [b""] * len(uris)
    by_fs: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        by_fs.setdefault(_protocol_of(uri), []).append(i)
    for idxs in by_fs.values():
        fs, _ = fs_and_path(uris[idxs[0]])
        if is_local_fs(fs):
            for i in idxs:
                out[i] = _read_local(fs_and_path(uris[i])[1])
        elif getattr(fs, "async_impl", False):
            paths = [fs._strip_protocol(uris[i]) for i in idxs]
            from fsspec.asyn import sync

            blobs = sync(fs.loop, _fetch_async, fs, paths, _S3_FETCH_CONCURRENCY)
            for i, blob in zip(idxs, blobs, strict=True):
                out[i] = blob
        else:
            for i in idxs:
                out[i] = _read_sync(fs, fs._strip_protocol(uris[i]))
    return out


def _protocol_of(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head if sep else "file"


def _read_local(path: str) -> bytes | OSError:
    try:
        with open(path, "rb") as f:
            return f.read()
    except _PERMANENT_READ_ERRORS as exc:
        return exc


def _read_sync(fs: Any, path: str) -> bytes | OSError:
    try:
        return fs.cat_file(path)
    except _PERMANENT_READ_ERRORS as exc:
        return exc


async def _fetch_async(fs: Any, paths: list[str], limit: int) -> list[bytes | OSError]:
    sem = asyncio.Semaphore(limit)

    async def one(path: str) -> bytes | OSError:
        async with sem:
            try:
                return await fs._cat_file(path)
            except _PERMANENT_READ_ERRORS as exc:
                return exc

    return list(await asyncio.gather(*(one(p) for p in paths)))


def read_error_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing: file not found (deleted after listing?)"
    if isinstance(exc, PermissionError):
        return f"unreadable: permission denied ({exc})"
    return f"unreadable: not a file ({exc})"
