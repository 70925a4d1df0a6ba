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

Cache layout under `<home>/datasets/` (local disks only):
    <stem>-<hash>/                 the dataset, what `acquire` returns (hash of the URL)
    .fastai/config.ini             fastdownload's config (paths are overridden on every call)
    .fastai/archives/<key>/        the kept archive, for repairs without a download
    .fastai/staging/<key>/.tmp-<pid>-<host>-*/  temporary extraction, removed when done
                                   (or by a later call once that pid is gone)
    .fastai/locks/<key>.lock       one acquire per dataset at a time
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import lzma
import os
import posixpath
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import url2pathname

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one process per cache is assumed
    fcntl = None  # type: ignore[assignment]

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

MANIFEST_NAME = ".multitag-manifest.json"
_MANIFEST_FORMAT = "multitag-dataset/1"
_CACHE_DIR = ".fastai"
_PACK_MTIME = 0  # fixed timestamps make packed archives byte-for-byte reproducible
_ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".tbz2", ".tar.bz2", ".txz", ".tar.xz", ".zip")
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError)


class DatasetError(Exception):
    """A dataset could not be acquired; the message says which URL/path and what to do.

    `retryable` is True where trying again can help (network trouble, a truncated download)
    and False where it cannot (wrong layout, unsafe archive, checksum mismatch), so callers
    with retries (the Prefect task) retry only the former.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class UnsafeArchiveError(DatasetError):
    """An archive member would land outside the dataset folder (or is a device/fifo)."""

    def __init__(self, message: str, *, member: str) -> None:
        super().__init__(message, retryable=False)
        self.member = member


class ArchiveTooLargeError(DatasetError):
    """An archive would expand past `ArchiveLimits` (a decompression bomb, or a wrong URL)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may expand to; checked from its member list before anything is written.

    Defaults: PASCAL_2007 is ~450 MB in ~10k files at a compression ratio of ~1 (JPEGs), so
    these leave 40x headroom on size and members while a bomb (GBs of zeros in a few MB, or
    millions of empty files) is refused. The ratio only applies past 1 MiB: small archives
    cannot fill a disk. Override per call, or with MULTITAG_ARCHIVE_MAX_BYTES /
    MULTITAG_ARCHIVE_MAX_MEMBERS / MULTITAG_ARCHIVE_MAX_RATIO.
    """

    max_bytes: int = 20 * 1024**3
    max_members: int = 400_000
    max_ratio: float = 100.0
    ratio_floor_bytes: int = 1024**2

    @classmethod
    def from_env(cls) -> ArchiveLimits:
        def read(name: str, default: float, kind: type) -> Any:
            text = os.environ.get(name)
            if not text:
                return default
            try:
                value = kind(float(text))
            except ValueError as e:
                raise DatasetError(f"{name}={text!r} is not a number.") from e
            if value <= 0:
                raise DatasetError(f"{name}={text!r} must be positive.")
            return value

        d = cls()
        return cls(
            max_bytes=read("MULTITAG_ARCHIVE_MAX_BYTES", d.max_bytes, int),
            max_members=read("MULTITAG_ARCHIVE_MAX_MEMBERS", d.max_members, int),
            max_ratio=read("MULTITAG_ARCHIVE_MAX_RATIO", d.max_ratio, float),
        )


class _Budget:
    """Running totals of a member scan; raises as soon as a limit is passed (so a bomb is
    refused after reading past the limit, not after decompressing all of it)."""

    def __init__(self, limits: ArchiveLimits, archive_bytes: int, where: str) -> None:
        self.limits, self.archive_bytes, self.where = limits, max(archive_bytes, 1), where
        self.members = 0
        self.total = 0

    def add(self, size: int) -> None:
        self.members += 1
        self.total += max(size, 0)
        lim = self.limits
        if self.members > lim.max_members:
            self._refuse(f"has more than {lim.max_members:,} members", "MEMBERS")
        if self.total > lim.max_bytes:
            self._refuse(f"expands to more than {lim.max_bytes:,} bytes", "BYTES")
        ratio = self.total / self.archive_bytes
        if self.total > lim.ratio_floor_bytes and ratio > lim.max_ratio:
            self._refuse(
                f"expands {ratio:,.0f}x its size ({self.total:,} bytes from "
                f"{self.archive_bytes:,}), over the limit of {lim.max_ratio:g}x",
                "RATIO",
            )

    def _refuse(self, what: str, env: str) -> None:
        raise ArchiveTooLargeError(
            f"Refused archive from {self.where}: it {what} (a decompression bomb, or not the "
            "dataset you meant). Nothing was extracted. If it is genuine, raise the limit with "
            f"MULTITAG_ARCHIVE_MAX_{env} or `acquire(..., limits=ArchiveLimits(...))`."
        )


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


# ----------------------------------------------------------------------------------- packing


def pack_dataset(src_dir: Path, archive: Path) -> Path:
    """Pack a dataset folder as fastai packs its datasets: a `.tgz` with one top folder.

    Members are sorted, timestamps/owners fixed and the gzip header carries no time, so the
    same folder always gives the same bytes (and the same sha256 to pin in `acquire`).
    Links and special files are refused: an archive we make must pass our own safety check.
    """
    src, dest = Path(src_dir).absolute(), Path(archive).absolute()
    if not src.is_dir():
        raise DatasetError(f"Cannot pack {src}: it is not a folder.")
    if not dest.name.endswith((".tgz", ".tar.gz")):
        raise DatasetError(
            f"Cannot pack into {dest}: the archive name must end in .tgz or .tar.gz."
        )
    if src in dest.parents:
        raise DatasetError(
            f"Cannot pack {src} into {dest}: the archive would be inside the folder."
        )
    entries = list(_pack_entries(src))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tgz", dir=dest.parent)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for rel, path in entries:
                _add_member(tar, posixpath.join(src.name, rel) if rel else src.name, path)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _pack_entries(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix name, path) for the root and everything under it, in sorted order."""
    yield "", root
    yield from _walk_sorted(root, root, "")


