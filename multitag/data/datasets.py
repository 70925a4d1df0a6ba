"""Datasets in the fastai PASCAL_2007 layout: fetch them with `untar_data`, safely; pack them.

Why not `untar_data` alone: it extracts with `shutil.unpack_archive`, which on Python 3.11
applies no member filter (`../x`, `/etc/x` and links pointing out are written where they say,
setuid and world-writable bits are kept), puts no limit on what an archive expands to, and
unpacks into the system temp folder, where a killed run leaves its half-written tree for good;
it also trusts any folder that exists, checksums only URLs on fastai's own list, and names the
folder after the archive file, so two URLs ending in `data.tgz` would share a folder.

`acquire` keeps fastai's download machinery (`FastDownload.download`, the step `untar_data`
runs first: same urllib code, same fastai checksum list) and does the rest itself: the
archive's sha256 (when pinned) is checked, then every member is checked (names, links, member
types) against limits on total bytes, member count and compression ratio (`ArchiveLimits`)
before anything is written; it is then extracted with tarfile's `data` filter (zip members
get plain 0644/0755 modes) into a temp folder next to the cache, named
`.tmp-<pid>-<host>-*` so a later run can tell a dead extractor's leftovers from a live one's.
Only a complete extraction with the expected layout is renamed into place, with a manifest
(file sizes + archive sha256) that the next cache hit checks, so damage is noticed instead of
trusted.

Any other fsspec URL (`s3://bucket/prefix/`, `gs://...`) is listed first (`remote`): a
folder (train.csv + train/) is pulled file by file, an archive downloaded, into a cache
folder named by the listing's content key, so an unchanged listing costs one LIST and no
GET, and a changed one downloads only the files whose size or ETag changed.

Modules: `archives` (the safety check and limits), `extraction` (into a temp folder),
`cache` (layout, lock, manifest), `remote` (listing and pulling from an fsspec store),
`packing` (`pack_dataset`); this one fetches and installs.

Cache layout under `<home>/datasets/` (local disks only):
    <stem>-<hash>/                 the dataset, what `acquire` returns (hash of the URL;
                                   for an fsspec store, of the listing: see `remote`)
    .fastai/pulls/<url hash>.json  an fsspec URL's last pull, whose unchanged files the
                                   next pull links instead of downloading
    .fastai/config.ini             fastdownload's config (paths are overridden on every call)
    .fastai/archives/<key>/        the kept archive, for repairs without a download
    .fastai/staging/<key>/.tmp-<pid>-<host>-*/  temporary extraction, removed when done
                                   (or by a later call once that pid is gone)
    .fastai/locks/<key>.lock       one acquire per dataset at a time
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import url2pathname

from multitag.config import get_settings
from multitag.data import archives, extraction, remote
from multitag.data.archives import (
    ArchiveLimits,
    ArchiveTooLargeError,
    DatasetError,
    UnsafeArchiveError,
    archive_name,
    archive_stem,
    check_archive,
)
from multitag.data.cache import (
    MANIFEST_NAME,
    DatasetCache,
    Source,
    cache_problem,
    discard_archive,
    kept_archive_matches,
    last_pull,
    listing_problem,
    locked,
    read_manifest,
    record_last_pull,
    remove_leftovers,
    remove_pull,
    write_manifest,
)
from multitag.data.packing import pack_dataset
from multitag.hashing import sha256_bytes, sha256_file
from multitag.storage import fs_and_path, is_local, publish_folder, temp_prefix, write_bytes_atomic

if TYPE_CHECKING:  # re-exported lazily by __getattr__ below
    from multitag.data.shapes import SHAPE_CLASSES, make_shapes_dataset

__all__ = [
    "MANIFEST_NAME",
    "SHAPE_CLASSES",
    "ArchiveLimits",
    "ArchiveTooLargeError",
    "DatasetError",
    "UnsafeArchiveError",
    "acquire",
    "check_archive",
    "default_dataset_url",
    "make_shapes_dataset",
    "pack_dataset",
]

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    """Re-export the shapes generator lazily: importing datasets stays light for CLI paths."""
    if name in ("make_shapes_dataset", "SHAPE_CLASSES"):
        from multitag.data import shapes

        return getattr(shapes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_dataset_url() -> str:
    """fastai's PASCAL_2007 archive: the real-photo dataset the pipeline is built for."""
    from fastai.data.external import URLs

    return URLs.PASCAL_2007


