"""Acquisition and packing: safe extraction, atomic installs, cache integrity, naming.

Every archive here is made by the test (malicious ones with tarfile/zipfile directly), and
sources are local paths or file:// URLs, so nothing touches the network.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from multitag.config import PASCAL_2007_URL
from multitag.data import archives, datasets, extraction
from multitag.data.datasets import (
    MANIFEST_NAME,
    DatasetError,
    UnsafeArchiveError,
    acquire,
    check_archive,
    pack_dataset,
)

# ---------------------------------------------------------------------------------- helpers


def make_tiny_dataset(dest: Path, *, n: int = 4, seed: int = 0, size: int = 16) -> Path:
    """A PASCAL-layout folder: noisy JPEGs (so archives are not trivially small) + train.csv."""
    rng = np.random.default_rng(seed)
    (dest / "train").mkdir(parents=True)
    (dest / "test").mkdir()
    rows = ["fname,labels,is_valid"]
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(dest / "train" / f"{i:03d}.jpg", quality=95)
        rows.append(f"{i:03d}.jpg,{'a b' if i % 2 else 'c'},{i % 3 == 0}")
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        dest / "test" / "t.jpg"
    )
    (dest / "train.csv").write_text("\n".join(rows) + f"\n# seed {seed}\n")
    return dest


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def tiny_archive(tmp_path: Path) -> Path:
    src = make_tiny_dataset(tmp_path / "src" / "tiny")
    return pack_dataset(src, tmp_path / "archives" / "tiny.tgz")


class UntarSpy:
    """Counts calls of the extraction step (`extraction.extract_archive`) and can forbid them."""

    def __init__(self, real: Callable[..., Path]) -> None:
        self.real, self.calls, self.forbidden = real, 0, False

    def __call__(self, *args: object, **kwargs: object) -> Path:
        assert not self.forbidden, "the archive was extracted, but nothing should be"
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def untar_spy(monkeypatch: pytest.MonkeyPatch) -> UntarSpy:
    spy = UntarSpy(extraction.extract_archive)
    monkeypatch.setattr(extraction, "extract_archive", spy)
    return spy


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


def leftovers(home: Path) -> list[str]:
    """Anything acquire left in the cache besides its config, lock files and empty folders."""
    root = home / "datasets"
    allowed = {
        ".fastai",
        ".fastai/config.ini",
        ".fastai/archives",
        ".fastai/staging",
        ".fastai/locks",
    }
    return sorted(
        p
        for p in tree(root)
        if p not in allowed and not (p.startswith(".fastai/locks/") and p.endswith(".lock"))
    )


def dataset_dirs(home: Path) -> list[str]:
    root = home / "datasets"
    return sorted(p.name for p in root.iterdir() if p.name != ".fastai") if root.exists() else []


def write_tgz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def tinfo(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def benign_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """A valid little dataset, so only the planted member makes an archive unsafe."""
    return [
        (tinfo("ds", tarfile.DIRTYPE), None),
        (tinfo("ds/train", tarfile.DIRTYPE), None),
        (tinfo("ds/train/a.jpg"), b"not really a jpeg"),
        (tinfo("ds/train.csv"), b"fname,labels,is_valid\na.jpg,x,False\n"),
    ]


# ------------------------------------------------------------------------------ basics


def test_default_url_is_fastais_pascal_2007_and_matches_config() -> None:
    from fastai.data.external import URLs

    assert datasets.default_dataset_url() == URLs.PASCAL_2007 == PASCAL_2007_URL


def test_shapes_generator_is_reexported() -> None:
    from multitag.data import shapes

    assert datasets.make_shapes_dataset is shapes.make_shapes_dataset
    assert datasets.SHAPE_CLASSES == shapes.SHAPE_CLASSES
    with pytest.raises(AttributeError):
        datasets.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------- packing


def test_pack_has_one_sorted_top_folder_without_links_or_absolute_paths(tiny_archive: Path) -> None:
    with tarfile.open(tiny_archive) as tar:
        infos = tar.getmembers()
    names = [i.name for i in infos]
    assert names[0] == "tiny"
    assert all(n == "tiny" or n.startswith("tiny/") for n in names)
    assert (
        "tiny/train.csv" in names and "tiny/train/000.jpg" in names and "tiny/test/t.jpg" in names
    )
    assert not any(n.startswith("/") or ".." in n.split("/") for n in names)
    assert all(i.isfile() or i.isdir() for i in infos)
    assert all(i.mtime == 0 and i.uid == 0 and i.uname == "" for i in infos)
    # parents come before children and siblings are sorted: a stable, reviewable order
    assert names.index("tiny/test") < names.index("tiny/test/t.jpg") < names.index("tiny/train")
    train_files = [n for n in names if n.startswith("tiny/train/")]
    assert train_files == sorted(train_files)


def test_pack_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    src = make_tiny_dataset(tmp_path / "ds")
    first = pack_dataset(src, tmp_path / "a" / "ds.tgz").read_bytes()
    os.utime(src / "train.csv", (1, 1))  # timestamps must not leak into the archive
    second = pack_dataset(src, tmp_path / "b" / "ds.tgz").read_bytes()
    assert first == second


def test_pack_refuses_links_nested_archives_and_other_suffixes(tmp_path: Path) -> None:
    src = make_tiny_dataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match="inside the folder"):
        pack_dataset(src, src / "ds.tgz")
    with pytest.raises(DatasetError, match=r"\.tgz or \.tar\.gz"):
        pack_dataset(src, tmp_path / "ds.zip")
    with pytest.raises(DatasetError, match="not a folder"):
        pack_dataset(tmp_path / "missing", tmp_path / "x.tgz")
    (src / "train" / "link.jpg").symlink_to(src / "train" / "000.jpg")
    with pytest.raises(DatasetError, match="symbolic link"):
        pack_dataset(src, tmp_path / "ds.tgz")
    assert not (tmp_path / "ds.tgz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_packed_archive_passes_the_safety_check(tiny_archive: Path) -> None:
    check_archive(tiny_archive)  # raises if anything is wrong


# --------------------------------------------------------------------- unsafe archives


def _planted(tmp_path: Path) -> dict[str, list[tuple[tarfile.TarInfo, bytes | None]]]:
    absolute = str(tmp_path / "abs-escape")
    return {
        # untar_data unpacks in <tmp>/tmpXXX/evil/: four levels up is tmp_path (see below)
        "dotdot": [(tinfo("ds/../../../../escape"), b"pwned")],
        "top_dotdot": [(tinfo("../../../escape"), b"pwned")],
        "absolute": [(tinfo(absolute), b"pwned")],
        "symlink_etc": [(tinfo("ds/etc", tarfile.SYMTYPE, "/etc"), None)],
        "symlink_up": [(tinfo("ds/up", tarfile.SYMTYPE, "../.."), None)],
        "symlink_sibling": [(tinfo("ds/sib", tarfile.SYMTYPE, "../elsewhere"), None)],
        "hardlink_out": [(tinfo("ds/hl", tarfile.LNKTYPE, "../outside.txt"), None)],
        "hardlink_abs": [(tinfo("ds/hl", tarfile.LNKTYPE, "/etc/passwd"), None)],
        "through_link": [
            (tinfo("ds/inner", tarfile.SYMTYPE, "train"), None),
            (tinfo("ds/inner/x.jpg"), b"written through a link"),
        ],
        # lexically ds/y, but the kernel resolves m first: ds/m/.. is ds's parent
        "link_chain": [
            (tinfo("ds/m", tarfile.SYMTYPE, "."), None),
            (tinfo("ds/x", tarfile.SYMTYPE, "m/../y"), None),
        ],
        "device": [(tinfo("ds/null", tarfile.CHRTYPE), None)],
        "fifo": [(tinfo("ds/pipe", tarfile.FIFOTYPE), None)],
    }


UNSAFE_CASES = [
    ("dotdot", "'..'"),
    ("top_dotdot", "'..'"),
    ("absolute", "absolute path"),
    ("symlink_etc", "absolute path '/etc'"),
    ("symlink_up", "pointing outside"),
    ("symlink_sibling", "pointing outside"),
    ("hardlink_out", "hard link pointing outside"),
    ("hardlink_abs", "hard link to the absolute path"),
    ("through_link", "through the symbolic link 'ds/inner'"),
    ("link_chain", "passes through the symbolic link 'ds/m'"),
    ("device", "device file"),
    ("fifo", "named pipe"),
]


@pytest.mark.parametrize(("case", "reason"), UNSAFE_CASES, ids=[c for c, _ in UNSAFE_CASES])
def test_unsafe_tar_is_refused_before_anything_is_extracted(
    case: str,
    reason: str,
    tmp_path: Path,
    home: Path,
    untar_spy: UntarSpy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # fastcore unpacks in the system temp dir: put it in tmp_path so an escape would show
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    planted = _planted(tmp_path)[case]
    archive = write_tgz(tmp_path / "in" / "evil.tgz", benign_members() + planted)
    before = tree(tmp_path)
    untar_spy.forbidden = True

    with pytest.raises(UnsafeArchiveError) as err:
        acquire(str(archive), str(home))

    bad = planted[-1][0].name
    assert err.value.member == bad
    assert repr(bad) in str(err.value) and reason in str(err.value)
    assert "Nothing was extracted" in str(err.value)
    assert not err.value.retryable
    new = {p for p in tree(tmp_path) - before if not p.startswith("home")}
    assert new == set(), f"written outside the cache: {new}"
    assert leftovers(home) == [], "an unsafe archive left something in the cache"
    assert not (tmp_path / "abs-escape").exists()


def _write_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ds/train.csv", "fname,labels,is_valid\na.jpg,x,False\n")
        zf.writestr("ds/train/a.jpg", b"jpeg")
        for info, data in entries:
            zf.writestr(info, data)
    return path


def _zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16
    return info, target.encode()


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (("ds/../../escape", b"x"), "'..'"),
        (("/abs-escape", b"x"), "absolute path"),
        (_zip_symlink("ds/etc", "/etc"), "absolute path '/etc'"),
        (_zip_symlink("ds/up", "../.."), "pointing outside"),
    ],
    ids=["dotdot", "absolute", "symlink_etc", "symlink_up"],
)
def test_unsafe_zip_is_refused(
    entry: tuple[zipfile.ZipInfo | str, bytes],
    reason: str,
    tmp_path: Path,
    home: Path,
    untar_spy: UntarSpy,
) -> None:
    archive = _write_zip(tmp_path / "in" / "evil.zip", [entry])
    untar_spy.forbidden = True
    with pytest.raises(UnsafeArchiveError, match=reason):
        acquire(str(archive), str(home))
    assert leftovers(home) == []


def test_benign_zip_extracts(tmp_path: Path, home: Path) -> None:
    archive = _write_zip(tmp_path / "in" / "ok.zip", [])
    path = acquire(str(archive), str(home))
    assert (path / "train.csv").is_file() and (path / "train" / "a.jpg").read_bytes() == b"jpeg"


def test_dot_prefixed_single_folder_still_confines_links(tmp_path: Path, home: Path) -> None:
    members = [(tinfo(".", tarfile.DIRTYPE), None)]
    members += [(tinfo("./" + i.name, i.type), d) for i, d in benign_members()]
    members.append((tinfo("./ds/sib", tarfile.SYMTYPE, "../other"), None))
    archive = write_tgz(tmp_path / "in" / "dot.tgz", members)
    with pytest.raises(UnsafeArchiveError, match="pointing outside"):
        acquire(str(archive), str(home))


def test_archive_made_with_tar_dot_extracts(tmp_path: Path, home: Path) -> None:
    """`tar -C ds -czf x.tgz .`: no top folder, members start with './'."""
    src = make_tiny_dataset(tmp_path / "ds")
    archive = tmp_path / "flat.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=".")
    path = acquire(str(archive), str(home))
    assert (path / "train.csv").read_bytes() == (src / "train.csv").read_bytes()


def test_internal_symlink_is_allowed(tmp_path: Path, home: Path) -> None:
    link = (tinfo("ds/current.csv", tarfile.SYMTYPE, "train.csv"), None)
    archive = write_tgz(tmp_path / "in" / "ok.tgz", [*benign_members(), link])
    path = acquire(str(archive), str(home))
    assert (path / "current.csv").read_text().startswith("fname,labels")


# -------------------------------------------------------------------------- acquisition


def test_local_archive_extracts_under_home_with_a_manifest(
    tiny_archive: Path, tmp_path: Path, home: Path, untar_spy: UntarSpy
) -> None:
    path = acquire(str(tiny_archive), str(home))

    assert path.parent == home / "datasets" and path.name.startswith("tiny-")
    assert untar_spy.calls == 1
    src = tmp_path / "src" / "tiny"
    assert (path / "train.csv").read_bytes() == (src / "train.csv").read_bytes()
    assert sorted(p.name for p in (path / "train").iterdir()) == [f"{i:03d}.jpg" for i in range(4)]
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["url"] == tiny_archive.resolve().as_uri()
    assert manifest["files"]["train.csv"] == (src / "train.csv").stat().st_size
    assert manifest["n_files"] == 6 and len(manifest["archive_sha256"]) == 64
    assert dataset_dirs(home) == [path.name]
    assert (home / "datasets" / ".fastai" / "archives" / path.name / "tiny.tgz").is_file()
    assert not list((home / "datasets" / ".fastai" / "staging").iterdir())


def test_default_home_is_multitag_home(tiny_archive: Path, _isolated_home: Path) -> None:
    assert acquire(str(tiny_archive)).parent == _isolated_home / "datasets"


def test_file_url_and_path_share_one_cache_entry(tiny_archive: Path, home: Path) -> None:
    assert acquire(tiny_archive.as_uri(), str(home)) == acquire(str(tiny_archive), str(home))
    assert len(dataset_dirs(home)) == 1


def test_cache_hit_returns_same_path_without_extracting(
    tiny_archive: Path, home: Path, untar_spy: UntarSpy
) -> None:
    first = acquire(str(tiny_archive), str(home))
    marker = (first / MANIFEST_NAME).stat().st_mtime_ns
    untar_spy.forbidden = True
    assert acquire(str(tiny_archive), str(home)) == first
    assert (first / MANIFEST_NAME).stat().st_mtime_ns == marker


def test_files_added_by_training_are_not_damage(
    tiny_archive: Path, home: Path, untar_spy: UntarSpy
) -> None:
    path = acquire(str(tiny_archive), str(home))
    (path / "models").mkdir()  # fastai saves next to the data by default
    (path / "models" / "model.pth").write_bytes(b"weights")
    untar_spy.forbidden = True
    assert acquire(str(tiny_archive), str(home)) == path


@pytest.mark.parametrize(
    "damage",
    ["delete_csv", "delete_image", "truncate_image", "delete_manifest"],
)
def test_damaged_cache_is_noticed_and_rebuilt_from_the_kept_archive(
    damage: str,
    tiny_archive: Path,
    home: Path,
    untar_spy: UntarSpy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = acquire(str(tiny_archive), str(home))
    kept = home / "datasets" / ".fastai" / "archives" / path.name / "tiny.tgz"
    kept_id = (kept.stat().st_ino, kept.stat().st_mtime_ns)
    good_csv = (path / "train.csv").read_bytes()
    good_img = (path / "train" / "001.jpg").read_bytes()
    {
        "delete_csv": lambda: (path / "train.csv").unlink(),
        "delete_image": lambda: (path / "train" / "001.jpg").unlink(),
        "truncate_image": lambda: (path / "train" / "001.jpg").write_bytes(good_img[:10]),
        "delete_manifest": lambda: (path / MANIFEST_NAME).unlink(),
    }[damage]()

    with caplog.at_level("WARNING", logger="multitag.data.datasets"):
        again = acquire(str(tiny_archive), str(home))

    assert again == path and untar_spy.calls == 2
    assert (path / "train.csv").read_bytes() == good_csv
    assert (path / "train" / "001.jpg").read_bytes() == good_img
    assert (path / MANIFEST_NAME).is_file()
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == kept_id, "should reuse the kept archive"
    assert "rebuilding" in caplog.text
    if damage == "delete_csv":
        assert "train.csv" in caplog.text


def test_damaged_cache_without_kept_archive_is_fetched_again(
    tiny_archive: Path, home: Path
) -> None:
    path = acquire(str(tiny_archive), str(home))
    kept = home / "datasets" / ".fastai" / "archives" / path.name / "tiny.tgz"
    kept.unlink()
    (path / "train.csv").unlink()
    assert acquire(str(tiny_archive), str(home)) == path
    assert (path / "train.csv").is_file() and kept.is_file()


def test_changed_local_archive_is_extracted_again(tmp_path: Path, home: Path) -> None:
    archive = pack_dataset(make_tiny_dataset(tmp_path / "v1" / "ds", seed=1), tmp_path / "ds.tgz")
    first = acquire(str(archive), str(home))
    pack_dataset(make_tiny_dataset(tmp_path / "v2" / "ds", seed=2), archive)
    second = acquire(str(archive), str(home))
    assert second == first
    assert (second / "train.csv").read_bytes() == (
        tmp_path / "v2" / "ds" / "train.csv"
    ).read_bytes()


def test_force_extracts_again(tiny_archive: Path, home: Path, untar_spy: UntarSpy) -> None:
    path = acquire(str(tiny_archive), str(home))
    (path / "stray.txt").write_text("left by someone")
    assert acquire(str(tiny_archive), str(home), force=True) == path
    assert untar_spy.calls == 2 and not (path / "stray.txt").exists()
    assert not list((home / "datasets" / ".fastai" / "staging").iterdir())


def test_truncated_archive_leaves_no_dataset_and_no_temp_files(
    tiny_archive: Path, home: Path
) -> None:
    data = tiny_archive.read_bytes()
    tiny_archive.write_bytes(data[: len(data) // 2])

    with pytest.raises(DatasetError) as err:
        acquire(str(tiny_archive), str(home))

    msg = str(err.value)
    assert tiny_archive.resolve().as_uri() in msg and "retry" in msg and "incomplete" in msg
    assert err.value.retryable
    assert dataset_dirs(home) == [] and leftovers(home) == []


def test_killed_extraction_leftovers_are_cleaned_on_the_next_call(
    tiny_archive: Path, home: Path
) -> None:
    path = acquire(str(tiny_archive), str(home))
    stale = home / "datasets" / ".fastai" / "staging" / path.name / "xdead" / "tiny"
    stale.mkdir(parents=True)
    (stale / "half.jpg").write_bytes(b"half")
    part = home / "datasets" / ".fastai" / "archives" / path.name / "tiny.tgz.part"
    part.write_bytes(b"partial")
    acquire(str(tiny_archive), str(home))
    assert not stale.exists() and not part.exists()


def test_same_file_name_from_two_sources_does_not_collide(tmp_path: Path, home: Path) -> None:
    a = pack_dataset(
        make_tiny_dataset(tmp_path / "a" / "data", seed=1), tmp_path / "a" / "data.tgz"
    )
    b = pack_dataset(
        make_tiny_dataset(tmp_path / "b" / "data", seed=2), tmp_path / "b" / "data.tgz"
    )
    path_a, path_b = acquire(str(a), str(home)), acquire(str(b), str(home))
    assert path_a != path_b and path_a.name.startswith("data-") and path_b.name.startswith("data-")
    assert (path_a / "train.csv").read_text().endswith("# seed 1\n")
    assert (path_b / "train.csv").read_text().endswith("# seed 2\n")
    assert acquire(str(a), str(home)) == path_a  # and each stays a cache hit


def test_sha256_is_enforced(tiny_archive: Path, home: Path) -> None:
    import hashlib

    good = hashlib.sha256(tiny_archive.read_bytes()).hexdigest()
    with pytest.raises(DatasetError, match="sha256"):
        acquire(str(tiny_archive), str(home), sha256="0" * 64)
    assert dataset_dirs(home) == [] and leftovers(home) == []
    path = acquire(str(tiny_archive), str(home), sha256=good.upper())
    assert (path / "train.csv").is_file()
    with pytest.raises(DatasetError, match="sha256"):  # a cached copy of other bytes is not trusted
        acquire(str(tiny_archive), str(home), sha256="1" * 64)
    with pytest.raises(DatasetError, match="64 hex digits"):
        acquire(str(tiny_archive), str(home), sha256="abc")


def test_archive_without_the_layout_is_refused(tmp_path: Path, home: Path) -> None:
    src = tmp_path / "src" / "notes"
    src.mkdir(parents=True)
    (src / "readme.txt").write_text("no images here")
    archive = pack_dataset(src, tmp_path / "notes.tgz")
    with pytest.raises(DatasetError, match=r"train/ and train\.csv missing"):
        acquire(str(archive), str(home))
    assert dataset_dirs(home) == [] and leftovers(home) == []


def test_concurrent_acquires_extract_once(
    tiny_archive: Path, home: Path, untar_spy: UntarSpy
) -> None:
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(acquire(str(tiny_archive), str(home))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1 and untar_spy.calls == 1


# ------------------------------------------------------------------ folders and bad input


def test_local_folder_is_returned_as_is(tmp_path: Path, home: Path) -> None:
    src = make_tiny_dataset(tmp_path / "ds")
    assert acquire(str(src), str(home)) == src
    assert acquire(src.as_uri(), str(home)) == src
    assert not (home / "datasets").exists(), "a folder must not be copied into the cache"


@pytest.mark.parametrize(("remove", "missing"), [("train.csv", "train.csv"), ("train", "train/")])
def test_folder_without_the_layout_is_refused(remove: str, missing: str, tmp_path: Path) -> None:
    import shutil

    src = make_tiny_dataset(tmp_path / "ds")
    target = src / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetError, match=f"{missing} missing") as err:
        acquire(str(src))
    assert str(src) in str(err.value)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("nosuchfs://bucket/data.tgz", "unsupported scheme 'nosuchfs'"),
        ("https://example.invalid/download?id=3", "does not name an archive"),
        ("file://otherhost/data.tgz", "this machine"),
    ],
)
def test_unusable_urls_fail_before_any_download(url: str, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        acquire(url)


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such archive or folder"):
        acquire(str(tmp_path / "nope.tgz"))


def test_remote_home_is_refused(tiny_archive: Path) -> None:
    with pytest.raises(DatasetError, match="local"):
        acquire(str(tiny_archive), "s3://bucket/prefix")


def _iter_names(archive: Path) -> Iterator[str]:
    with tarfile.open(archive) as tar:
        yield from tar.getnames()


def test_cached_dataset_can_be_repacked_without_its_manifest(
    tiny_archive: Path, tmp_path: Path, home: Path
) -> None:
    path = acquire(str(tiny_archive), str(home))
    again = pack_dataset(path, tmp_path / "repacked.tgz")
    assert not any(n.endswith(MANIFEST_NAME) for n in _iter_names(again))


# ------------------------------------------------------------------ limits, modes, temp space


def _bomb_tgz(path: Path, *, zeros: int = 8 * 1024**2) -> Path:
    """A valid little dataset plus one member of zeros: ~1000x compression."""
    return write_tgz(path, [*benign_members(), (tinfo("ds/train/zeros.jpg"), bytes(zeros))])


def test_a_tar_bomb_is_refused_before_anything_is_written(
    tmp_path: Path, home: Path, untar_spy: UntarSpy
) -> None:
    archive = _bomb_tgz(tmp_path / "in" / "bomb.tgz")
    assert archive.stat().st_size < 64 * 1024  # 8 MiB of zeros in a few KB
    untar_spy.forbidden = True
    with pytest.raises(datasets.ArchiveTooLargeError) as err:
        acquire(str(archive), str(home))
    msg = str(err.value)
    assert "expands" in msg and "over the limit of 100x" in msg and "Nothing was extracted" in msg
    assert "MULTITAG_ARCHIVE_MAX_RATIO" in msg and not err.value.retryable
    assert dataset_dirs(home) == [] and leftovers(home) == []


def test_a_zip_bomb_is_refused_from_its_declared_sizes(
    tmp_path: Path, home: Path, untar_spy: UntarSpy
) -> None:
    archive = tmp_path / "in" / "bomb.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ds/train.csv", "fname,labels,is_valid\na.jpg,x,False\n")
        zf.writestr("ds/train/a.jpg", bytes(8 * 1024**2))
    untar_spy.forbidden = True
    with pytest.raises(datasets.ArchiveTooLargeError, match="expands"):
        acquire(str(archive), str(home))
    assert dataset_dirs(home) == [] and leftovers(home) == []


def test_member_count_and_total_bytes_limits_are_configurable(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    many = [(tinfo(f"ds/train/{i:04d}.jpg"), b"x" * 100) for i in range(120)]
    archive = write_tgz(tmp_path / "in" / "many.tgz", [*benign_members(), *many])
    with pytest.raises(datasets.ArchiveTooLargeError, match="more than 100 members"):
        acquire(str(archive), str(home), limits=datasets.ArchiveLimits(max_members=100))
    monkeypatch.setenv("MULTITAG_ARCHIVE_MAX_BYTES", "5000")
    with pytest.raises(datasets.ArchiveTooLargeError, match=r"more than 5,000 bytes.*MAX_BYTES"):
        acquire(str(archive), str(home))
    assert dataset_dirs(home) == [] and leftovers(home) == []
    monkeypatch.setenv("MULTITAG_ARCHIVE_MAX_BYTES", "20000")
    assert len(list((acquire(str(archive), str(home)) / "train").iterdir())) == 121
    monkeypatch.setenv("MULTITAG_ARCHIVE_MAX_RATIO", "lots")
    with pytest.raises(DatasetError, match="MULTITAG_ARCHIVE_MAX_RATIO='lots' is not a number"):
        acquire(str(archive), str(home), force=True)


def test_the_sha256_is_checked_before_the_archive_is_parsed(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _bomb_tgz(tmp_path / "in" / "bomb.tgz")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a mismatched archive was parsed")

    monkeypatch.setattr(archives, "check_archive", never)
    with pytest.raises(DatasetError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}"):
        acquire(str(archive), str(home), sha256="0" * 64)
    assert dataset_dirs(home) == [] and leftovers(home) == []


def test_setuid_and_world_writable_bits_are_stripped(tmp_path: Path, home: Path) -> None:
    members = benign_members()
    members[0][0].mode = 0o777  # world-writable top folder
    evil = tinfo("ds/train/run.jpg")
    evil.mode = 0o6777  # setuid + setgid + world-writable
    archive = write_tgz(tmp_path / "in" / "modes.tgz", [*members, (evil, b"#!/bin/sh\n")])
    path = acquire(str(archive), str(home))
    for p in [path, *path.rglob("*")]:
        mode = p.stat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), p
        assert not mode & (stat.S_IWGRP | stat.S_IWOTH), (p, oct(mode))

    info = zipfile.ZipInfo("ds/train/z.jpg")
    info.external_attr = 0o106777 << 16  # a regular file with setuid/setgid, world-writable
    zpath = acquire(str(_write_zip(tmp_path / "in" / "modes.zip", [(info, b"z")])), str(home))
    for p in [zpath, *zpath.rglob("*")]:
        if p.name == MANIFEST_NAME:  # ours, written 0600
            continue
        assert stat.S_IMODE(p.stat().st_mode) in (0o644, 0o755), (p, oct(p.stat().st_mode))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_extractors_temp_folder_is_removed_by_any_later_acquire(
    tiny_archive: Path, tmp_path: Path, home: Path
) -> None:
    staging = home / "datasets" / ".fastai" / "staging"
    host = socket.gethostname()
    # Left by extractions of *another* dataset: one whose process is gone, one still running.
    dead = staging / "other-123" / f".tmp-{_dead_pid()}-{host}-abc123"
    live = staging / "other-123" / f".tmp-{os.getpid()}-{host}-def456"
    for folder in (dead, live):
        (folder / "other" / "train").mkdir(parents=True)
        (folder / "other" / "train" / "half.jpg").write_bytes(b"half" * 1000)
    acquire(str(tiny_archive), str(home))
    assert not dead.exists(), "a dead extractor's temp folder was left behind"
    assert (live / "other" / "train" / "half.jpg").is_file(), "a live extraction was removed"


def test_extraction_runs_in_a_temp_folder_named_after_its_process(
    tiny_archive: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []
    real = extraction.extract_archive

    def spy(url: str, archive: Path, staging: Path) -> Path:
        seen.append(staging)
        return real(url, archive, staging)

    monkeypatch.setattr(extraction, "extract_archive", spy)
    acquire(str(tiny_archive), str(home))
    [staging] = seen
    assert staging.name.startswith(f".tmp-{os.getpid()}-{socket.gethostname()}-")
    assert staging.is_relative_to(home / "datasets" / ".fastai" / "staging")
    assert not staging.exists()
    assert not list((home / "datasets" / ".fastai" / "staging").iterdir())


def test_retrain_takes_the_archive_sha256_from_the_cli() -> None:
    from pydantic import ValidationError

    from flows.cli import _retrain_params, build_parser

    digest = "ab" * 32
    args = build_parser().parse_args(["retrain", "--data", "x.tgz", "--data-sha256", digest])
    assert _retrain_params(args).data_sha256 == digest
    bad = build_parser().parse_args(["retrain", "--data", "x.tgz", "--data-sha256", "abc"])
    with pytest.raises(ValidationError, match="data_sha256"):
        _retrain_params(bad)


# ------------------------------------------- issue 17: any fsspec URL (memory:// stands in)


@pytest.fixture
def memfs() -> Iterator[Any]:
    """fsspec's in-memory store (process-wide), emptied after the test."""
    import fsspec

    fs = fsspec.filesystem("memory")
    yield fs
    fs.rm("/mt", recursive=True) if fs.exists("/mt") else None


