"""The safety check on an archive, made before anything is written: members, links, limits.

Why our own check (see `multitag.data.datasets` for the whole story): fastai's `untar_data`
extracts with `shutil.unpack_archive`, which on Python 3.11 applies no member filter and no
size limit. Every member is read (so a truncated download fails here, not halfway through
extraction), counted against `ArchiveLimits`, and every name and link target is checked, so
the error names the offending member rather than leaving a half-written tree to clean up.
"""

from __future__ import annotations

import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import urlparse

from multitag.errors import InputError

ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".tbz2", ".tar.bz2", ".txz", ".tar.xz", ".zip")

READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError)


class DatasetError(InputError):
    """A dataset could not be acquired; the message says which URL/path and what to do.

    `retryable` is True where trying again can help (network trouble, a truncated download)
    and False where it cannot (wrong layout, unsafe archive, checksum mismatch), so callers
    with retries (the Prefect task) retry only the former; `multitag.errors.exit_code_of`
    makes a retryable one exit 1 (the run failed), the rest 2 (the input cannot be used).
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


def archive_name(url: str) -> str:
    """The file name fastdownload gives the archive (its URL's last path part)."""
    name = PurePosixPath(urlparse(url).path).name
    if not name.lower().endswith(ARCHIVE_SUFFIXES):
        raise DatasetError(
            f"{url} does not name an archive: expected a file ending in "
            f"{', '.join(ARCHIVE_SUFFIXES)}, or a dataset folder."
        )
    return name


def archive_stem(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_zip(archive: Path) -> bool:
    return archive.name.lower().endswith(".zip")


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
        if is_zip(archive):
            members = _zip_members(archive, budget)
        else:
            infos = _tar_infos(archive, budget)
            members = [_Member(i.name, _tar_kind(i), i.linkname) for i in infos]
    except DatasetError:
        raise
    except READ_ERRORS as e:
        raise DatasetError(
            f"The archive from {where} is incomplete or corrupt ({e}). It was not extracted. "
            "If it was downloaded, retry: the partial copy is discarded and fetched again; "
            "if it is a local file, re-create it.",
            retryable=True,
        ) from e
    _check_members(members, where)
    _stdlib_second_opinion(infos, where)


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
