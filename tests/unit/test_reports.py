"""Model report: markdown tables a person reads, and PNG plots that really are images."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
import pytest
from PIL import Image

from multitag.config import ThresholdParams
from multitag.training import calibration
from multitag.training.reports import (
    AP_PNG,
    CURVES_PNG,
    RELIABILITY_PNG,
    REPORT_FILE,
    ReportError,
    build_model_report,
)

VOCAB = ["circle", "square", "star"]
GRID = [round(i / 100, 2) for i in range(101)]


def thresholds() -> dict[str, Any]:
    f1 = [1 - abs(g - 0.4) for g in GRID]
    return {
        "vocab": VOCAB,
        "objective": "f1",
        "policy": "shrunk",
        "global_threshold": 0.4,
        "per_label": {"circle": 0.35, "square": 0.4, "star": 0.4},
        "support": {"circle": 12, "square": 9, "star": 0},
        "label_details": {"circle": {"source": "own"}, "square": {"source": "global"}},
        "global_sweep": {
            "accuracy_multi": {"threshold": 0.45, "value": 0.991},
            "f1_micro": {"threshold": 0.4, "value": 0.972},
        },
        "curves": {
            "thresholds": GRID,
            "global": {
                "accuracy_multi": [0.8 + 0.1 * g for g in GRID],
                "f1_micro": f1,
                "precision_micro": GRID,
                "recall_micro": [1 - g for g in GRID],
            },
            "per_label": {
                "circle": {"f1": f1},
                "square": {"f1": f1},
                "star": {"f1": [None] * len(GRID)},  # no positives: undefined everywhere
            },
        },
    }


def evaluation() -> dict[str, Any]:
    def label(support: int, ap: float | None, thr: float) -> dict[str, Any]:
        f1 = None if ap is None else 0.9
        return {
            "support": support,
            "ap": ap,
            "f1": f1,
            "precision": f1,
            "recall": f1,
            "threshold": thr,
            "n_predicted": support,
        }

    return {
        "accuracy_multi": 0.9931,
        "mAP": 0.9812,
        "f1_micro": 0.97,
        "f1_macro": 0.96,
        "none_rate": 0.125,
        "none_recall": None,
        "per_label": {
            "circle": label(12, 0.9876, 0.35),
            "square": label(9, 0.9748, 0.4),
            "star": label(0, None, 0.4),
        },
    }


def metrics() -> dict[str, Any]:
    return {
        "validation": evaluation(),
        "test": {"accuracy_multi": 0.9876, "mAP": 0.97},
        "test_best_global": {"threshold": 0.42, "accuracy_multi": 0.9881, "mAP": 0.97},
        "test_global_policy": {"threshold": 0.4, "accuracy_multi": 0.9870, "mAP": 0.97},
        "params": {"arch": "shapes_cnn", "epochs": 12, "lr": 0.003, "nested": {"a": 1}},
        "dataset": {"name": "shapes", "n_train": 1600},
        "contract": {"ok": True, "n_rows": 2000},
        "library_versions": {"torch": "2.14.1", "fastai": "2.8.12"},
        "wall_time_s": 481.25,
        "device": "cpu",
        "history": [{"epoch": 0, "train_loss": 0.61}, {"epoch": 1, "train_loss": 0.32}],
    }


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """Cells of the first table under `## heading`."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_report_files_and_tables():
    files = build_model_report(metrics(), thresholds(), evaluation())
    assert set(files) == {REPORT_FILE, CURVES_PNG, AP_PNG}
    md = files[REPORT_FILE].decode("utf-8")

    headline = {row[0].split(" (")[0]: row[1:] for row in table_rows(md, "Headline metrics")}
    assert headline["accuracy_multi"] == ["0.9931", "0.9876"]
    assert headline["mAP"] == ["0.9812", "0.9700"]
    assert headline["no-label rate"] == ["0.1250", "n/a"]
    assert headline["no-label recall"] == ["n/a", "n/a"]  # None prints as n/a, not 0

    per_label = table_rows(md, "Per label (validation)")
    assert [r[0] for r in per_label] == VOCAB  # vocab order
    assert per_label[0] == ["circle", "12", "0.9876", "0.9000", "0.9000", "0.9000", "0.3500", "own"]
    assert per_label[2][:3] == ["star", "0", "n/a"]

    training = dict(table_rows(md, "Training"))
    assert training["arch"] == "shapes_cnn" and training["nested.a"] == "1"
    assert training["wall time (s)"] == "481.2500" and training["device"] == "cpu"
    assert dict(table_rows(md, "Library versions"))["fastai"] == "2.8.12"
    assert dict(table_rows(md, "Dataset"))["name"] == "shapes"
    comparison = table_rows(md, "Held-out test: selected vs global threshold")
    assert ["accuracy_multi", "0.9876", "0.9870", "0.9881"] in comparison
    # Images are embedded by relative file name, so the folder renders as is anywhere.
    assert f"]({CURVES_PNG})" in md and f"]({AP_PNG})" in md


