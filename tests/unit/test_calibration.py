"""Calibrated scores (issue 17 item 5): the fit, its invariants, the stage, and tagging with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from multitag import registry
from multitag.config import TagParams, ThresholdParams
from multitag.inference import loading
from multitag.registry.errors import IntegrityError
from multitag.registry.layout import CALIBRATION_FILE, version_uri
from multitag.training import calibration as cal
from multitag.training import retraining
from multitag.training.calibration import Calibration, CalibrationError, LabelFit
from tests.tag_runs import run_tag_flow
from tests.tagging_helpers import TinyModel, read_tags, register_tiny_model, write_images

VOCAB = ["a", "b", "c"]


def overconfident(n: int, seed: int = 0, temperature: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z), scores sigmoid(temperature * z): too sure of themselves."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, len(VOCAB)))
    y = rng.random(z.shape) < cal.sigmoid(z)
    return cal.sigmoid(temperature * z), y


def test_fit_recovers_a_known_temperature_and_cuts_ece() -> None:
    probs, y = overconfident(20_000)
    fit = cal.fit(probs, y, VOCAB, min_positives=20)
    assert all(f.fitted for f in fit.labels.values())
    np.testing.assert_allclose(fit.slopes, 1 / 3, atol=0.02)  # the true map: z / 3
    np.testing.assert_allclose(fit.biases, 0.0, atol=0.06)
    # Held-out draws of the same process: ECE falls at least five-fold (measured 0.150 -> 0.006).
    test_probs, test_y = overconfident(20_000, seed=1)
    before, after = cal.ece(test_probs, test_y), cal.ece(fit.apply(test_probs), test_y)
    assert before > 0.1 and after < before / 5


def test_map_is_strictly_increasing_so_decisions_and_ranks_are_unchanged() -> None:
    probs, y = overconfident(2_000)
    fit = cal.fit(probs, y, VOCAB, min_positives=20)
    rng = np.random.default_rng(3)
    raw = rng.uniform(0.001, 0.999, (500, len(VOCAB)))
    thresholds = np.array([0.2, 0.5, 0.83])
    scores = fit.apply(raw)
    assert (fit.slopes > 0).all()
    np.testing.assert_array_equal(raw > thresholds, scores > fit.map_thresholds(thresholds))
    for j in range(len(VOCAB)):  # same order of images per label: AP is unchanged
        np.testing.assert_array_equal(np.argsort(raw[:, j]), np.argsort(scores[:, j]))
    # The same map from logits (scorers that hand logits) as from probabilities.
    np.testing.assert_allclose(fit.apply_logits(cal.logit(raw)), scores, rtol=1e-12)


def test_single_class_and_rare_labels_keep_the_identity() -> None:
    probs, y = overconfident(400)
    y[:, 0] = False  # no positives at all
    y[:, 1] = False
    y[:5, 1] = True  # 5 positives < min_positives
    fit = cal.fit(probs, y, VOCAB, min_positives=20)
    for label in ("a", "b"):
        f = fit.labels[label]
        assert (f.slope, f.bias, f.fitted) == (1.0, 0.0, False)
        assert "identity" in f.reason and "min_positives=20" in f.reason
    assert fit.labels["c"].fitted
    np.testing.assert_allclose(fit.apply(probs)[:, :2], probs[:, :2], rtol=1e-9)


def test_perfectly_separated_label_gets_a_finite_bounded_slope() -> None:
    """Platt's smoothed targets: validation without a single error does not send the slope to
    infinity (every score to exactly 0 or 1), and the slope stays inside its bounds."""
    z = np.r_[np.linspace(-8, -1, 200), np.linspace(1, 8, 200)]
    y = (z > 0)[:, None]
    for temperature in (0.01, 1.0, 40.0):
        fit = cal.fit(cal.sigmoid(temperature * z)[:, None], y, ["x"], min_positives=20)
        slope = fit.labels["x"].slope
        assert cal.SLOPE_BOUNDS[0] <= slope <= cal.SLOPE_BOUNDS[1]
        out = fit.apply(cal.sigmoid(temperature * z)[:, None])
        assert out.min() > 0.0 and out.max() < 1.0


def test_ece_on_a_hand_computed_case() -> None:
    # Bin [0.8, 0.867): four scores of 0.8, two positive -> |0.8 - 0.5| = 0.3, weight 4/6;
    # last bin (closed at 1.0): two scores of 1.0, both positive -> 0, weight 2/6.
    probs = np.array([0.8, 0.8, 0.8, 0.8, 1.0, 1.0])
    y = np.array([1, 1, 0, 0, 1, 1], dtype=bool)
    assert cal.ece(probs, y) == pytest.approx(0.3 * 4 / 6)
    assert cal.ece(np.array([0.0, 1.0]), np.array([False, True])) == 0.0


def test_json_round_trip_and_bad_files_refused() -> None:
    probs, y = overconfident(2_000)
    fit = cal.fit(probs, y, VOCAB, min_positives=20)
    data = json.loads(json.dumps(fit.to_json()))
    back = Calibration.from_json(data)
    assert back.vocab == fit.vocab and back.labels == fit.labels
    np.testing.assert_array_equal(back.apply(probs), fit.apply(probs))
    bad_slope = json.loads(json.dumps(data))
    bad_slope["per_label"]["b"]["slope"] = -1.0
    with pytest.raises(CalibrationError, match="slope > 0"):
        Calibration.from_json(bad_slope)
    with pytest.raises(CalibrationError, match="do not match its vocab"):
        Calibration.from_json({**data, "vocab": ["a", "b"]})
    with pytest.raises(CalibrationError, match="another multitag version"):
        Calibration.from_json({**data, "format_version": 99})
    with pytest.raises(CalibrationError, match="2 labels"):
        cal.identity(["a", "b"]).apply(probs)


def test_threshold_stage_fits_writes_and_reports_ece(tmp_path: Path) -> None:
    """On a stage with validation and test predictions (no model needed): calibration.json is
    written, and ECE before/after is recorded for both splits (test is held out)."""
    probs, y = overconfident(3_000)
    test_probs, test_y = overconfident(3_000, seed=7)
    np.savez(tmp_path / retraining.STAGE_VALID, probs=probs.astype(np.float32), targets=y)
    np.savez(tmp_path / retraining.STAGE_TEST, probs=test_probs.astype(np.float32), targets=test_y)
    prevalence = {"labels": dict(zip(VOCAB, y.mean(0).tolist(), strict=True)), "none": 0.1}
    (tmp_path / retraining.STAGE_TRAIN).write_text(
        json.dumps({"vocab": VOCAB, "prevalence": prevalence})
    )
    out = retraining.threshold_stage(tmp_path, ThresholdParams(policy="global"))
    summary = out["evaluation"]["calibration"]
    stored = Calibration.from_json(json.loads((tmp_path / CALIBRATION_FILE).read_text()))
    assert [summary["per_label"][v]["slope"] for v in VOCAB] == stored.slopes.tolist()
    for split in ("validation", "test"):
        ece = summary["ece"][split]
        assert ece["after"] < ece["before"] / 3, (split, ece)
        assert set(ece["per_label"]) == set(VOCAB)
    for v in VOCAB:  # the training thresholds, and the same thresholds in the score scale
        p = summary["per_label"][v]
        assert p["threshold"] == out["thresholds"]["per_label"][v]
        assert p["score_threshold"] == pytest.approx(
            stored.map_thresholds(np.array([p["threshold"]] * 3))[VOCAB.index(v)]
        )
    brief = cal.brief(summary)
    assert brief is not None and brief["labels_fitted"] == 3 and "test" in brief["ece"]


# ------------------------------------------------------------------ tagging with calibration


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyModel, str, Calibration]:
    """The tiny model, and a second version of the same model file with a calibration.json."""
    root = tmp_path_factory.mktemp("calibrated")
    tiny = register_tiny_model(root / "home", root / "work")
    vocab = tuple(tiny.inference["vocab"])
    labels = {v: LabelFit(1.0, 0.0, False, "identity: test", 0, 0) for v in vocab}
    labels[vocab[0]] = LabelFit(0.5, 0.4, True, "fitted", 30, 30)
    labels[vocab[-1]] = LabelFit(2.0, -0.3, True, "fitted", 30, 30)
    fit = Calibration(vocab, labels)
    path = root / CALIBRATION_FILE
    path.write_text(json.dumps(fit.to_json()))
    version = registry.register_model(
        str(tiny.home),
        learner_file=tiny.learner_file,
        thresholds=tiny.thresholds,
        metrics=tiny.metrics,
        inference=tiny.inference,
        report_files={},
        version="calibrated-1",
        extra_files={CALIBRATION_FILE: path},
    )
    return tiny, version, fit


def test_tagger_writes_calibrated_scores_and_the_same_labels(
    calibrated: tuple[TinyModel, str, Calibration], tmp_path: Path
) -> None:
    tiny, version, fit = calibrated
    uris = [str(p) for p in write_images(tmp_path / "src", 12)]
    base = TagParams(source=str(tmp_path / "src"), home=str(tiny.home), precision="fp32")
    raw_tagger = loading.load_tagger(base, tiny.version)
    cal_tagger = loading.load_tagger(base, version)
    assert cal_tagger.calibration is not None and cal_tagger.calibration.labels == fit.labels
    assert raw_tagger.calibration is None and "uncalibrated" in raw_tagger.scorer_note
    assert "scores calibrated" in cal_tagger.scorer_note
    vocab = list(cal_tagger.vocab)
    for raw, row in zip(raw_tagger.tag_batch(uris), cal_tagger.tag_batch(uris), strict=True):
        raw_scores = np.array([[raw.scores[v] for v in vocab]])  # type: ignore[index]
        expected = fit.apply(raw_scores)[0]
        got = np.array([row.scores[v] for v in vocab])  # type: ignore[index]
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert set(row.labels or []) == set(raw.labels or [])  # decided on raw scores
        for label in row.labels or []:  # and each is above its threshold in the score scale
            assert row.scores[label] > cal_tagger.score_thresholds[label] - 1e-6  # type: ignore[index]
        assert row.top_score == max(got)


@pytest.mark.usefixtures("prefect_harness")
def test_tag_flow_writes_calibrated_scores_and_the_manifest_says_so(
    calibrated: tuple[TinyModel, str, Calibration], tmp_path: Path
) -> None:
    tiny, version, fit = calibrated
    write_images(tmp_path / "src", 6)
    params = TagParams(
        source=str(tmp_path / "src"), out=str(tmp_path / "out"), home=str(tiny.home),
        model=version, decode_workers=1,
    )  # fmt: skip
    summary = run_tag_flow(params)
    assert summary.tagged == 6
    assert any("scores calibrated (calibration.json" in s for s in summary.scorers)
    rows = read_tags(summary.output_uri).to_pylist()
    raw = loading.load_tagger(params.model_copy(update={"precision": "fp32"}), tiny.version)
    by_uri = {r.image_uri: r for r in raw.tag_batch([r["image_uri"] for r in rows])}
    vocab = list(fit.vocab)
    for row in rows:
        scores = dict(row["scores"])
        raw_scores = np.array([[by_uri[row["image_uri"]].scores[v] for v in vocab]])  # type: ignore[index]
        # The run may pick another scorer (ONNX fast path) than fp32 here: tolerance to match.
        np.testing.assert_allclose([scores[v] for v in vocab], fit.apply(raw_scores)[0], atol=0.02)


def test_a_tampered_calibration_file_is_refused(
    calibrated: tuple[TinyModel, str, Calibration], tmp_path: Path
) -> None:
    tiny, _, fit = calibrated
    copy = registry.register_model(
        str(tiny.home), learner_file=tiny.learner_file, thresholds=tiny.thresholds,
        metrics=tiny.metrics, inference=tiny.inference, report_files={}, version="calibrated-2",
        extra_files={CALIBRATION_FILE: _write(tmp_path / "c.json", cal.identity(fit.vocab))},
    )  # fmt: skip
    path = Path(version_uri(str(tiny.home), copy)) / CALIBRATION_FILE
    path.write_text(json.dumps(cal.identity(fit.vocab, "edited").to_json()))
    base = TagParams(source=str(tmp_path), home=str(tiny.home), precision="fp32")
    with pytest.raises(IntegrityError):
        loading.load_tagger(base, copy)


def _write(path: Path, fit: Calibration) -> Path:
    path.write_text(json.dumps(fit.to_json()))
    return path