def acquire(
    url: str | os.PathLike[str],
    home: str | None = None,
    *,
    force: bool = False,
    sha256: str | None = None,
    limits: ArchiveLimits | None = None,
) -> Path:
    """The folder of a PASCAL-layout dataset (train/, train.csv), fetched and cached if needed.

    `url`: http(s):// or file:// URL of an archive, a local archive path, a local folder
    (checked for the layout and returned as it is), or any other fsspec URL of an archive or
    of a dataset folder (`s3://bucket/prefix/`; see `_acquire_remote`). Archives are cached under
    `<home>/datasets/<stem>-<hash>`; `force` fetches and extracts again; `sha256` pins the
    archive's checksum (checked before the archive is even opened); `limits` bounds what it
    may expand to (default `ArchiveLimits.from_env()`).
    """
    if remote.is_remote_url(os.fspath(url)):
        return _acquire_remote(os.fspath(url).strip(), home, force, sha256, limits)
    source = _resolve_source(url)
    if isinstance(source, Path):
        return _check_layout(source, origin=os.fspath(url))
    expected = _normalise_sha256(sha256)
    limits = limits or ArchiveLimits.from_env()
    cache = DatasetCache(_datasets_root(home), _cache_key(source.url))
    extraction.remove_dead_extractions(cache.base / "staging")
    with locked(cache.lock):
        remove_leftovers(cache)
        refetch = force
        if cache.target.exists() and not force:
            manifest = read_manifest(cache.target)
            problem, stale = cache_problem(cache.target, manifest, source, expected)
            if problem is None:
                log.info("dataset %s: cached at %s", source.url, cache.target)
                return cache.target
            log.warning("cached dataset %s %s; rebuilding it", cache.target, problem)
            refetch = stale or not kept_archive_matches(cache, source.url, manifest)
        return _install(source, cache, expected, limits, refetch=refetch)


def _resolve_source(url: str | os.PathLike[str]) -> Source | Path:
    text = os.fspath(url).strip()
    parsed = urlparse(text)
    if parsed.scheme in ("http", "https"):
        archive_name(text)  # fail before any network call when the URL names no archive
        return Source(text, None)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DatasetError(f"{text}: file:// URLs must point to this machine (file:///path).")
        path = Path(url2pathname(parsed.path))
    else:
        path = Path(text).expanduser()
    if path.is_dir():
        return path.absolute()
    if not path.is_file():
        raise DatasetError(f"{text}: no such archive or folder ({path} does not exist).")
    path = path.resolve()
    uri = path.as_uri()
    archive_name(uri)
    return Source(uri, path)


