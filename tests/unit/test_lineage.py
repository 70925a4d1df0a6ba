"""Lineage: a dataset's content hash, and what each model version records about its making."""

from __future__ import annotations

import shutil
import types
from pathlib import Path
from typing import Any

import pytest

from multitag import __version__, registry
from multitag.data.fingerprint import fingerprint_folder
from multitag.data.shapes import make_shapes_dataset
from multitag.tagging.summary import _model_dataset_sha256
from multitag.training import lineage
from multitag.training.reports import render_markdown
from multitag.training.thresholds import ThresholdSet

VOCAB = ["circle", "square"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lineage")
    return make_shapes_dataset(root / "shapes", n_train=24, n_test=4, img_size=16, seed=1)


def test_content_hash_depends_on_bytes_not_place_or_our_own_files(shapes: Path, tmp_path: Path):
    first = fingerprint_folder(shapes)
    copy = Path(shutil.copytree(shapes, tmp_path / "elsewhere"))
    (copy / "_reports").mkdir()
    (copy / "_reports" / "contract_report.csv").write_text("x\n")
    (copy / ".multitag-manifest.json").write_text("{}")
    same = fingerprint_folder(copy)
    assert same == first
    assert first.n_files == 24 + 4 + 2  # train/, test/, train.csv, test_labels.csv
    assert first.total_bytes == sum(p.stat().st_size for p in shapes.rglob("*") if p.is_file())

    # One label changed, same length: the hash changes.
    csv = copy / "train.csv"
    lines = csv.read_text().splitlines()
    fname, labels, valid = lines[1].split(",")
    other = "circle" if labels != "circle" else "square"
    lines[1] = f"{fname},{other},{valid}"
    csv.write_text("\n".join(lines) + "\n")
    assert fingerprint_folder(copy).sha256 != first.sha256


def test_build_lineage_records_hash_rows_contract_and_code(shapes: Path):
    block = lineage.build_lineage(
        shapes, {"contract": "training_labels@1.0.0"}, n_train=19, n_valid=5
    )
    assert block["dataset_sha256"] == fingerprint_folder(shapes).sha256
    assert block["rows"] == {"train": 19, "valid": 5}
    assert block["contract_version"] == "1.0.0"
    assert block["code_version"]["package"] == __version__
    commit = block["code_version"]["git_commit"]
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)
    # A hash the caller already knows (the dataset cache's) is used as it is.
    known = lineage.build_lineage(None, {}, n_train=1, n_valid=1, dataset_sha256="ab" * 32)
    assert known["dataset_sha256"] == "ab" * 32 and known["contract_version"] is None


def _thresholds() -> dict[str, Any]:
    return ThresholdSet(
        vocab=VOCAB, objective="f1", policy="global", global_threshold=0.5,
        per_label=dict.fromkeys(VOCAB, 0.5), support=dict.fromkeys(VOCAB, 3),
    ).to_json()  # fmt: skip


def _register(home: str, tmp_path: Path, metrics: dict[str, Any]) -> str:
    learner = tmp_path / "export.pkl"
    learner.write_bytes(b"pretend pickle " + str(len(metrics)).encode() + home.encode())
    inference = {"img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "vocab": VOCAB}
    return registry.register_model(
        home, learner_file=learner, thresholds=_thresholds(), metrics=metrics,
        inference=inference, report_files={},
    )  # fmt: skip


def test_show_version_report_and_tag_manifest_carry_lineage(shapes: Path, tmp_path: Path):
    home = str(tmp_path / "home")
    block = lineage.build_lineage(shapes, {"contract": "c@1.0.0"}, n_train=19, n_valid=5)
    metrics = {"validation": {"mAP": 0.9, "per_label": {}}, "lineage": block}
    version = _register(home, tmp_path, metrics)
    shown = registry.show_version(home, version)
    assert shown["lineage"]["dataset_sha256"] == block["dataset_sha256"]
    assert shown["lineage"]["rows"] == {"train": 19, "valid": 5}

    report = render_markdown(metrics, _thresholds(), metrics["validation"])
    assert "## Lineage" in report and block["dataset_sha256"] in report

    plan = types.SimpleNamespace(params={"home": home}, model_version=version)
    assert _model_dataset_sha256(plan) == block["dataset_sha256"]  # type: ignore[arg-type]
    older = _register(home, tmp_path, {"validation": {"mAP": 0.8}})
    plan = types.SimpleNamespace(params={"home": home}, model_version=older)
    assert _model_dataset_sha256(plan) is None  # type: ignore[arg-type]
