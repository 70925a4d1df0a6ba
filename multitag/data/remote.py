"""Datasets on any fsspec filesystem (s3://, gs://, memory://, ...): listed, then pulled.

Why a listing first: an object store tells each object's size and ETag (or checksum) in one
paginated LIST, without reading a byte. The sha256 of the `(relative path, size, ETag)`
lines is the dataset's *listing key*: the worker's cache is keyed by it, so a folder whose
listing is unchanged is not downloaded again, and a changed folder pulls only the objects
whose size or ETag changed (the others are linked from the previous pull of the same URL).

Why every store error but "not found" is retryable: a listing or download that failed on
credentials, throttling or the network says nothing about the data; failing the acquire
(which the retrain task retries) is right, installing what did arrive is not. Nothing here
writes outside the folder it is given; `multitag.data.datasets` installs it atomically.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from fsspec import AbstractFileSystem

from multitag.data.archives import ARCHIVE_SUFFIXES, ArchiveLimits, DatasetError, archive_stem
from multitag.data.cache import read_manifest
from multitag.data.fingerprint import is_ours, listing_sha256
from multitag.storage import fs_and_path, s3_responses

# Where a store keeps what changes when an object's bytes do, most specific first: S3's
# ETag (md5 of a single-part upload), GCS's md5Hash/crc32c, Azure's etag; a modification
# time where nothing better is offered (sftp, local-like stores).
_CHANGE_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "checksum", "content_md5")
_TIME_KEYS = ("LastModified", "last_modified", "mtime", "updated", "modified", "created")
_LOCAL_SCHEMES = frozenset({"", "file", "local", "http", "https"})
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class RemoteFile:
    """One object of a listing: where it goes, its size, and what changes with its bytes."""

    rel: str  # posix path relative to the dataset folder (or the archive's name)
    size: int
    tag: str  # ETag, checksum or modification time, as the store reports it


@dataclass(frozen=True)
class Listing:
    """What is at a remote URL right now: a dataset folder's files, or one archive."""

    url: str
    fs: AbstractFileSystem
    root: str  # the store's path of the folder (or of the archive)
    files: tuple[RemoteFile, ...]
    is_archive: bool

    @property
    def sha256(self) -> str:
        """The listing key: changes when any file is added, removed, resized or rewritten."""
        return listing_sha256([(f.rel, f.size, f.tag) for f in self.files])

    @property
    def stem(self) -> str:
        name = PurePosixPath(self.root.rstrip("/")).name
        return archive_stem(name) if self.is_archive else name

    @property
    def source_id(self) -> str:
        """The URL in one spelling (`s3://b/p/` and `s3://b/p` are one source)."""
        return str(self.fs.unstrip_protocol(self.root.rstrip("/")))

    def by_rel(self) -> dict[str, RemoteFile]:
        return {f.rel: f for f in self.files}


def is_remote_url(url: str) -> bool:
    """A URL for fsspec to open (s3://, gs://, ...), not a local path, file:// or http(s)://.

    http(s) stays with fastdownload (fastai's checksum list, its progress bar); a one-letter
    scheme is a Windows drive.
    """
    scheme = urlparse(url.strip()).scheme.lower()
    return len(scheme) > 1 and scheme not in _LOCAL_SCHEMES


def list_remote(url: str, limits: ArchiveLimits) -> Listing:
    """The current listing of `url`: an archive (by its suffix) or a folder's data files.

    Raises a non-retryable DatasetError for an unknown scheme, a missing folder or archive,
    an unsafe object name or a folder over `limits`; a retryable one for store trouble.
    """
    fs, root = _open(url)
    is_archive = root.lower().endswith(ARCHIVE_SUFFIXES)
    try:
        fs.invalidate_cache(root)  # a long-lived worker must see today's objects, not cached ones
        if is_archive:
            info = fs.info(root)
            found = {root: info} if info.get("type") == "file" else {}
        else:
            found = fs.find(root, detail=True)
    except Exception as exc:
        raise store_error(url, "listing", exc) from exc
    files = _archive_entry(root, found) if is_archive else _folder_entries(url, root, found)
    if not files:
        raise DatasetError(
            f"{url}: no {'such archive' if is_archive else 'files under this prefix'}. Check "
            "the URL (a folder holding train.csv and train/, or an archive).",
            retryable=False,
        )
    _check_size(url, files, limits)
    return Listing(url, fs, root, tuple(files), is_archive)