def test_plots_are_valid_pngs():
    files = build_model_report(metrics(), thresholds(), evaluation())
    for name in (CURVES_PNG, AP_PNG):
        assert files[name].startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(files[name])) as img:
            img.verify()
        with Image.open(io.BytesIO(files[name])) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 150
            pixels = np.asarray(img.convert("L"))
            assert pixels.std() > 5  # something was drawn, not a blank canvas


def test_minimal_inputs_leave_out_optional_sections():
    ev = evaluation()
    files = build_model_report({}, thresholds(), ev)
    md = files[REPORT_FILE].decode()
    assert "## Per label" in md and "## Headline metrics" in md
    assert not re.search(r"^## (Training|Dataset|Library versions|Held-out)", md, re.M)
    assert "Test (held out)" not in md


def test_pipes_in_values_do_not_break_tables():
    m = metrics()
    m["dataset"] = {"name": "a|b"}
    md = build_model_report(m, thresholds(), evaluation())[REPORT_FILE].decode()
    assert "\n| name | a\\|b |\n" in md


@pytest.mark.parametrize("drop", ["curves", "per_label", "vocab"])
def test_missing_required_keys_named(drop: str):
    th = thresholds()
    del th[drop]
    with pytest.raises(ReportError, match=drop):
        build_model_report(metrics(), th, evaluation())


def test_missing_per_label_evaluation_named():
    ev = evaluation()
    del ev["per_label"]
    with pytest.raises(ReportError, match="evaluation lacks"):
        build_model_report(metrics(), thresholds(), ev)


def test_real_threshold_set_and_evaluation_render():
    """The producers' real output (ThresholdSet.to_json, Evaluation.to_dict) is accepted."""
    from multitag.training import thresholds as th

    rng = np.random.default_rng(0)
    targets = rng.random((200, 3)) < 0.3
    probs = np.clip(targets * 0.6 + rng.random((200, 3)) * 0.5, 0, 1).astype(np.float32)
    ts = th.select_thresholds(probs, targets, VOCAB, ThresholdParams(policy="global"))
    ev = th.evaluate(probs, targets, ts.as_array(), VOCAB).to_dict()
    files = build_model_report({"validation": ev}, ts.to_json(), ev)
    md = files[REPORT_FILE].decode()
    assert [r[0] for r in table_rows(md, "Per label (validation)")] == VOCAB
    assert f"| global threshold | {ts.global_threshold:.4f} |" in md


def test_inline_images_embeds_pngs_for_the_ui():
    from multitag.training.reports import inline_images

    md = f"![curves]({CURVES_PNG})\n![ap]({AP_PNG})\n"
    out = inline_images(md, {CURVES_PNG: b"\x89PNG-a", AP_PNG: b"\x89PNG-b"})
    assert f"]({CURVES_PNG})" not in out and f"]({AP_PNG})" not in out
    assert out.count("](data:image/png;base64,") == 2


def calibration_summary() -> dict[str, Any]:
    """A real `calibration.summary` of overconfident scores (test: other draws, held out)."""
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        z = rng.normal(0, 1.5, (n, len(VOCAB)))
        return calibration.sigmoid(3 * z), rng.random(z.shape) < calibration.sigmoid(z)

    (vp, vy), (tp, ty) = draw(600), draw(400)
    vy[:, 2] = False  # star: no positives -> identity
    fit = calibration.fit(vp, vy, VOCAB, min_positives=20)
    ece = {
        "validation": calibration.ece_before_after(fit, vp, vy),
        "test": calibration.ece_before_after(fit, tp, ty),
    }
    return calibration.summary(fit, [0.35, 0.4, 0.4], json.loads(json.dumps(ece)))


def test_calibration_section_and_reliability_plot():
    m = {**metrics(), "calibration": calibration_summary()}
    files = build_model_report(m, thresholds(), evaluation())
    md = files[REPORT_FILE].decode()
    ece = m["calibration"]["ece"]
    rows = {r[0].split(" (")[0]: r[1:] for r in table_rows(md, "Calibration")}
    assert rows["validation"] == [
        "600",
        f"{ece['validation']['before']:.4f}",
        f"{ece['validation']['after']:.4f}",
    ]
    assert rows["test"][0] == "400"
    assert float(rows["test"][2]) < float(rows["test"][1])  # overconfident scores: ECE falls
    assert "in-sample" in md and "held out" in md
    per_label = md.split("## Calibration\n", 1)[1].split("\n## ", 1)[0].split("| Label |")[1]
    star = next(ln for ln in per_label.splitlines() if ln.startswith("| star |"))
    assert "| 1.0000 | 0.0000 | identity: 0 positives" in star
    assert f"]({RELIABILITY_PNG})" in md
    with Image.open(io.BytesIO(files[RELIABILITY_PNG])) as img:
        assert img.format == "PNG" and img.width > 500
        assert np.asarray(img.convert("L")).std() > 5


def test_no_calibration_section_for_versions_without_one():
    files = build_model_report(metrics(), thresholds(), evaluation())
    assert "## Calibration" not in files[REPORT_FILE].decode() and RELIABILITY_PNG not in files
