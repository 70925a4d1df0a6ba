"""Extraction of a checked archive into a temp folder that a later run can clean up.

Tar members go through tarfile's `data` filter and zip members get plain 0644/0755 modes.
The temp folder is named `.tmp-<pid>-<host>-*` (the naming of `multitag.storage`'s temp
files) so that any later acquire can tell a killed extractor's leftovers from a live one's.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path

from multitag.data.archives import READ_ERRORS, DatasetError, archive_stem, is_zip
from multitag.storage import TEMP_PREFIX, temp_is_stale


def extract_archive(url: str, archive: Path, staging: Path) -> Path:
    """Extract a checked archive into `staging/<stem>`; the dataset folder inside it.

    fastai's layout rule (as `untar_data` applies it): an archive with one top item is that
    item, otherwise the folder named after the archive. Tar members go through tarfile's
    `data` filter (no setuid/setgid/sticky bits, no group/other write, no links out: the
    scan already refused those, this is the stdlib's own guard on the write itself); zip
    members are written with 0644 files and 0755 folders, whatever the archive recorded.
    """
    out = staging / archive_stem(archive.name)
    out.mkdir()
    try:
        if is_zip(archive):
            _extract_zip(archive, out)
        else:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(out, filter="data")
    except (*READ_ERRORS, tarfile.FilterError) as e:
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


def remove_dead_extractions(staging_root: Path, *, max_age_s: float = 86_400.0) -> list[Path]:
    """Delete extraction folders of any dataset whose extractor was killed; returns them.

    Why not only under the lock: a run killed while extracting one dataset would otherwise
    leave up to the whole archive's size on disk until that same dataset is acquired again.
    Dead is `storage.temp_is_stale` (the rule for temp files): a live extractor's folder is
    never touched.
    """
    removed: list[Path] = []
    for folder in staging_root.glob(f"*/{TEMP_PREFIX}*"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        if temp_is_stale(folder.name, folder.stat().st_mtime, max_age_s=max_age_s):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
