"""SHA256SUMS: its format, and checking a version's files against it before anything is used.

Why a version is only as good as its SHA256SUMS: model.pkl is a pickle, so a changed byte
could run code when it is loaded. SHA256SUMS is written last and must list exactly the files
present; every file is hashed against it before it is read as data or unpickled.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping

from multitag.hashing import sha256_bytes, sha256_uri
from multitag.registry.errors import IncompleteVersionError, IntegrityError, VersionNotFoundError
from multitag.registry.layout import FILE_NAME_RE, REQUIRED_FILES, SUMS_FILE, version_uri
from multitag.storage import fs_and_path, join, read_bytes

_SUMS_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def format_sums(sums: Mapping[str, str]) -> bytes:
    """sha256sum's text format, so `sha256sum -c SHA256SUMS` works inside a version folder."""
    return "".join(f"{sums[name]}  {name}\n" for name in sorted(sums)).encode("ascii")


def parse_sums(data: bytes, *, where: str = SUMS_FILE) -> dict[str, str]:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"{where} is not ASCII text: {exc}") from exc
    sums: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        match = _SUMS_LINE_RE.match(line)
        if not match:
            raise IntegrityError(f"{where} line {lineno} is not '<sha256 hex>  <name>': {line!r}")
        digest, name = match.groups()
        if not FILE_NAME_RE.match(name) or name == SUMS_FILE:
            raise IntegrityError(f"{where} line {lineno} names an invalid file {name!r}")
        if name in sums:
            raise IntegrityError(f"{where} lists {name!r} twice")
        sums[name] = digest
    return sums


def mismatch_error(version: str, name: str, expected: str, actual: str) -> IntegrityError:
    return IntegrityError(
        f"{name} of model version {version} does not match SHA256SUMS: expected sha256 "
        f"{expected}, found {actual}. The file changed after registration; it was not loaded. "
        "Register the model again as a new version."
    )


def check_sha(version: str, name: str, data: bytes, expected: str) -> None:
    actual = sha256_bytes(data)
    if actual != expected:
        raise mismatch_error(version, name, expected, actual)


def list_names(vdir: str, version: str) -> dict[str, int]:
    """File names (-> size) directly in a version folder."""
    fs, path = fs_and_path(vdir)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        entries = []
    if not entries:
        raise VersionNotFoundError(
            f"model version {version} not found at {vdir}; `multitag models list` shows versions"
        )
    return {
        posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
        for e in entries
        if e.get("type") != "directory"
    }


def read_sums(vdir: str, version: str, present: Mapping[str, int] | None = None) -> dict[str, str]:
    """SHA256SUMS, checked to cover exactly the files present (no hashing yet)."""
    present = list_names(vdir, version) if present is None else present
    if SUMS_FILE not in present:
        raise IncompleteVersionError(
            f"model version {version} is incomplete: {vdir} has no {SUMS_FILE}, so its "
            "registration did not finish and its files cannot be trusted. Delete the folder "
            "and register the model again."
        )
    sums = parse_sums(read_bytes(join(vdir, SUMS_FILE)), where=f"{version}/{SUMS_FILE}")
    if missing := [name for name in REQUIRED_FILES if name not in sums]:
        raise IntegrityError(f"{version}/{SUMS_FILE} does not list required files {missing}")
    if absent := sorted(set(sums) - set(present)):
        raise IntegrityError(
            f"model version {version}: files listed in {SUMS_FILE} are missing: {absent}"
        )
    if unlisted := sorted(set(present) - set(sums) - {SUMS_FILE}):
        raise IntegrityError(
            f"model version {version} holds files not in {SUMS_FILE}: {unlisted}; versions are "
            "immutable, so something wrote into it after registration"
        )
    return sums


def verify_files(vdir: str, version: str) -> dict[str, str]:
    sums = read_sums(vdir, version)
    for name in sorted(sums):
        actual = sha256_uri(join(vdir, name))
        if actual != sums[name]:
            raise mismatch_error(version, name, sums[name], actual)
    return sums


def verify_version(home: str | None, version: str) -> None:
    """Hash every file of a version against SHA256SUMS; raise IntegrityError on any mismatch."""
    verify_files(version_uri(home, version), version)


def read_verified(vdir: str, version: str, name: str, sums: Mapping[str, str]) -> bytes:
    data = read_bytes(join(vdir, name))
    check_sha(version, name, data, sums[name])
    return data
