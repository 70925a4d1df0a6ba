"""The helpers every package shares: sha256 (multitag.hashing), folder publishing
(multitag.storage.publish_folder) and library versions (multitag.runtime)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import fsspec
import pytest

from multitag import hashing, runtime, storage


def test_every_sha256_helper_agrees_with_hashlib(tmp_path: Path) -> None:
    data = os.urandom(hashing.CHUNK_BYTES * 2 + 17)  # several chunks and a partial one
    expected = hashlib.sha256(data).hexdigest()
    path = tmp_path / "blob"
    path.write_bytes(data)
    mem = "memory://hashing-test/blob"
    fsspec.filesystem("memory").pipe(mem, data)

    sink = io.BytesIO()
    assert hashing.sha256_stream(io.BytesIO(data), sink=sink) == expected
    assert sink.getvalue() == data  # the copy made while hashing is the whole stream
    assert hashing.sha256_bytes(data) == expected
    assert hashing.sha256_file(path) == expected
    assert hashing.sha256_file(str(path)) == expected
    assert hashing.sha256_uri(str(path)) == expected
    assert hashing.sha256_uri(mem) == expected
    assert hashing.sha256_bytes(b"") == hashlib.sha256(b"").hexdigest()


def _folder(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "f.txt").write_text(content)
    return path


def test_publish_folder_replaces_the_old_folder_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = _folder(tmp_path / "out" / "ds", "old")
    staged = _folder(tmp_path / "out" / ".tmp-ds", "new")
    assert storage.publish_folder(staged, target) is True
    assert (target / "f.txt").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds"]


def test_publish_folder_sets_the_old_folder_aside_where_asked(tmp_path: Path) -> None:
    target = _folder(tmp_path / "ds", "old")
    staged = _folder(tmp_path / "staging" / "x", "new")
    aside = tmp_path / "staging" / "replaced"
    assert storage.publish_folder(staged, target, aside=aside) is True
    assert (target / "f.txt").read_text() == "new"
    assert not aside.exists() and not staged.exists()


def test_a_publisher_that_loses_the_race_discards_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _folder(tmp_path / "ds", "old")
    mine = _folder(tmp_path / ".tmp-mine", "mine")
    theirs = _folder(tmp_path / ".tmp-theirs", "theirs")
    real_rename = os.rename

    def rename(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        if Path(src) == mine:  # the other publisher lands between our two renames
            real_rename(theirs, target)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    assert storage.publish_folder(mine, target) is False
    assert (target / "f.txt").read_text() == "theirs"
    assert not mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # old folder removed too


def test_a_failed_publish_puts_the_old_folder_back_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _folder(tmp_path / "ds", "old")
    staged = _folder(tmp_path / ".tmp-new", "new")
    real_rename = os.rename

    def rename(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        if Path(src) == staged:
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        storage.publish_folder(staged, target)
    assert (target / "f.txt").read_text() == "old"
    assert (staged / "f.txt").read_text() == "new"  # the caller's to clean up or retry


def test_library_versions_read_metadata_without_importing() -> None:
    from importlib import metadata

    versions = runtime.library_versions(("numpy", "no-such-distribution-xyz"))
    assert versions["numpy"] == metadata.version("numpy")
    assert "no-such-distribution-xyz" not in versions  # absent: not part of this environment
    assert versions["python"] and versions["platform"]
    default = runtime.library_versions()
    assert set(default) - {"python", "platform"} <= set(runtime.MODEL_LIBRARIES)
    assert default["pillow"] == metadata.version("pillow")


def test_loaded_library_versions_carry_the_build_label() -> None:
    import numpy

    assert runtime.library_versions(("numpy",), loaded=True)["numpy"] == numpy.__version__
