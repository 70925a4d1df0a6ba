"""No new data: the registry finds the version already trained on this content and params.

Versions are registered with a pretend learner file (no fastai); only metrics.json matters to
`find_version_trained_on`. The retrain flow's side is tested end to end in
tests/integration/test_flows.py (a retrain on identical data trains nothing).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from multitag import registry
from multitag.config import ThresholdParams, TrainParams
from multitag.registry.versions import THRESHOLD_PARAMS_KEY, find_version_trained_on
from multitag.storage import join
from multitag.training.thresholds import ThresholdSet

VOCAB = ["circle", "square"]
DATA = "d" * 64
TRAIN = TrainParams(arch="shapes_cnn", img_size=32, epochs=1)
THRESHOLDS = ThresholdParams(policy="global")


def register(
    home: str,
    tmp_path: Path,
    *,
    dataset_sha256: str | None = DATA,
    train: TrainParams = TRAIN,
    thresholds: ThresholdParams | None = THRESHOLDS,
    name: str | None = None,
) -> str:
    learner_file = tmp_path / f"export-{uuid.uuid4().hex[:6]}.pkl"
    learner_file.write_bytes(b"pretend pickle " + uuid.uuid4().bytes)
    metrics: dict[str, Any] = {
        "validation": {"mAP": 0.9},
        "dataset": {"name": "shapes"},
        "params": train.model_dump(),  # as train.json stores it, before the JSON round trip
        "lineage": {"dataset_sha256": dataset_sha256},
    }
    if thresholds is not None:
        metrics[THRESHOLD_PARAMS_KEY] = thresholds.model_dump(mode="json")
    if name is not None:
        metrics["name"] = name
    ts = ThresholdSet(
        vocab=VOCAB, objective="f1", policy="global", global_threshold=0.5,
        per_label=dict.fromkeys(VOCAB, 0.5), support=dict.fromkeys(VOCAB, 10),
    )  # fmt: skip
    return registry.register_model(
        home,
        learner_file=learner_file,
        thresholds=ts.to_json(),
        metrics=metrics,
        inference={"img_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "vocab": VOCAB},
        report_files={},
    )


def find(home: str, **kw: Any) -> str | None:
    args: dict[str, Any] = {
        "train_params": TRAIN.model_dump(mode="json"),
        "threshold_params": THRESHOLDS.model_dump(mode="json"),
        **kw,
    }
    sha = args.pop("dataset_sha256", DATA)
    return find_version_trained_on(home, sha, **args)


@pytest.fixture
def home(tmp_path: Path) -> str:
    return str(tmp_path / "home")


def test_the_newest_version_on_the_same_data_and_params_is_found(home: str, tmp_path: Path) -> None:
    assert find(home) is None  # an empty registry
    register(home, tmp_path)
    newest = register(home, tmp_path)
    register(home, tmp_path, dataset_sha256="e" * 64)  # newer, but other data
    assert find(home) == newest


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"dataset_sha256": "e" * 64}, "other data"),
        ({"train_params": TRAIN.model_copy(update={"epochs": 2}).model_dump(mode="json")}, "train"),
        ({"threshold_params": ThresholdParams(policy="per_label").model_dump(mode="json")}, "thr"),
        ({"name": "cards"}, "another model name"),
    ],
)
def test_anything_different_means_no_match(
    home: str, tmp_path: Path, kw: dict[str, Any], why: str
) -> None:
    register(home, tmp_path, name="shapes")
    assert find(home, name="shapes") is not None
    assert find(home, **kw) is None, why


def test_a_version_named_by_default_matches_its_datasets_name(home: str, tmp_path: Path) -> None:
    version = register(home, tmp_path)  # no name given: named after its dataset, "shapes"
    assert find(home, name="shapes") == version
    assert find(home, name=None) == version  # no name asked for: any name
    assert find(home, name="cards") is None


def test_versions_that_cannot_vouch_for_their_params_never_match(home: str, tmp_path: Path) -> None:
    register(home, tmp_path, thresholds=None)  # from before threshold params were recorded
    register(home, tmp_path, dataset_sha256=None)  # from before lineage
    assert find(home) is None


def test_an_incomplete_version_is_skipped(home: str, tmp_path: Path) -> None:
    older = register(home, tmp_path)
    broken = register(home, tmp_path)
    Path(join(registry.version_uri(home, broken), "SHA256SUMS")).unlink()
    assert find(home) == older
