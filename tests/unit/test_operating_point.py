"""Run-time operating points: --min-precision from the stored curves, --thresholds FILE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from multitag.config import TagParams
from multitag.errors import EXIT_UNUSABLE, InputError, exit_code_of
from multitag.inference import loading
from multitag.training import operating_point as op
from multitag.training.threshold_set import ThresholdSet
from tests.tag_runs import run_tag_flow
from tests.tagging_helpers import TinyModel, read_tags, register_tiny_model, write_images

GRID = [0.0, 0.25, 0.5, 0.75, 1.0]


def hand_made(support_c: int = 5) -> ThresholdSet:
    """Three labels on a 5-point grid: `a` reaches 0.9 at 0.5 (and dips after), `b` never
    does, `c` would reach it at 0.25 but has `support_c` positives (min_positives 3)."""
    return ThresholdSet(
        vocab=["a", "b", "c"],
        objective="f1",
        policy="shrunk",
        global_threshold=0.4,
        per_label={"a": 0.4, "b": 0.4, "c": 0.4},
        support={"a": 10, "b": 10, "c": support_c},
        curves={
            "thresholds": GRID,
            "global": {"precision_micro": [0.3, 0.6, 0.8, 0.95, None]},
            "per_label": {
                "a": {"precision": [0.2, 0.5, 0.9, 0.85, None]},
                "b": {"precision": [0.1, 0.3, 0.5, 0.6, None]},
                "c": {"precision": [0.4, 0.92, 0.95, 1.0, None]},
            },
        },
        params={"min_positives": 3},
    )


def test_lowest_threshold_reaching_the_target_even_if_precision_dips_later() -> None:
    assert op.lowest_threshold_at_precision(GRID, [0.2, 0.5, 0.9, 0.85, None], 0.9) == 0.5
    assert op.lowest_threshold_at_precision(GRID, [0.2, 0.5, 0.9, 0.85, None], 0.5) == 0.25
    assert op.lowest_threshold_at_precision(GRID, [0.1, 0.3, 0.5, 0.6, None], 0.9) is None


def test_min_precision_per_label_never_and_support_fallback() -> None:
    point = op.at_min_precision(hand_made(support_c=2), 0.9)
    assert point.thresholds.per_label == {"a": 0.5, "b": op.NEVER, "c": 0.75}  # c: micro curve
    assert point.never == ["b"] and point.fallback == ["c"]
    # what training chose is not touched; only per_label moves
    assert point.thresholds.global_threshold == 0.4 and point.thresholds.vocab == ["a", "b", "c"]
    manifest = point.to_manifest()
    assert manifest["kind"] == "min_precision" and manifest["value"] == 0.9
    assert manifest["never_predicted"] == ["b"] and "training thresholds" in manifest["note"]
    # with enough support, c uses its own curve
    assert op.at_min_precision(hand_made(support_c=5), 0.9).thresholds.per_label["c"] == 0.25


def test_never_means_no_probability_is_predicted() -> None:
    import numpy as np

    from multitag.training.threshold_set import apply_thresholds

    point = op.at_min_precision(hand_made(), 0.9)
    probs = np.array([[1.0, 1.0, 1.0], [0.6, 0.99, 0.1]], dtype=np.float32)
    decided = apply_thresholds(probs, point.thresholds)
    assert not decided[:, 1].any()  # b: even a score of exactly 1 is not predicted
    assert decided[:, 0].tolist() == [True, True]


def test_min_precision_needs_stored_curves() -> None:
    bare = ThresholdSet(["a"], "f1", "global", 0.5, {"a": 0.5}, {"a": 3})
    with pytest.raises(op.OperatingPointError, match="--thresholds FILE"):
        op.at_min_precision(bare, 0.9)


def test_thresholds_file_flat_map_and_thresholds_json(tmp_path: Path) -> None:
    ts = hand_made()
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"a": 0.1, "b": 0.2, "c": 1}))
    point = op.resolve(ts, thresholds_file=str(flat))
    assert point.kind == "file" and point.thresholds.per_label == {"a": 0.1, "b": 0.2, "c": 1.0}
    assert point.to_manifest()["path"] == str(flat)
    full = tmp_path / "thresholds.json"
    full.write_text(json.dumps(ts.to_json()))
    assert op.from_file(ts, str(full)).thresholds.per_label == ts.per_label


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"a": 0.1, "b": 0.2, "c": 0.3, "dog": 0.5}, r"unknown: \['dog'\]"),
        ({"a": 0.1, "b": 0.2}, r"missing: \['c'\]"),
        ({"a": 0.1, "b": 0.2, "c": 1.5}, "'c' must be a number in"),
        ({"a": 0.1, "b": "high", "c": 0.3}, "'b' must be a number in"),
        ({"a": 0.1, "b": True, "c": 0.3}, "'b' must be a number in"),
        ([0.1, 0.2, 0.3], "expected a JSON object"),
    ],
)
def test_thresholds_file_is_checked_against_the_vocab(
    tmp_path: Path, content: object, match: str
) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(content))
    with pytest.raises(op.OperatingPointError, match=match) as info:
        op.from_file(hand_made(), str(path))
    assert exit_code_of(info.value) == EXIT_UNUSABLE


def test_thresholds_file_missing_or_not_json_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        op.from_file(hand_made(), str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        op.from_file(hand_made(), str(tmp_path / "bad.json"))


def test_default_is_training_and_the_two_options_exclude_each_other(tmp_path: Path) -> None:
    ts = hand_made()
    assert op.resolve(ts).thresholds is ts and op.resolve(ts).to_manifest()["kind"] == "training"
    with pytest.raises(ValidationError, match="mutually exclusive"):
        TagParams(source="-", min_precision=0.9, thresholds_file="t.json")
    with pytest.raises(ValidationError):
        TagParams(source="-", min_precision=1.5)
    assert "min_precision" in loading._TAGGER_FIELDS
    assert "thresholds_file" in loading._TAGGER_FIELDS


def test_an_edited_thresholds_file_is_not_served_from_the_tagger_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[str, str]] = []

    def fake_cached(key_json: str, thresholds_sha256: str = "") -> str:
        built.append((key_json, thresholds_sha256))
        return "tagger"

    monkeypatch.setattr(loading, "_cached_tagger", fake_cached)
    path = tmp_path / "t.json"
    params = TagParams(source="-", home=str(tmp_path), thresholds_file=str(path))
    path.write_text(json.dumps({"a": 0.5}))
    loading.tagger_for(params, "v1")
    path.write_text(json.dumps({"a": 0.9}))  # same path, new contents
    loading.tagger_for(params, "v1")
    (key1, sha1), (key2, sha2) = built
    assert key1 == key2 and sha1 != sha2 and "" not in (sha1, sha2)


def test_cli_parses_the_operating_point_options() -> None:
    from flows.cli import build_parser

    args = build_parser().parse_args(["tag", "src", "--min-precision", "0.95"])
    assert args.min_precision == 0.95 and args.thresholds_file is None
    args = build_parser().parse_args(["tag", "src", "--thresholds", "t.json"])
    assert args.thresholds_file == "t.json"
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["tag", "src", "--min-precision", "0.9", "--thresholds", "t"])
    assert info.value.code == 2


# ------------------------------------------------------------------ the tag flow, end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-model")
    return register_tiny_model(root / "home", root / "work")


def params_for(tiny: TinyModel, source: Path, out: Path, **kw: object) -> TagParams:
    base: dict[str, object] = {"home": str(tiny.home), "out": str(out), "batch_size": 8}
    return TagParams(source=str(source), decode_workers=1, **{**base, **kw})


@pytest.mark.usefixtures("prefect_harness")
def test_min_precision_changes_labels_and_the_manifest_records_it(
    tiny: TinyModel, tmp_path: Path
) -> None:
    vocab = list(tiny.inference["vocab"])
    write_images(tmp_path / "src", 12)
    default = run_tag_flow(params_for(tiny, tmp_path / "src", tmp_path / "out-default"))
    assert default.operating_point == {"kind": "training"}  # the version's thresholds.json
    # A target every label's validation prevalence meets: the lowest threshold (0) is chosen
    # for every label, so every label is predicted on every image (scores are sigmoids > 0).
    low = run_tag_flow(params_for(tiny, tmp_path / "src", tmp_path / "out-p", min_precision=0.01))
    point = low.operating_point
    assert point["kind"] == "min_precision" and point["value"] == 0.01
    assert point["thresholds"] == dict.fromkeys(vocab, 0.0) and point["never_predicted"] == []
    assert "training thresholds" in point["note"]
    rows_default = read_tags(default.output_uri).to_pylist()
    rows_low = read_tags(low.output_uri).to_pylist()
    assert all(sorted(r["labels"]) == sorted(vocab) for r in rows_low)
    assert sum(len(r["labels"]) for r in rows_default) < len(vocab) * len(rows_default)
    for row in rows_default:  # the default run applied training's thresholds
        scores = dict(row["scores"])
        expected = {lab for lab in vocab if scores[lab] > tiny.thresholds["per_label"][lab]}
        assert set(row["labels"]) == expected or any(
            abs(scores[lab] - tiny.thresholds["per_label"][lab]) < 1e-6 for lab in vocab
        )


@pytest.mark.usefixtures("prefect_harness")
def test_a_thresholds_file_for_another_model_fails_before_tagging(
    tiny: TinyModel, tmp_path: Path
) -> None:
    write_images(tmp_path / "src", 3)
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"dog": 0.5}))
    with pytest.raises(InputError, match="unknown: \\['dog'\\]") as info:
        run_tag_flow(params_for(tiny, tmp_path / "src", tmp_path / "out", thresholds_file=str(bad)))
    assert exit_code_of(info.value) == EXIT_UNUSABLE
    assert not list((tmp_path / "out").rglob("*.parquet"))
