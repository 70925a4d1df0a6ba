"""Label-prior baselines on hand-computed examples (issue 17 item 4)."""

from __future__ import annotations

import numpy as np
import pytest

from multitag.training.baselines import label_prior_baselines
from multitag.training.score_groups import ThresholdError

# 4 images, labels a and b: a on 2 of 4 images, b on 1 of 4.
TARGETS = np.array([[1, 0], [1, 1], [0, 0], [0, 0]], dtype=bool)


def test_baselines_match_hand_computed_values() -> None:
    got = label_prior_baselines(TARGETS, ["a", "b"], {"a": 0.6, "b": 0.1})
    # Constant scores tie every image: AP = positive rate, 2/4 and 1/4.
    assert got["mAP"] == pytest.approx((0.5 + 0.25) / 2)
    # No label anywhere: 5 of the 8 decisions are right.
    assert got["accuracy_multi"] == pytest.approx(5 / 8)
    # Every label everywhere: tp 3, fp 5, fn 0 -> 2*3 / (2*3 + 5).
    assert got["f1_micro"] == pytest.approx(6 / 11)
    # Per label: a P=1/2 R=1 -> 2/3; b P=1/4 R=1 -> 2/5.
    assert got["f1_macro"] == pytest.approx((2 / 3 + 2 / 5) / 2)
    assert set(got["predictors"]) == {"mAP", "accuracy_multi", "f1_micro", "f1_macro"}


def test_map_baseline_does_not_depend_on_the_constant() -> None:
    low = label_prior_baselines(TARGETS, ["a", "b"], {"a": 0.0, "b": 0.0})
    high = label_prior_baselines(TARGETS, ["a", "b"], {"a": 0.9, "b": 1.0})
    assert low["mAP"] == pytest.approx(high["mAP"]) == pytest.approx(0.375)


def test_label_without_validation_positives_is_left_out_as_for_the_model() -> None:
    targets = np.column_stack([TARGETS, np.zeros(4, dtype=bool)])
    got = label_prior_baselines(targets, ["a", "b", "c"], {"a": 0.5})  # c, b: prevalence 0
    assert got["mAP"] == pytest.approx(0.375)  # c has no AP, as in evaluate()
    assert got["accuracy_multi"] == pytest.approx(9 / 12)
    assert got["f1_micro"] == pytest.approx(6 / 15)  # 4 more false positives from c
    assert got["f1_macro"] == pytest.approx((2 / 3 + 2 / 5) / 2)


def test_no_positives_at_all_gives_undefined_map_as_none() -> None:
    got = label_prior_baselines(np.zeros((3, 2), dtype=bool), ["a", "b"], {})
    assert got["mAP"] is None and got["f1_macro"] is None
    assert got["accuracy_multi"] == 1.0
    assert got["f1_micro"] == 0.0  # 6 false positives, nothing to recall


@pytest.mark.parametrize(
    ("targets", "prevalence", "match"),
    [
        (np.zeros((4, 3), dtype=bool), {}, "expected"),
        (np.zeros((0, 2), dtype=bool), {}, "at least one"),
        (TARGETS, {"a": 1.5}, r"\[0, 1\]"),
        (TARGETS, {"a": float("nan")}, r"\[0, 1\]"),
    ],
)
def test_bad_input_is_refused_clearly(targets, prevalence, match) -> None:
    with pytest.raises(ThresholdError, match=match):
        label_prior_baselines(targets, ["a", "b"], prevalence)


def test_model_report_shows_the_baselines_next_to_the_model() -> None:
    from multitag.training.reports import REPORT_FILE, build_model_report
    from tests.unit.test_reports import evaluation, table_rows, thresholds

    baselines = label_prior_baselines(
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=bool),
        ["circle", "square", "star"],
        {"circle": 0.5, "square": 0.5, "star": 0.0},
    )
    md = build_model_report({"baselines": baselines}, thresholds(), evaluation())[REPORT_FILE]
    rows = {r[0]: r[1:] for r in table_rows(md.decode(), "Compared with guessing")}
    # Model 0.9812 (validation mAP of the fixture) vs 0.5 for each label's frequency.
    assert rows["mAP"][:3] == ["0.9812", "0.5000", "0.4812"]
    assert rows["accuracy_multi"][1] == "0.6667"  # 8 of 12 decisions are "no label"
    assert "all-negative" in rows["accuracy_multi"][3]
    assert "predictors" not in rows
    bare = build_model_report({}, thresholds(), evaluation())[REPORT_FILE].decode()
    assert "Compared with guessing" not in bare  # versions from before baselines