def _open(url: str) -> tuple[AbstractFileSystem, str]:
    try:
        return fs_and_path(url.strip())
    except (ValueError, ImportError) as exc:  # unknown protocol, or its package not installed
        scheme = urlparse(url.strip()).scheme
        raise DatasetError(
            f"{url}: unsupported scheme {scheme!r} ({exc}). Use an fsspec URL whose "
            "filesystem is installed (s3://, gs://, ...), http(s)://, file:// or a local path.",
            retryable=False,
        ) from exc


def _archive_entry(root: str, found: dict[str, Any]) -> list[RemoteFile]:
    return [
        RemoteFile(PurePosixPath(root).name, int(info.get("size") or 0), change_tag(info))
        for info in found.values()
    ]


def _folder_entries(url: str, root: str, found: dict[str, Any]) -> list[RemoteFile]:
    """Files under `root` as relative paths; our own top-level `.`/`_` entries left out."""
    base = root.rstrip("/") + "/"
    out = []
    for path, info in sorted(found.items()):
        if info.get("type") != "file" or not path.startswith(base):
            continue  # folder markers (keys ending in '/') and anything outside the prefix
        rel = path[len(base) :]
        if is_ours(rel.split("/", 1)[0]):
            continue
        if problem := _name_problem(rel):
            raise DatasetError(
                f"{url}: the object {rel!r} {problem}; it cannot be stored under the dataset "
                "folder. Rename or remove it.",
                retryable=False,
            )
        out.append(RemoteFile(rel, int(info.get("size") or 0), change_tag(info)))
    return out


def _name_problem(rel: str) -> str | None:
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in rel or "\0" in rel:
        return "has an empty, '.', '..' or backslash path segment"
    return None


def _check_size(url: str, files: list[RemoteFile], limits: ArchiveLimits) -> None:
    """The archive limits hold for folders too: a wrong prefix must not fill the disk."""
    total = sum(f.size for f in files)
    if len(files) > limits.max_members or total > limits.max_bytes:
        raise DatasetError(
            f"{url}: {len(files):,} files, {total:,} bytes, over the limits of "
            f"{limits.max_members:,} files / {limits.max_bytes:,} bytes (not the dataset "
            "you meant?). Nothing was downloaded; raise MULTITAG_ARCHIVE_MAX_MEMBERS / "
            "MULTITAG_ARCHIVE_MAX_BYTES if it is genuine.",
            retryable=False,
        )


def change_tag(info: dict[str, Any]) -> str:
    """What a store reports that changes when an object's bytes do (ETag first).

    With neither a checksum nor a time, every field but the name stands in (the size at
    least), so the key still changes with anything the store tells.
    """
    for key in (*_CHANGE_KEYS, *_TIME_KEYS):
        if info.get(key) not in (None, ""):
            return f"{key}={info[key]}"
    return repr(sorted((k, str(v)) for k, v in info.items() if k != "name"))


