"""A model's report: one markdown page and the PNG plots it embeds.

Why files and not only Prefect artifacts: the report travels inside the registry version
(report.md + PNGs next to model.pkl), so whoever finds a model later, on any storage, can read
how it was trained and how its thresholds behave without Prefect or the training run.

The plots are drawn by `report_plots`; this module writes the page and puts them together.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from multitag.errors import MultitagError
from multitag.training.report_plots import (
    ordered_labels,
    plot_per_label_ap,
    plot_reliability,
    plot_threshold_curves,
)

REPORT_FILE = "report.md"
CURVES_PNG = "threshold_curves.png"
AP_PNG = "per_label_ap.png"
RELIABILITY_PNG = "reliability.png"

# Headline rows, in reading order; only those present in the evaluation are shown.
HEADLINE = (
    ("accuracy_multi", "accuracy_multi (image x label decisions right)"),
    ("mAP", "mAP (mean per-label average precision)"),
    ("f1_micro", "F1 micro"),
    ("f1_macro", "F1 macro"),
    ("precision_micro", "precision micro"),
    ("recall_micro", "recall micro"),
    ("precision_macro", "precision macro"),
    ("recall_macro", "recall macro"),
    ("exact_match", "exact match (all labels of an image right)"),
    ("none_rate", "no-label rate (images given no label)"),
    ("true_none_rate", "true no-label rate (images with no label)"),
    ("none_correct_rate", "no-label correct (when given)"),
    ("none_recall", "no-label recall"),
    ("n_images", "images"),
    ("n_labels_without_positives", "labels without positives"),
)


class ReportError(MultitagError, ValueError):
    """The inputs lack what the report is built from (the message names the key)."""


def build_model_report(
    metrics: Mapping[str, Any], thresholds: Mapping[str, Any], evaluation: Mapping[str, Any]
) -> dict[str, bytes]:
    """report.md, threshold_curves.png and per_label_ap.png, as {file name: bytes}.

    metrics (metrics.json, see `registry.register_model`); all optional here:
      test, test_best_global ({"threshold", accuracy_multi, ...}), params, dataset, contract,
      library_versions, wall_time_s, device, n_train, n_valid, history (list of per-epoch
      dicts), created_at.
    thresholds (`ThresholdSet.to_json()`); required: vocab, global_threshold, per_label and
      curves = {"thresholds": [grid], "global": {accuracy_multi, f1_micro, precision_micro,
      recall_micro: [one per grid point]}, "per_label": {label: {f1, ...}}}; optional:
      objective, policy, global_sweep, label_details ({label: {"source": ...}}), support.
    evaluation (`Evaluation.to_dict()` on validation with the chosen thresholds); required:
      per_label = {label: {support, ap, f1, precision, recall, threshold}}; headline keys as
      in HEADLINE. Undefined ratios are None (NaN) and print as "n/a".
    """
    _require(thresholds, ("vocab", "global_threshold", "per_label", "curves"), "thresholds")
    _require(thresholds["curves"], ("thresholds", "global"), "thresholds['curves']")
    _require(evaluation, ("per_label",), "evaluation")
    markdown = render_markdown(metrics, thresholds, evaluation)
    files = {
        REPORT_FILE: markdown.encode("utf-8"),
        CURVES_PNG: plot_threshold_curves(thresholds),
        AP_PNG: plot_per_label_ap(evaluation, thresholds["vocab"]),
    }
    if _reliability(metrics):
        files[RELIABILITY_PNG] = plot_reliability(_reliability(metrics))
    return files


def _require(mapping: Mapping[str, Any], keys: Iterable[str], what: str) -> None:
    if not isinstance(mapping, Mapping):
        raise ReportError(f"{what} must be a dict, got {type(mapping).__name__}")
    if missing := [k for k in keys if k not in mapping]:
        raise ReportError(f"{what} lacks {missing}; cannot build the model report")


# ------------------------------------------------------------------------------ markdown


def fmt(value: Any) -> str:
    """One table cell: 4 decimals for ratios, n/a for undefined, pipes escaped."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, Mapping | list | tuple):
        value = json.dumps(value, default=str)
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += _flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def render_markdown(
    metrics: Mapping[str, Any], thresholds: Mapping[str, Any], evaluation: Mapping[str, Any]
) -> str:
    sections = [
        "# Model report",
        _headline_section(metrics, evaluation),
        _baseline_section(metrics, evaluation),
        _test_comparison_section(metrics),
        _thresholds_section(thresholds),
        _per_label_section(thresholds, evaluation),
        _calibration_section(metrics),
        "## Plots\n\n"
        f"![Threshold curves]({CURVES_PNG})\n\n![Per-label average precision]({AP_PNG})"
        + (f"\n\n![Reliability diagram]({RELIABILITY_PNG})" if _reliability(metrics) else ""),
        _training_section(metrics),
        _key_value_section("Lineage", metrics.get("lineage")),
        _key_value_section("Dataset", metrics.get("dataset")),
        _key_value_section("Data contract", metrics.get("contract")),
        _key_value_section("Library versions", metrics.get("library_versions")),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _headline_section(metrics: Mapping[str, Any], evaluation: Mapping[str, Any]) -> str:
    test = metrics.get("test") if isinstance(metrics.get("test"), Mapping) else None
    header = ["Metric", "Validation"] + (["Test (held out)"] if test else [])
    rows = []
    for key, label in HEADLINE:
        if key in evaluation:
            rows.append([label, evaluation[key]] + ([test.get(key)] if test else []))
    intro = "Validation figures use the selected thresholds (the split they were chosen on)"
    if test:
        intro += "; test figures use the same thresholds on images never used for choosing"
    return f"## Headline metrics\n\n{intro}.\n\n" + table(header, rows)


def _baseline_section(metrics: Mapping[str, Any], evaluation: Mapping[str, Any]) -> str:
    """The model next to what guessing scores on the same validation images (the gate's floor)."""
    baselines = metrics.get("baselines")
    if not isinstance(baselines, Mapping):
        return ""
    predictors = baselines.get("predictors")
    how: Mapping[str, Any] = predictors if isinstance(predictors, Mapping) else {}
    rows = []
    for key, value in baselines.items():
        if key != "predictors":
            model = evaluation.get(key)
            gap = model - value if isinstance(model, float) and isinstance(value, float) else None
            rows.append([key, model, value, gap, how.get(key, "")])
    intro = (
        "What a predictor that never looks at the image scores on the same validation images. "
        "The champion gate promotes a model only if its promote metric beats this by the "
        "stated margin (`baseline_margin`)."
    )
    header = ["Metric", "Model", "Label-prior baseline", "Model - baseline", "Baseline predictor"]
    return f"## Compared with guessing\n\n{intro}\n\n" + table(header, rows)


def _test_comparison_section(metrics: Mapping[str, Any]) -> str:
    """Selected thresholds vs one global threshold (chosen on validation, and the test oracle)."""
    best, test = metrics.get("test_best_global"), metrics.get("test")
    glob = metrics.get("test_global_policy")
    if not isinstance(best, Mapping) or not isinstance(test, Mapping):
        return ""
    glob = glob if isinstance(glob, Mapping) else None
    has_glob = glob is not None
    keys = [k for k, _ in HEADLINE if k in best and k in test]
    rows = [[k, test[k], *([glob.get(k)] if glob is not None else []), best[k]] for k in keys]
    header = ["Metric", "Selected thresholds"]
    header += ["Global, chosen on validation"] if has_glob else []
    header += ["Best global (oracle)"]
    return (
        "## Held-out test: selected vs global threshold\n\n"
        "All columns are measured on the held-out test images. The best single global threshold "
        f"chosen on the test set itself ({fmt(best.get('threshold'))}) is an upper bound for any "
        "global threshold.\n\n" + table(header, rows)
    )


def _thresholds_section(thresholds: Mapping[str, Any]) -> str:
    rows = [
        ["objective", thresholds.get("objective")],
        ["policy", thresholds.get("policy")],
        ["global threshold", thresholds["global_threshold"]],
    ]
    sweep = thresholds.get("global_sweep") or {}
    for key in ("accuracy_multi", "f1_micro"):
        if isinstance(sweep.get(key), Mapping):
            best = sweep[key]
            rows.append(
                [
                    f"best {key} on the global sweep",
                    f"{fmt(best.get('value'))} at {fmt(best.get('threshold'))}",
                ]
            )
    return "## Thresholds\n\nA label is predicted when its score is above its threshold.\n\n" + (
        table(["Setting", "Value"], rows)
    )


def _per_label_section(thresholds: Mapping[str, Any], evaluation: Mapping[str, Any]) -> str:
    per_label = evaluation["per_label"]
    details = thresholds.get("label_details") or {}
    rows = []
    for label in ordered_labels(thresholds["vocab"], per_label):
        m = per_label.get(label) or {}
        threshold = m.get("threshold", thresholds["per_label"].get(label))
        source = (details.get(label) or {}).get("source")
        rows.append(
            [
                label,
                m.get("support"),
                m.get("ap"),
                m.get("f1"),
                m.get("precision"),
                m.get("recall"),
                threshold,
                source,
            ]
        )
    header = ["Label", "Support", "AP", "F1", "Precision", "Recall", "Threshold", "Source"]
    return "## Per label (validation)\n\n" + table(header, rows)


def _calibration_section(metrics: Mapping[str, Any]) -> str:
    """ECE before/after calibration per split, and each label's map (`training.calibration`)."""
    cal = metrics.get("calibration")
    if not isinstance(cal, Mapping):
        return ""
    found = cal.get("ece")
    ece: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    splits = [s for s in ("validation", "test") if isinstance(ece.get(s), Mapping)]
    rows = [
        [
            split + (" (in-sample: the map was fitted here)" if split == "validation" else
                     " (held out)"),
            ece[split].get("n_images"),
            ece[split].get("before"),
            ece[split].get("after"),
        ]
        for split in splits
    ]  # fmt: skip
    intro = (
        f"`scores` in the tags output are calibrated probabilities ({cal.get('method')}: "
        "score = sigmoid(slope * logit(raw) + bias) per label, fitted on validation, slope > 0). "
        "Labels are still decided on the raw score at the threshold; the same decision is "
        "score > score threshold. ECE (expected calibration error): "
        f"{cal.get('ece_bins', 'equal-width bins')}; lower is better."
    )
    out = "## Calibration\n\n" + intro + "\n\n"
    out += table(["Split", "Images", "ECE before", "ECE after"], rows)
    per_label = cal.get("per_label")
    if isinstance(per_label, Mapping):
        by_split = {s: ece[s].get("per_label") or {} for s in splits}
        header = ["Label", "Slope", "Bias", "Fitted", "Threshold", "Score threshold"]
        header += [f"ECE {s} before -> after" for s in splits]
        label_rows = []
        for label, p in per_label.items():
            p = p if isinstance(p, Mapping) else {}
            cells = [
                f"{fmt((by_split[s].get(label) or {}).get('before'))} -> "
                f"{fmt((by_split[s].get(label) or {}).get('after'))}"
                for s in splits
            ]
            fitted = "yes" if p.get("fitted") else p.get("reason", "no")
            label_rows.append(
                [label, p.get("slope"), p.get("bias"), fitted, p.get("threshold"),
                 p.get("score_threshold"), *cells]
            )  # fmt: skip
        out += "\n\n" + table(header, label_rows)
    return out


def _reliability(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """{split: {"before": bins, "after": bins}} for the reliability plot; {} when absent."""
    cal = metrics.get("calibration")
    ece = cal.get("ece") if isinstance(cal, Mapping) else None
    if not isinstance(ece, Mapping):
        return {}
    return {
        split: v["reliability"]
        for split, v in ece.items()
        if isinstance(v, Mapping) and isinstance(v.get("reliability"), Mapping)
    }


def _training_section(metrics: Mapping[str, Any]) -> str:
    facts = [
        [name, metrics[key]]
        for key, name in (
            ("device", "device"),
            ("wall_time_s", "wall time (s)"),
            ("n_train", "training images"),
            ("n_valid", "validation images"),
            ("created_at", "created at"),
        )
        if key in metrics
    ]
    params = metrics.get("params")
    rows = facts + (_flatten(params) if isinstance(params, Mapping) else [])
    if not rows:
        return ""
    out = "## Training\n\n" + table(["Parameter", "Value"], rows)
    history = metrics.get("history")
    if isinstance(history, list) and history and isinstance(history[0], Mapping):
        columns = list(history[0])
        out += "\n\n### History\n\n" + table(
            columns, [[h.get(c) for c in columns] for h in history]
        )
    return out


def _key_value_section(title: str, mapping: Any) -> str:
    if not isinstance(mapping, Mapping) or not mapping:
        return ""
    return f"## {title}\n\n" + table(["Key", "Value"], _flatten(mapping))


def inline_images(markdown: str, images: Mapping[str, bytes]) -> str:
    """Embed the report's PNGs as data URIs, for viewers (the Prefect UI) that cannot follow
    a relative file name into the registry folder."""
    for name, data in images.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        markdown = markdown.replace(f"]({name})", f"]({uri})")
    return markdown
