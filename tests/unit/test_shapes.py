"""The synthetic shapes dataset: layout, determinism, and labels that match the pixels."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multitag.data.shapes import (
    SHAPE_CLASSES,
    make_shapes_dataset,
    render_scene,
    scene_for,
    shape_mask,
)

N_TRAIN, N_TEST, SIZE, SEED = 120, 30, 64, 7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("shapes") / "shapes"
    return make_shapes_dataset(dest, n_train=N_TRAIN, n_test=N_TEST, img_size=SIZE, seed=SEED)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_matches_pascal(dataset: Path) -> None:
    rows = _rows(dataset / "train.csv")
    assert (dataset / "train.csv").read_text().splitlines()[0] == "fname,labels,is_valid"
    assert len(rows) == N_TRAIN
    assert {r["is_valid"] for r in rows} == {"True", "False"}
    assert sum(r["is_valid"] == "True" for r in rows) == round(N_TRAIN * 0.2)
    assert sorted(p.name for p in (dataset / "train").iterdir()) == [r["fname"] for r in rows]
    test_rows = _rows(dataset / "test_labels.csv")
    assert list(test_rows[0]) == ["fname", "labels"]
    assert sorted(p.name for p in (dataset / "test").iterdir()) == [r["fname"] for r in test_rows]
    assert not {r["fname"] for r in rows} & {r["fname"] for r in test_rows}
    with Image.open(dataset / "train" / rows[0]["fname"]) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (SIZE, SIZE))
    # No temporary folder left next to the dataset.
    assert [p.name for p in dataset.parent.iterdir()] == ["shapes"]


def test_labels_are_known_distinct_and_sometimes_empty(dataset: Path) -> None:
    rows = _rows(dataset / "train.csv") + _rows(dataset / "test_labels.csv")
    counts = np.bincount([len(r["labels"].split()) for r in rows], minlength=4)
    assert len(counts) == 4  # never more than 3 objects
    assert all(c > 0 for c in counts), f"each of 0..3 objects should occur: {counts}"
    for r in rows:
        tokens = r["labels"].split()
        assert r["labels"] == " ".join(tokens)  # single spaces, "" for no label
        assert len(set(tokens)) == len(tokens)
        assert set(tokens) <= set(SHAPE_CLASSES)
    seen = {t for r in rows for t in r["labels"].split()}
    assert seen == set(SHAPE_CLASSES)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = make_shapes_dataset(tmp_path / "a", n_train=20, n_test=5, seed=3)
    b = make_shapes_dataset(tmp_path / "b", n_train=20, n_test=5, seed=3)
    c = make_shapes_dataset(tmp_path / "c", n_train=20, n_test=5, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_csv_labels_match_the_drawn_scene(dataset: Path) -> None:
    for split, csv_name in (("train", "train.csv"), ("test", "test_labels.csv")):
        for i, row in enumerate(_rows(dataset / csv_name)):
            scene = scene_for(SEED, split, i, SIZE)
            assert row["labels"].split() == scene.labels, (split, i)
            assert sorted(s.label for s in scene.shapes) == sorted(scene.labels)


def _blocks(arr: np.ndarray, k: int = 4) -> np.ndarray:
    """k x k block means: averages out pixel noise, which JPEG does not keep exactly."""
    h, w, c = arr.shape
    return arr.reshape(h // k, k, w // k, k, c).mean(axis=(1, 3))


def test_saved_image_is_the_rendered_scene(dataset: Path) -> None:
    with Image.open(dataset / "train" / "000005.jpg") as img:
        saved = _blocks(np.asarray(img.convert("RGB"), dtype=np.float32))
    own = _blocks(np.asarray(render_scene(scene_for(SEED, "train", 5, SIZE), SIZE), np.float32))
    other = _blocks(np.asarray(render_scene(scene_for(SEED, "train", 6, SIZE), SIZE), np.float32))
    assert np.abs(own - saved).mean() < 4  # JPEG loss only
    assert np.abs(other - saved).mean() > 20


def test_every_shape_is_inside_unoccluded_and_visible(dataset: Path) -> None:
    """Each object's pixels lie in the image, overlap no other object, and show its colour."""
    n_checked = 0
    for i, row in enumerate(_rows(dataset / "train.csv")):
        scene = scene_for(SEED, "train", i, SIZE)
        with Image.open(dataset / "train" / row["fname"]) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
        masks = [shape_mask(s, SIZE) for s in scene.shapes]
        for spec, mask in zip(scene.shapes, masks, strict=True):
            assert mask.sum() >= 12, (i, spec)  # big enough to see at this size
            r = spec.radius
            assert r + 1 <= spec.cx <= SIZE - 2 - r and r + 1 <= spec.cy <= SIZE - 2 - r
            others = [m for m in masks if m is not mask]
            assert not any((mask & m).any() for m in others), f"image {i}: shapes overlap"
            # Judged on the saved JPEG: the object's pixels carry its colour, unlike the
            # background right around it (a 3-pixel band outside every object).
            inside = pixels[mask].mean(axis=0)
            band = _dilate(mask, 3) & ~np.logical_or.reduce(masks)
            around = pixels[band].mean(axis=0)
            to_colour = np.linalg.norm(inside - np.asarray(spec.colour))
            assert to_colour < np.linalg.norm(around - np.asarray(spec.colour)) - 40, (i, spec)
            assert np.linalg.norm(inside - around) > 60, (i, spec.label)
            n_checked += 1
    assert n_checked > N_TRAIN  # on average more than one object per image


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def test_ring_has_a_hole_and_circle_does_not() -> None:
    from multitag.data.shapes import ShapeSpec

    ring = ShapeSpec("ring", 32, 32, 12, 0.0, (255, 0, 0))
    circle = ShapeSpec("circle", 32, 32, 12, 0.0, (255, 0, 0))
    assert not shape_mask(ring, 64)[32, 32]
    assert shape_mask(circle, 64)[32, 32]
    assert shape_mask(circle, 64).sum() > 1.5 * shape_mask(ring, 64).sum()


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "ds"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="never overwrites"):
        make_shapes_dataset(dest, n_train=4, n_test=1)
    assert (dest / "keep.txt").read_text() == "mine"


def test_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    dest = tmp_path / "empty"
    dest.mkdir()
    make_shapes_dataset(dest, n_train=4, n_test=2)
    assert len(_rows(dest / "train.csv")) == 4
    assert len(list((dest / "test").iterdir())) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 1}, "n_train"),
        ({"valid_pct": 1.0}, "valid_pct"),
        ({"img_size": 8}, "img_size"),
        ({"n_test": -1}, "n_test"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_shapes_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, multitag.data.shapes; print('torch' in sys.modules, 'fastai' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