def cache_key(listing: Listing) -> str:
    """Cache folder name: a readable stem plus the listing key (content, not the URL)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", listing.stem).strip("._") or "data"
    return f"{stem[:80]}-{listing.sha256[:16]}"


@dataclass(frozen=True)
class PullStats:
    """How a pull went: objects downloaded and objects reused from the previous pull."""

    downloaded: int
    reused: int
    bytes_downloaded: int


def pull_folder(listing: Listing, dest: Path, previous: Path | None = None) -> PullStats:
    """Download the listed files into `dest` (a fresh local folder), reusing unchanged ones.

    `previous`: the folder of an earlier pull whose manifest listed `previous_files`; a file
    listed there with the same size and tag is hard-linked (copied across filesystems)
    instead of downloaded. Every download is checked against the listed size (and the md5
    of a plain ETag), so an object rewritten mid-pull fails the pull instead of mixing old
    and new bytes.
    """
    reuse = reusable_files(listing, previous)
    fetch = [f for f in listing.files if f.rel not in reuse]
    for f in listing.files:
        (dest / f.rel).parent.mkdir(parents=True, exist_ok=True)
    for rel, src in reuse.items():
        _link_or_copy(src, dest / rel)
    if fetch:
        rpaths = [f"{listing.root.rstrip('/')}/{f.rel}" for f in fetch]
        lpaths = [str(dest / f.rel) for f in fetch]
        try:
            listing.fs.get(rpaths, lpaths)
        except Exception as exc:
            raise store_error(listing.url, "downloading", exc) from exc
    for f in fetch:
        check_download(listing.url, f, dest / f.rel)
    return PullStats(len(fetch), len(reuse), sum(f.size for f in fetch))


def reusable_files(listing: Listing, previous: Path | None) -> dict[str, Path]:
    """Files of the previous pull that the listing still names with the same size and tag."""
    if previous is None:
        return {}
    manifest = read_manifest(previous) or {}
    known = manifest.get("remote_files") or {}
    out = {}
    for f in listing.files:
        if known.get(f.rel) != [f.size, f.tag]:
            continue
        src = previous / f.rel
        if src.is_file() and not src.is_symlink() and src.stat().st_size == f.size:
            out[f.rel] = src
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """Cache folders are never written in place (only replaced by rename), so a hard link
    shares bytes safely; another filesystem gets a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def pull_file(listing: Listing, dest: Path) -> Path:
    """Download a listed archive to `dest` (via `<dest>.part`, renamed once checked)."""
    (entry,) = listing.files
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        listing.fs.get_file(listing.root, str(part))
    except Exception as exc:
        part.unlink(missing_ok=True)
        raise store_error(listing.url, "downloading", exc) from exc
    try:
        check_download(listing.url, entry, part)
    except DatasetError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def check_download(url: str, entry: RemoteFile, path: Path) -> None:
    """The bytes that arrived are the ones listed: size, and md5 when the ETag is one."""
    size = path.stat().st_size
    problem = f"{size} bytes arrived, {entry.size} listed" if size != entry.size else None
    md5 = _plain_md5(entry.tag)
    if problem is None and md5 is not None:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != md5:
            problem = f"md5 {digest.hexdigest()} differs from the listed ETag {md5}"
    if problem:
        raise DatasetError(
            f"{url}: {entry.rel} changed while it was downloaded ({problem}). Nothing was "
            "installed; retry once the upload is complete.",
            retryable=True,
        )


def _plain_md5(tag: str) -> str | None:
    """The md5 a single-part S3 upload's ETag is (multipart ETags carry a '-N' suffix)."""
    key, _, value = tag.partition("=")
    value = value.strip('"').lower()
    return value if key in ("ETag", "etag") and _PLAIN_MD5.match(value) else None


def store_error(url: str, action: str, exc: BaseException) -> DatasetError:
    """A DatasetError for a failed listing or download: retryable unless it says "not found".

    Why not `multitag.inference.faults`: data sits below inference. The rule is the same:
    credentials, throttling, 5xx, resets and unknown errors are weather, never data.
    """
    if isinstance(exc, DatasetError):
        return exc
    code = s3_error_code(exc)
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    if isinstance(exc, FileNotFoundError) and code in (None, "NoSuchKey", "NoSuchBucket", "404"):
        return DatasetError(
            f"{url}: {action} found nothing ({detail}). Check the bucket and prefix.",
            retryable=False,
        )
    return DatasetError(
        f"{action} {url} failed ({code or 'no S3 code'}; {detail}). This is store, "
        "credential or network trouble, not a fact about the data: nothing was installed. "
        "Check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN or "
        "AWS_PROFILE) and the endpoint (AWS_ENDPOINT_URL); it is retried.",
        retryable=True,
    )


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code of the botocore ClientError behind `exc` (s3fs keeps it as a cause)."""
    for response in s3_responses(exc):
        if isinstance(response.get("Error"), dict):
            return str(response["Error"].get("Code") or "") or None
    return None