def upload_folder(fs: Any, src: Path, prefix: str) -> None:
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        fs.pipe(f"{prefix}/{path.relative_to(src).as_posix()}", path.read_bytes())


def data_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


class GetSpy:
    """Records the objects a (sync) store downloads: its `get` goes through `get_file`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fs: Any) -> None:
        self.paths: list[str] = []
        real_get_file = type(fs).get_file

        def get_file(this: object, rpath: str, lpath: str, *a: object, **kw: object) -> object:
            self.paths.append(rpath)
            return real_get_file(this, rpath, lpath, *a, **kw)

        monkeypatch.setattr(type(fs), "get_file", get_file)


def test_fsspec_folder_is_pulled_by_content_and_unchanged_files_are_reused(
    memfs: Any, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multitag.data.fingerprint import fingerprint_folder

    src = make_tiny_dataset(tmp_path / "tiny")
    upload_folder(memfs, src, "/mt/data")
    memfs.pipe("/mt/data/_reports/contract_report.csv", b"ours, not data")
    spy = GetSpy(monkeypatch, memfs)

    first = acquire("memory://mt/data/", str(home))
    assert data_files(first) == data_files(src)  # identical bytes, our _reports/ left out
    assert fingerprint_folder(first).sha256 == fingerprint_folder(src).sha256
    assert len(spy.paths) == len(data_files(src))

    spy.paths.clear()
    assert acquire("memory://mt/data", str(home)) == first  # same listing: no download
    assert spy.paths == []

    (src / "train" / "001.jpg").write_bytes(b"relabelled and re-encoded")
    memfs.pipe("/mt/data/train/001.jpg", (src / "train" / "001.jpg").read_bytes())
    memfs.pipe("/mt/data/train/new.jpg", b"added")
    (src / "train" / "new.jpg").write_bytes(b"added")
    second = acquire("memory://mt/data", str(home))
    assert second != first and first.is_dir()  # a new content key; the old pull stays
    assert data_files(second) == data_files(src)
    assert sorted(spy.paths) == ["/mt/data/train/001.jpg", "/mt/data/train/new.jpg"]
    assert fingerprint_folder(second).sha256 != fingerprint_folder(first).sha256
    assert not [p for p in tree(home / "datasets") if ".tmp-" in p or p.endswith(".part")]


def test_only_the_two_newest_pulls_of_a_url_stay_on_disk(
    memfs: Any, tmp_path: Path, home: Path
) -> None:
    src = make_tiny_dataset(tmp_path / "tiny")
    upload_folder(memfs, src, "/mt/data")
    pulls = []
    for i in range(3):
        memfs.pipe("/mt/data/train/extra.jpg", f"version {i}".encode())
        pulls.append(acquire("memory://mt/data", str(home)))
    assert len(set(pulls)) == 3
    assert [p.is_dir() for p in pulls] == [False, True, True]


def test_fsspec_folder_without_the_layout_is_refused_before_any_download(
    memfs: Any, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memfs.pipe("/mt/data/train/a.jpg", b"x")
    spy = GetSpy(monkeypatch, memfs)
    with pytest.raises(DatasetError, match=r"train\.csv missing") as err:
        acquire("memory://mt/data", str(home))
    assert not err.value.retryable and spy.paths == []
    with pytest.raises(DatasetError, match="no files under") as err:
        acquire("memory://mt/nothing-here", str(home))
    assert not err.value.retryable


def test_fsspec_object_names_that_climb_out_are_refused(memfs: Any, home: Path) -> None:
    memfs.pipe("/mt/data/train.csv", b"fname,labels,is_valid\n")
    memfs.pipe("/mt/data/train//a.jpg", b"x")
    with pytest.raises(DatasetError, match="path segment"):
        acquire("memory://mt/data", str(home))


def test_fsspec_archive_is_downloaded_once_and_extracted(
    memfs: Any, tiny_archive: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memfs.pipe("/mt/archives/tiny.tgz", tiny_archive.read_bytes())
    spy = GetSpy(monkeypatch, memfs)
    path = acquire("memory://mt/archives/tiny.tgz", str(home))
    assert (path / "train.csv").is_file() and (path / MANIFEST_NAME).is_file()
    assert acquire("memory://mt/archives/tiny.tgz", str(home)) == path
    assert spy.paths == ["/mt/archives/tiny.tgz"]


def test_a_store_failure_while_pulling_is_retryable_and_installs_nothing(
    memfs: Any, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tiny_dataset(tmp_path / "tiny")
    upload_folder(memfs, src, "/mt/data")

    def expired(*args: object, **kwargs: object) -> None:
        raise PermissionError("ExpiredToken: the provided token has expired")

    monkeypatch.setattr(type(memfs), "get", expired)
    with pytest.raises(DatasetError, match="credential") as err:
        acquire("memory://mt/data", str(home))
    assert err.value.retryable
    assert dataset_dirs(home) == [] and leftovers(home) == []


def test_a_file_that_changes_during_the_pull_fails_it(
    memfs: Any, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tiny_dataset(tmp_path / "tiny")
    upload_folder(memfs, src, "/mt/data")
    real_get = type(memfs).get

    def rewrite_then_get(this: object, rpath: object, lpath: object, **kw: object) -> object:
        memfs.pipe("/mt/data/train/000.jpg", b"a longer, newer upload")
        return real_get(this, rpath, lpath, **kw)

    monkeypatch.setattr(type(memfs), "get", rewrite_then_get)
    with pytest.raises(DatasetError, match="changed while it was downloaded") as err:
        acquire("memory://mt/data", str(home))
    assert err.value.retryable and dataset_dirs(home) == []