def _cache_key(url: str) -> str:
    """Folder name: readable stem plus a hash of the URL, so same-named archives never share."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", archive_stem(archive_name(url))).strip("._") or "data"
    return f"{stem[:80]}-{sha256_bytes(url.encode('utf-8'))[:12]}"


def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise DatasetError(f"sha256={sha256!r} is not a sha256 digest (64 hex digits).")
    return value


def _datasets_root(home: str | None) -> Path:
    uri = get_settings(home).datasets
    if not is_local(uri):
        raise DatasetError(
            f"Datasets are extracted to a local disk, but the storage root is {uri!r}. Pass a "
            "local home (or set MULTITAG_HOME to a local folder) for acquire()."
        )
    return Path(fs_and_path(uri)[1])


def _install(
    source: Source,
    cache: DatasetCache,
    expected: str | None,
    limits: ArchiveLimits,
    *,
    refetch: bool,
) -> Path:
    """Download (unless kept), check, extract into a temp folder, then rename into place."""
    archive = _download(source.url, cache, refetch=refetch)
    return _install_archive(source, cache, archive, expected, limits)


def _install_archive(
    source: Source,
    cache: DatasetCache,
    archive: Path,
    expected: str | None,
    limits: ArchiveLimits,
    *,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """Check a downloaded archive, extract it into a temp folder, then rename into place."""
    try:
        digest = sha256_file(archive)  # first: a wrong archive is not even parsed
        if expected and digest != expected:
            raise DatasetError(
                f"The archive from {source.url} has sha256 {digest}, expected {expected}. "
                "It was discarded and nothing was extracted: check the URL and the checksum."
            )
        archives.check_archive(archive, source=source.url, limits=limits)
    except DatasetError:
        discard_archive(cache)
        raise
    cache.staging_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=cache.staging_dir))
    try:
        extracted = extraction.extract_archive(source.url, archive, staging)
        try:
            _check_layout(extracted, origin=source.url)
        except DatasetError:
            discard_archive(cache)
            raise
        write_manifest(extracted, source, archive, digest, extra=manifest_extra)
        # The replaced folder is set aside in the staging folder, which is removed below (or
        # by a later acquire, if this one is killed).
        publish_folder(extracted, cache.target, aside=staging / "replaced")
    finally:
        shutil.rmtree(cache.staging_dir, ignore_errors=True)
    log.info("dataset %s: extracted to %s", source.url, cache.target)
    return cache.target


def _acquire_remote(
    url: str,
    home: str | None,
    force: bool,
    sha256: str | None,
    limits: ArchiveLimits | None,
) -> Path:
    """A dataset folder or archive on an fsspec store, pulled into the cache by content.

    The cache folder is named by the listing key (`remote.cache_key`): an unchanged listing
    is a cache hit without a GET; a changed one is pulled into a temp folder, reusing the
    unchanged files of the URL's last pull, and renamed into place only when complete.
    """
    limits = limits or ArchiveLimits.from_env()
    expected = _normalise_sha256(sha256)
    root = _datasets_root(home)
    listing = remote.list_remote(url, limits)
    if not listing.is_archive:
        _check_remote_layout(listing, sha256=expected)
    cache = DatasetCache(root, remote.cache_key(listing))
    extraction.remove_dead_extractions(cache.base / "staging")
    with locked(cache.lock):
        remove_leftovers(cache)
        if force or not _cached_pull_usable(cache, listing):
            _pull_into_cache(listing, cache, expected, limits, force=force)
        stale = record_last_pull(root, listing.source_id, cache.key)
    if stale:  # removed after our lock is released: an acquire holds one lock at a time
        remove_pull(DatasetCache(root, stale))
        log.info("dataset %s: removed the pull before the previous one (%s)", url, stale)
    return cache.target


def _cached_pull_usable(cache: DatasetCache, listing: remote.Listing) -> bool:
    if not cache.target.exists():
        return False
    problem = listing_problem(cache.target, read_manifest(cache.target), listing.sha256)
    if problem is None:
        log.info("dataset %s: unchanged listing, cached at %s", listing.url, cache.target)
        return True
    log.warning("cached dataset %s %s; pulling it again", cache.target, problem)
    return False


def _pull_into_cache(
    listing: remote.Listing,
    cache: DatasetCache,
    expected: str | None,
    limits: ArchiveLimits,
    *,
    force: bool,
) -> None:
    """An archive is downloaded and extracted; a folder pulled, reusing its last pull's files."""
    extra = {
        "listing_sha256": listing.sha256,
        "remote_files": {f.rel: [f.size, f.tag] for f in listing.files},
    }
    if listing.is_archive:
        archive = _pull_archive(listing, cache, force=force)
        source = Source(listing.url, None)
        _install_archive(source, cache, archive, expected, limits, manifest_extra=extra)
    else:
        previous = None if force else last_pull(cache.root, listing.source_id)
        _install_pulled_folder(listing, cache, previous, extra)


def _check_remote_layout(listing: remote.Listing, *, sha256: str | None) -> None:
    """Refuse a folder without the PASCAL layout before downloading any of it."""
    if sha256 is not None:
        raise DatasetError(
            f"{listing.url} is a folder: sha256 pins an archive's bytes. Leave it out (the "
            "folder's content hash is recorded with the model) or point at an archive.",
            retryable=False,
        )
    rels = listing.by_rel()
    missing = [
        name
        for name, ok in (
            ("train/", any(rel.startswith("train/") for rel in rels)),
            ("train.csv", "train.csv" in rels),
        )
        if not ok
    ]
    if missing:
        raise DatasetError(
            f"{listing.url} is not a dataset in the PASCAL_2007 layout: {' and '.join(missing)} "
            "missing under it. Expected a prefix holding train/ (the images) and train.csv "
            "(fname,labels,is_valid), or an archive. Nothing was downloaded."
        )


