"""Packing a dataset folder the way fastai packs its datasets, reproducibly.

Why reproducible: the same folder always gives the same bytes, so its sha256 can be pinned
in `acquire(..., sha256=...)` and `multitag retrain --data-sha256`.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from multitag.data.archives import DatasetError
from multitag.data.cache import MANIFEST_NAME

_PACK_MTIME = 0  # fixed timestamps make packed archives byte-for-byte reproducible


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