def _walk_sorted(root: Path, folder: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    for child in sorted(folder.iterdir(), key=lambda p: p.name):
        if folder == root and child.name == MANIFEST_NAME:
            continue  # our cache marker describes one extraction, not the dataset
        rel = prefix + child.name
        if child.is_symlink():
            raise DatasetError(
                f"Cannot pack {child}: it is a symbolic link, and links are not packed (they "
                "could point outside the dataset). Replace it with the file it points to."
            )
        if child.is_dir():
            yield rel, child
            yield from _walk_sorted(root, child, rel + "/")
        elif child.is_file():
            yield rel, child
        else:
            raise DatasetError(f"Cannot pack {child}: not a regular file or folder.")


def _add_member(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = _PACK_MTIME, 0, 0, "", ""
    if path.is_dir():
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        return
    info.mode, info.size = 0o644, path.stat().st_size
    with open(path, "rb") as f:
        tar.addfile(info, f)


# ------------------------------------------------------------------------------ safety scan


@dataclass(frozen=True)
class _Member:
    name: str  # as stored in the archive
    kind: str  # file | dir | symlink | hardlink | device | fifo | other
    link: str = ""


def check_archive(
    archive: Path, *, source: str | None = None, limits: ArchiveLimits | None = None
) -> None:
    """Refuse an archive that is incomplete, too big, or that would write outside its folder.

    Runs before anything is extracted: every member is read (so a truncated download fails
    here, not halfway through extraction), counted against `limits` (default
    `ArchiveLimits.from_env()`), and every name and link target is checked, so the error names
    the offending member rather than leaving a half-written tree to clean up.
    """
    where = source or str(archive)
    budget = _Budget(limits or ArchiveLimits.from_env(), archive.stat().st_size, where)
    infos: list[tarfile.TarInfo] = []
    try:
        if _is_zip(archive):
            members = _zip_members(archive, budget)
        else:
            infos = _tar_infos(archive, budget)
            members = [_Member(i.name, _tar_kind(i), i.linkname) for i in infos]
    except DatasetError:
        raise
    except _READ_ERRORS as e:
        raise DatasetError(
            f"The archive from {where} is incomplete or corrupt ({e}). It was not extracted. "
            "If it was downloaded, retry: the partial copy is discarded and fetched again; "
            "if it is a local file, re-create it.",
            retryable=True,
        ) from e
    _check_members(members, where)
    _stdlib_second_opinion(infos, where)


def _is_zip(archive: Path) -> bool:
    return archive.name.lower().endswith(".zip")


def _tar_infos(archive: Path, budget: _Budget) -> list[tarfile.TarInfo]:
    """Every member of a tar; iterating reads the whole (decompressed) stream, and stops at
    the first member past the budget."""
    out = []
    with tarfile.open(archive, "r:*") as tar:
        for info in tar:
            budget.add(info.size if info.isreg() else 0)
            out.append(info)
    return out


def _stdlib_second_opinion(infos: list[tarfile.TarInfo], where: str) -> None:
    """Python's own 'data' extraction filter, in case our rules missed a trick."""
    probe_root = os.path.join(os.sep, "multitag-extract-check")
    for info in infos:
        try:
            tarfile.data_filter(info, probe_root)
        except tarfile.FilterError as e:
            raise UnsafeArchiveError(
                f"Refused archive from {where}: member {info.name!r} is unsafe ({e}). Nothing "
                "was extracted; use an archive whose members all stay inside its folder.",
                member=info.name,
            ) from e


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "fifo"
    return "other"


def _zip_members(archive: Path, budget: _Budget) -> list[_Member]:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():  # declared sizes first: testzip would inflate a bomb
            budget.add(info.file_size)
        bad = zf.testzip()  # reads every member and checks its CRC
        if bad is not None:
            raise DatasetError(
                f"The archive {archive.name} is corrupt: member {bad!r} fails its CRC check. "
                "Retry the download, or re-create the archive.",
                retryable=True,
            )
        out = []
        for info in zf.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                out.append(_Member(info.filename, "symlink", zf.read(info).decode("utf-8")))
            else:
                out.append(_Member(info.filename, "dir" if info.is_dir() else "file"))
        return out


def _check_members(members: list[_Member], where: str) -> None:
    if not members:
        raise DatasetError(f"The archive from {where} is empty; nothing to extract.")
    root = _single_top_folder(members)
    links = {_norm(m.name) for m in members if m.kind == "symlink"}
    for m in members:
        reason = _member_problem(m, root, links)
        if reason:
            raise UnsafeArchiveError(
                f"Refused archive from {where}: member {m.name!r} {reason}. Nothing was "
                "extracted. Use an archive whose members all stay inside its folder "
                "(`multitag.data.datasets.pack_dataset` makes one).",
                member=m.name,
            )


def _single_top_folder(members: list[_Member]) -> str:
    """The folder that becomes the dataset when the archive has one top item (fastai's way).

    Links must stay inside it: untar_data moves only that folder into place, so a link to
    its sibling would end up pointing outside the dataset.
    """
    tops = {_norm(m.name).split("/")[0] for m in members} - {"."}  # `tar -C dir .` adds "./"
    return tops.pop() if len(tops) == 1 else ""


def _member_problem(m: _Member, root: str, links: set[str]) -> str | None:
    if m.kind == "device":
        return "is a device file"
    if m.kind == "fifo":
        return "is a named pipe (fifo)"
    if m.kind == "other":
        return "has a member type that a dataset never needs"
    problem = _path_problem(m.name)
    if problem:
        return problem
    name = _norm(m.name)
    through = _first_link_on_the_way("", name, links)
    if through:
        return f"is written through the symbolic link {through!r}"
    if m.kind not in ("symlink", "hardlink"):
        return None
    what = "symbolic link" if m.kind == "symlink" else "hard link"
    base = posixpath.dirname(name) if m.kind == "symlink" else ""  # tar hard links name a member
    problem = _link_problem(what, m.link, base, root)
    if problem:
        return problem
    hop = _first_link_on_the_way(base, m.link, links)
    # The kernel resolves each link before applying '..', so a lexically inside target that
    # passes through another link can still land outside: such chains are refused.
    return f"is a {what} whose target passes through the symbolic link {hop!r}" if hop else None


def _first_link_on_the_way(base: str, rel: str, links: set[str]) -> str | None:
    """The first symlink member crossed on the way from `base` along `rel` (not its end)."""
    here = base.split("/") if base else []
    steps = [s for s in rel.replace("\\", "/").split("/") if s not in ("", ".")]
    for i, step in enumerate(steps):
        if step == "..":
            if here:
                here.pop()
            continue
        here.append(step)
        if i < len(steps) - 1 and "/".join(here) in links:
            return "/".join(here)
    return None


def _path_problem(name: str) -> str | None:
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "climbs out of the target folder with '..'"
    return None


def _link_problem(what: str, link: str, base: str, root: str) -> str | None:
    if not link:
        return f"is a {what} with no target"
    if link.startswith(("/", "\\")) or PureWindowsPath(link).drive:
        return f"is a {what} to the absolute path {link!r}"
    target = posixpath.normpath(posixpath.join(base, link.replace("\\", "/")))
    inside = target != ".." and not target.startswith("../")
    if root:
        inside = inside and (target == root or target.startswith(root + "/"))
    return None if inside else f"is a {what} pointing outside the dataset folder ({link!r})"


def _norm(name: str) -> str:
    return posixpath.normpath(name.replace("\\", "/")).lstrip("/")


# --------------------------------------------------------------------------------- acquire


@dataclass(frozen=True)
class _Source:
    url: str  # what untar_data fetches: http(s):// or file://
    local: Path | None  # the file behind a file:// URL, to notice when it changes


@dataclass(frozen=True)
class _Cache:
    root: Path  # <home>/datasets
    key: str  # <stem>-<hash of the URL>

    @property
    def target(self) -> Path:
        return self.root / self.key

    @property
    def base(self) -> Path:
        return self.root / _CACHE_DIR

    @property
    def archive_rel(self) -> str:
        return f"archives/{self.key}"  # relative to base: no home path in fastai's config.ini

    @property
    def archive_dir(self) -> Path:
        return self.base / self.archive_rel

    @property
    def staging_dir(self) -> Path:
        return self.base / "staging" / self.key

    @property
    def lock(self) -> Path:
        return self.base / "locks" / f"{self.key}.lock"


def acquire(
    url: str | os.PathLike[str],
    home: str | None = None,
    *,
    force: bool = False,
    sha256: str | None = None,
    limits: ArchiveLimits | None = None,
) -> Path:
    """The folder of a PASCAL-layout dataset (train/, train.csv), fetched and cached if needed.

    `url`: http(s):// or file:// URL of an archive, a local archive path, or a local folder
    (checked for the layout and returned as it is). Archives are cached under
    `<home>/datasets/<stem>-<hash>`; `force` fetches and extracts again; `sha256` pins the
    archive's checksum (checked before the archive is even opened); `limits` bounds what it
    may expand to (default `ArchiveLimits.from_env()`).
    """
    source = _resolve_source(url)
    if isinstance(source, Path):
        return _check_layout(source, origin=os.fspath(url))
    expected = _normalise_sha256(sha256)
    limits = limits or ArchiveLimits.from_env()
    cache = _Cache(_datasets_root(home), _cache_key(source.url))
    _remove_dead_extractions(cache.base / "staging")
    with _locked(cache.lock):
        _remove_leftovers(cache)
        refetch = force
        if cache.target.exists() and not force:
            manifest = _read_manifest(cache.target)
            problem, stale = _cache_problem(cache.target, manifest, source, expected)
            if problem is None:
                log.info("dataset %s: cached at %s", source.url, cache.target)
                return cache.target
            log.warning("cached dataset %s %s; rebuilding it", cache.target, problem)
            refetch = stale or not _kept_archive_matches(cache, source.url, manifest)
        return _install(source, cache, expected, limits, refetch=refetch)


def _resolve_source(url: str | os.PathLike[str]) -> _Source | Path:
    text = os.fspath(url).strip()
    parsed = urlparse(text)
    if parsed.scheme in ("http", "https"):
        _archive_name(text)  # fail before any network call when the URL names no archive
        return _Source(text, None)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DatasetError(f"{text}: file:// URLs must point to this machine (file:///path).")
        path = Path(url2pathname(parsed.path))
    elif len(parsed.scheme) > 1:
        raise DatasetError(
            f"{text}: unsupported scheme {parsed.scheme!r}. Use an http(s):// or file:// URL "
            "of an archive, a local archive path, or a local dataset folder."
        )
    else:
        path = Path(text).expanduser()
    if path.is_dir():
        return path.absolute()
    if not path.is_file():
        raise DatasetError(f"{text}: no such archive or folder ({path} does not exist).")
    path = path.resolve()
    uri = path.as_uri()
    _archive_name(uri)
    return _Source(uri, path)


def _archive_name(url: str) -> str:
    """The file name fastdownload gives the archive (its URL's last path part)."""
    name = PurePosixPath(urlparse(url).path).name
    if not name.lower().endswith(_ARCHIVE_SUFFIXES):
        raise DatasetError(
            f"{url} does not name an archive: expected a file ending in "
            f"{', '.join(_ARCHIVE_SUFFIXES)}, or a dataset folder."
        )
    return name


def _archive_stem(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(_ARCHIVE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _cache_key(url: str) -> str:
    """Folder name: readable stem plus a hash of the URL, so same-named archives never share."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", _archive_stem(_archive_name(url))).strip("._") or "data"
    return f"{stem[:80]}-{hashlib.sha256(url.encode('utf-8')).hexdigest()[:12]}"


def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise DatasetError(f"sha256={sha256!r} is not a sha256 digest (64 hex digits).")
    return value


def _datasets_root(home: str | None) -> Path:
    from multitag.config import get_settings
    from multitag.storage import fs_and_path, is_local

    uri = get_settings(home).datasets
    if not is_local(uri):
        raise DatasetError(
            f"Datasets are extracted to a local disk, but the storage root is {uri!r}. Pass a "
            "local home (or set MULTITAG_HOME to a local folder) for acquire()."
        )
    return Path(fs_and_path(uri)[1])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One acquire per dataset at a time: concurrent flows must not extract over each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _remove_leftovers(cache: _Cache) -> None:
    """Staging folders and `.part` files of an acquire that was killed (we hold the lock)."""
    shutil.rmtree(cache.staging_dir, ignore_errors=True)
    if cache.archive_dir.is_dir():
        for part in cache.archive_dir.glob("*.part"):
            part.unlink()


_TEMP_PREFIX = ".tmp-"  # the same `.tmp-<pid>-<host>-` naming as multitag.storage's temp files


def _extraction_prefix() -> str:
    return f"{_TEMP_PREFIX}{os.getpid()}-{socket.gethostname()}-"


def _remove_dead_extractions(staging_root: Path, *, max_age_s: float = 86_400.0) -> list[Path]:
    """Delete extraction folders of any dataset whose extractor was killed; returns them.

    Why not only under the lock: a run killed while extracting one dataset would otherwise
    leave up to the whole archive's size on disk until that same dataset is acquired again.
    A folder is dead when its pid is gone on this host (or, from another host sharing the
    cache, when it is older than `max_age_s`); a live extractor's folder is never touched.
    """
    removed: list[Path] = []
    host, now = socket.gethostname(), datetime.now(UTC).timestamp()
    for folder in staging_root.glob(f"*/{_TEMP_PREFIX}*"):
        pid_text, _, rest = folder.name[len(_TEMP_PREFIX) :].partition("-")
        owner_host = rest.rpartition("-")[0]
        if not pid_text.isdigit() or not folder.is_dir() or folder.is_symlink():
            continue
        if owner_host == host:
            dead = not _pid_alive(int(pid_text))
        else:
            dead = now - folder.stat().st_mtime >= max_age_s
        if dead:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


# -------------------------------------------------------------------------- cache integrity


def _read_manifest(target: Path) -> dict[str, Any] | None:
    from multitag.storage import read_json

    path = target / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = read_json(str(path))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("format") == _MANIFEST_FORMAT
    return data if ok and isinstance(data.get("files"), dict) else None


def _cache_problem(
    target: Path, manifest: dict[str, Any] | None, source: _Source, expected: str | None
) -> tuple[str | None, bool]:
    """What is wrong with a cached dataset (None: nothing), and whether its source is stale.

    Cheap on purpose (names and sizes, no hashing): it runs on every cache hit.
    """
    if manifest is None:
        return f"has no valid {MANIFEST_NAME} (interrupted, or not made by acquire)", False
    if manifest.get("url") != source.url:
        return f"was extracted from {manifest.get('url')!r}, not {source.url!r}", True
    if expected and manifest.get("archive_sha256") != expected:
        return "came from an archive whose sha256 differs from the one asked for", True
    if source.local is not None and manifest.get("source_stat") != _stat_of(source.local):
        return f"is older than its source archive {source.local} (which changed)", True
    damage = _damage(target, manifest["files"])
    return (f"is damaged: {damage}", False) if damage else (None, False)


def _damage(target: Path, files: dict[str, int]) -> str | None:
    missing, resized = [], []
    for rel, size in files.items():
        try:
            actual = (target / rel).lstat().st_size
        except FileNotFoundError:
            missing.append(rel)
            continue
        if actual != size:
            resized.append(rel)
    parts = []
    if missing:
        parts.append(f"{len(missing)} file(s) missing ({_sample(missing)})")
    if resized:
        parts.append(f"{len(resized)} file(s) changed size ({_sample(resized)})")
    return "; ".join(parts) or None


def _sample(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _kept_archive_matches(cache: _Cache, url: str, manifest: dict[str, Any] | None) -> bool:
    """Can a damaged dataset be rebuilt from the archive we kept, without downloading?"""
    archive = cache.archive_dir / _archive_name(url)
    if not archive.is_file():
        return False
    known = (manifest or {}).get("archive_sha256")
    return known is None or _sha256_file(archive) == known


def _stat_of(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_sizes(folder: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath, fname)
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST_NAME:
                sizes[rel] = path.lstat().st_size
    return sizes


def _write_manifest(folder: Path, source: _Source, archive: Path, digest: str) -> None:
    from multitag.storage import write_json_atomic

    files = _file_sizes(folder)
    write_json_atomic(
        str(folder / MANIFEST_NAME),
        {
            "format": _MANIFEST_FORMAT,
            "url": source.url,
            "archive": archive.name,
            "archive_sha256": digest,
            "source_stat": _stat_of(source.local) if source.local else None,
            "extracted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "n_files": len(files),
            "total_bytes": sum(files.values()),
            "files": files,
        },
    )


# ------------------------------------------------------------------ download, extract, publish


def _install(
    source: _Source, cache: _Cache, expected: str | None, limits: ArchiveLimits, *, refetch: bool
) -> Path:
    """Download (unless kept), check, extract into a temp folder, then rename into place."""
    archive = _download(source.url, cache, refetch=refetch)
    try:
        digest = _sha256_file(archive)  # first: a wrong archive is not even parsed
        if expected and digest != expected:
            raise DatasetError(
                f"The archive from {source.url} has sha256 {digest}, expected {expected}. "
                "It was discarded and nothing was extracted: check the URL and the checksum."
            )
        check_archive(archive, source=source.url, limits=limits)
    except DatasetError:
        _discard_archive(cache)
        raise
    cache.staging_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_extraction_prefix(), dir=cache.staging_dir))
    try:
        extracted = _extract(source.url, archive, staging)
        try:
            _check_layout(extracted, origin=source.url)
        except DatasetError:
            _discard_archive(cache)
            raise
        _write_manifest(extracted, source, archive, digest)
        _publish(extracted, cache.target, staging)
    finally:
        shutil.rmtree(cache.staging_dir, ignore_errors=True)
    log.info("dataset %s: extracted to %s", source.url, cache.target)
    return cache.target


def _fastdownload_args(cache: _Cache, data_rel: str) -> dict[str, str]:
    """The paths untar_data passes to FastDownload; relative to base, so config.ini stays
    free of the home path (configparser chokes on '%' in values)."""
    return {"base": str(cache.base), "archive": cache.archive_rel, "data": data_rel}


def _ensure_config(cache: _Cache) -> None:
    """fastdownload writes config.ini on first use; write it atomically ourselves so two
    processes starting at once never read a half-written file."""
    from multitag.storage import write_bytes_atomic

    cfg = cache.base / "config.ini"
    if not cfg.exists():
        write_bytes_atomic(str(cfg), b"[DEFAULT]\ndata = staging\narchive = archives\n")


def _download(url: str, cache: _Cache, *, refetch: bool) -> Path:
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
            _discard_archive(cache)


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


def _discard_archive(cache: _Cache) -> None:
    """A bad or partial archive must not satisfy the next call: it downloads again."""
    shutil.rmtree(cache.archive_dir, ignore_errors=True)


def _extract(url: str, archive: Path, staging: Path) -> Path:
    """Extract a checked archive into `staging/<stem>`; the dataset folder inside it.

    fastai's layout rule (as `untar_data` applies it): an archive with one top item is that
    item, otherwise the folder named after the archive. Tar members go through tarfile's
    `data` filter (no setuid/setgid/sticky bits, no group/other write, no links out: the
    scan already refused those, this is the stdlib's own guard on the write itself); zip
    members are written with 0644 files and 0755 folders, whatever the archive recorded.
    """
    out = staging / _archive_stem(archive.name)
    out.mkdir()
    try:
        if _is_zip(archive):
            _extract_zip(archive, out)
        else:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(out, filter="data")
    except (*_READ_ERRORS, tarfile.FilterError) as e:
        raise DatasetError(
            f"Extracting the archive from {url} failed ({type(e).__name__}: {e}). Nothing was "
            "installed; retry, or pass force=True to download it again.",
            retryable=True,
        ) from e
    children = list(out.iterdir())
    return children[0] if len(children) == 1 and children[0].is_dir() else out


def _extract_zip(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            path = Path(zf.extract(info, out))
            path.chmod(0o755 if info.is_dir() else 0o644)
    for folder, _, _ in os.walk(out):  # folders zipfile made on the way (umask modes)
        os.chmod(folder, 0o755)


def _publish(extracted: Path, target: Path, staging: Path) -> None:
    """Rename the finished folder into place (same filesystem, so readers see all or none)."""
    if not (target.exists() or target.is_symlink()):
        os.rename(extracted, target)
        return
    old = staging / "replaced"
    os.rename(target, old)  # removed with the staging folder
    try:
        os.rename(extracted, target)
    except OSError:
        os.rename(old, target)
        raise


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