def _pull_archive(listing: remote.Listing, cache: DatasetCache, *, force: bool) -> Path:
    """The archive of this listing: kept from an earlier pull when intact, else downloaded."""
    (entry,) = listing.files
    kept = cache.archive_dir / entry.rel
    if kept.is_file() and not force:
        try:
            remote.check_download(listing.url, entry, kept)
            return kept
        except DatasetError:
            log.warning("kept archive %s does not match its listing; downloading it", kept)
    discard_archive(cache)
    return remote.pull_file(listing, kept)


def _install_pulled_folder(
    listing: remote.Listing, cache: DatasetCache, previous: Path | None, extra: dict[str, Any]
) -> None:
    """Pull into a temp folder next to the cache, check the layout, then rename into place."""
    cache.staging_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=cache.staging_dir))
    try:
        pulled = staging / "data"
        stats = remote.pull_folder(listing, pulled, previous)
        _check_layout(pulled, origin=listing.url)
        write_manifest(pulled, Source(listing.url, None), None, None, extra=extra)
        publish_folder(pulled, cache.target, aside=staging / "replaced")
    finally:
        shutil.rmtree(cache.staging_dir, ignore_errors=True)
    log.info(
        "dataset %s: %d file(s) downloaded (%d bytes), %d reused from %s; installed at %s",
        listing.url, stats.downloaded, stats.bytes_downloaded, stats.reused, previous,
        cache.target,
    )  # fmt: skip


def _fastdownload_args(cache: DatasetCache, data_rel: str) -> dict[str, str]:
    """The paths untar_data passes to FastDownload; relative to base, so config.ini stays
    free of the home path (configparser chokes on '%' in values)."""
    return {"base": str(cache.base), "archive": cache.archive_rel, "data": data_rel}


def _ensure_config(cache: DatasetCache) -> None:
    """fastdownload writes config.ini on first use; write it atomically ourselves so two
    processes starting at once never read a half-written file."""
    cfg = cache.base / "config.ini"
    if not cfg.exists():
        write_bytes_atomic(str(cfg), b"[DEFAULT]\ndata = staging\narchive = archives\n")


def _download(url: str, cache: DatasetCache, *, refetch: bool) -> Path:
    """untar_data's download step: FastDownload.download (urllib, fastai's checksum list).

    Skipped by fastdownload when the archive is already kept (and passes fastai's check).
    """
    import fastai.data
    from fastdownload import FastDownload

    _ensure_config(cache)
    cache.archive_dir.mkdir(parents=True, exist_ok=True)
    done = False
    try:
        fd = FastDownload(module=fastai.data, **_fastdownload_args(cache, "staging"))
        path = Path(fd.download(url, force=refetch))
        done = True
        return path
    except Exception as e:
        raise DatasetError(
            f"Could not download {url}: {_why(e)}. Nothing was cached; check that the URL is "
            "right and reachable, then retry.",
            retryable=_is_transient(e),
        ) from e
    finally:
        if not done:
            discard_archive(cache)


def _is_transient(e: Exception) -> bool:
    """A missing or forbidden URL stays so; timeouts, throttling and 5xx may not."""
    return not (isinstance(e, HTTPError) and 400 <= e.code < 500 and e.code not in (408, 429))


def _why(e: Exception) -> str:
    if isinstance(e, NameError) and "ContentTooShortError" in str(e):
        # fastcore 2.2.41's urlretrieve raises ContentTooShortError (fewer bytes than the
        # Content-Length) without importing it, so the short read surfaces as a NameError.
        return "the connection closed before the whole file arrived"
    if isinstance(e, HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, URLError):
        return str(e.reason)
    return f"{type(e).__name__}: {e}"


def _check_layout(path: Path, *, origin: str) -> Path:
    """A dataset must look like PASCAL_2007: images in train/ and their labels in train.csv."""
    missing = [
        name
        for name, ok in (
            ("train/", (path / "train").is_dir()),
            ("train.csv", (path / "train.csv").is_file()),
        )
        if not ok
    ]
    if missing:
        raise DatasetError(
            f"{origin} is not a dataset in the PASCAL_2007 layout: {' and '.join(missing)} "
            f"missing in {path}. Expected a folder holding train/ (the images) and train.csv "
            "(fname,labels,is_valid), or an archive with one such folder at its top."
        )
    return path
