"""Where the images come from: listing a folder or an s3:// prefix.

Why a module of its own: which names are images, and what a listing leaves out and says so,
are shared by planning, the head start and the fast-path sampling; none of it needs a model.
Reading the bytes is `multitag.inference.reading`; what a failed read means is
`multitag.inference.faults`.

Names are taken literally: local paths never go through fsspec's URL parsing (which reads
`a::b.jpg` as a chain of two filesystems), and an S3 key is sent to s3fs as `bucket/key`
exactly as listed. A local file whose name is not valid UTF-8 cannot be an `image_uri`
(Arrow strings are UTF-8, and an escaped stand-in could name another file): it is left out
of the listing and counted with examples, so the run goes on and the summary says which to
rename.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from multitag.inference.faults import SourceUnavailableError, TaggingError
from multitag.inference.imaging import decodable_extensions
from multitag.storage import fs_and_path, unstrip

# Listed besides what Pillow decodes for us (imaging.decodable_extensions: its own registry,
# MPO included): HEIC/HEIF. Pillow cannot decode those, but listing them makes phone photos
# show up as "unrecognised" error rows instead of vanishing from the counts.
UNDECODED_PHOTO_EXTENSIONS = frozenset({".heic", ".heif"})
N_EXAMPLES = 5  # skipped files named in a summary, per reason
_LOCAL_PROTOCOLS = ("file://", "local://")
log = logging.getLogger(__name__)


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
