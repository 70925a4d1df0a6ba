"""The content hash of a dataset folder: what lineage records and what a cache is keyed by.

Why a hash of every file's bytes (not of names and sizes, as the retrain stage key once did):
a relabelled row keeps train.csv's size more often than not, and a re-encoded image can keep
its size too; lineage must say *which bytes* a model was trained on. Each file is streamed
through sha256 (nothing is held in memory), and the folder's hash is the sha256 of the sorted
`<relative path>\\t<size>\\t<sha256>` lines, so it depends on content and names, never on
mtimes, the walk order or where the folder lives.

Left out: top-level entries whose name starts with `.` or `_` (the cache manifest,
`_reports/` that the contract check writes next to the data): they are ours, not the data's.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from multitag.hashing import sha256_file

FINGERPRINT_FORMAT = "multitag-content/1"


@dataclass(frozen=True)
class Fingerprint:
    """A dataset folder's content hash and the size of what it covers."""

    sha256: str
    n_files: int
    total_bytes: int

    def to_dict(self) -> dict[str, object]:
        return {
            "format": FINGERPRINT_FORMAT,
            "sha256": self.sha256,
            "n_files": self.n_files,
            "total_bytes": self.total_bytes,
        }


def dataset_files(folder: Path) -> list[str]:
    """The data files of a dataset folder, as sorted posix paths relative to it."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        top = Path(dirpath) == folder
        if top:
            dirnames[:] = [d for d in dirnames if not is_ours(d)]
        for name in filenames:
            if top and is_ours(name):
                continue
            out.append(Path(dirpath, name).relative_to(folder).as_posix())
    return sorted(out)


def is_ours(name: str) -> bool:
    """A top-level name the data never has: ours (manifest, reports), or hidden."""
    return name.startswith((".", "_"))


def listing_sha256(entries: list[tuple[str, int, str]]) -> str:
    """sha256 of `(relative path, size, file sha256)` entries, in path order."""
    digest = hashlib.sha256()
    for rel, size, sha in sorted(entries):
        digest.update(f"{rel}\t{size}\t{sha}\n".encode())
    return digest.hexdigest()


def fingerprint_folder(folder: str | Path) -> Fingerprint:
    """Content hash of every data file under `folder` (train.csv, train/, test/, ...)."""
    root = Path(folder)
    entries = [
        (rel, (root / rel).stat().st_size, sha256_file(root / rel)) for rel in dataset_files(root)
    ]
    return Fingerprint(
        sha256=listing_sha256(entries),
        n_files=len(entries),
        total_bytes=sum(size for _, size, _ in entries),
    )
