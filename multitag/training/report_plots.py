"""The model report's PNG plots: threshold curves and per-label average precision.

Why apart from the markdown: the page is text built from dicts, the plots are matplotlib
figures; keeping them apart lets the text be read and tested without matplotlib. Plots are
drawn on `matplotlib.figure.Figure` with an Agg canvas: no pyplot, so no global backend state
is touched and nothing needs a display. matplotlib is imported when a figure is drawn: it
costs 0.36-0.66 s (measured on the 2-core dev box, numpy already loaded), and everything that
imports `reports` without drawing (the tasks module, the registry) need not pay it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_CURVE_SERIES = (
    ("accuracy_multi", "accuracy_multi"),
    ("f1_micro", "F1 micro"),
    ("precision_micro", "precision micro"),
    ("recall_micro", "recall micro"),
)


def ordered_labels(vocab: Sequence[str], per_label: Mapping[str, Any]) -> list[str]:
    """Vocab order first, then any evaluated label the vocab lacks (should not happen)."""
    return list(vocab) + [label for label in per_label if label not in vocab]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _floats(values: Sequence[Any]) -> Any:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def plot_threshold_curves(thresholds: Mapping[str, Any]) -> bytes:
    """Left: the global sweep (fastbook) with the chosen global threshold marked. Right: each
    label's F1 curve with a dot at its own chosen threshold."""
    curves = thresholds["curves"]
    grid = _floats(curves["thresholds"])
    per_label_curves = curves.get("per_label") or {}
    fig = _figure(12 if per_label_curves else 6.5, 4.5)
    axes = fig.subplots(1, 2 if per_label_curves else 1, squeeze=False)[0]

    ax = axes[0]
    for key, name in _CURVE_SERIES:
        if key in curves["global"]:
            ax.plot(grid, _floats(curves["global"][key]), label=name)
    chosen = float(thresholds["global_threshold"])
    ax.axvline(chosen, color="black", linestyle="--", label=f"chosen global {chosen:.3f}")
    ax.set(
        title="Global threshold sweep (validation)",
        xlabel="threshold",
        ylabel="score",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(loc="lower left", fontsize="small")
    ax.grid(alpha=0.3)

    if per_label_curves:
        ax = axes[1]
        for label in ordered_labels(thresholds["vocab"], per_label_curves):
            f1 = per_label_curves.get(label, {}).get("f1")
            if f1 is None:
                continue
            (line,) = ax.plot(grid, _floats(f1), linewidth=1, label=label)
            t = thresholds["per_label"].get(label)
            if t is not None:
                ax.plot([t], [_interp(grid, _floats(f1), float(t))], "o", color=line.get_color())
        ax.set(
            title="Per-label F1 (dot: chosen threshold)",
            xlabel="threshold",
            ylabel="F1",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
        ax.legend(loc="lower left", fontsize="x-small", ncols=2)
        ax.grid(alpha=0.3)
    return _png(fig)


def _interp(grid: Any, values: Any, x: float) -> float:
    ok = np.isfinite(values)
    if not ok.any():
        return math.nan
    return float(np.interp(x, grid[ok], values[ok]))


def plot_per_label_ap(evaluation: Mapping[str, Any], vocab: Sequence[str]) -> bytes:
    """Horizontal bars of validation AP per label, annotated with support; n/a for no positives."""
    per_label = evaluation["per_label"]
    labels = ordered_labels(vocab, per_label)
    ap = _floats([(per_label.get(label) or {}).get("ap") for label in labels])
    fig = _figure(7, max(2.5, 0.35 * len(labels) + 1.2))
    ax = fig.subplots()
    y = list(range(len(labels)))
    ax.barh(y, [0 if math.isnan(v) else v for v in ap], color="tab:blue")
    for i, (label, value) in enumerate(zip(labels, ap, strict=True)):
        support = (per_label.get(label) or {}).get("support")
        text = "n/a" if math.isnan(value) else f"{value:.3f}"
        ax.text(
            min(value, 1.0) if not math.isnan(value) else 0.01,
            i,
            f" {text} (n={support})",
            va="center",
            fontsize="small",
        )
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    mean_ap = evaluation.get("mAP")
    title = "Average precision per label (validation)"
    if isinstance(mean_ap, int | float):
        title += f", mAP {mean_ap:.3f}"
    ax.set(title=title, xlabel="average precision", xlim=(0, 1.25))
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


_LOSS_KEYS = ("train_loss", "valid_loss")
_NOT_METRICS = frozenset({"epoch", "time_s", *_LOSS_KEYS})


def plot_training_curves(history: Sequence[Mapping[str, Any]]) -> bytes:
    """Left: training and validation loss per epoch. Right: every other recorded metric.

    Why both: a validation loss that climbs while the training loss falls is overfitting,
    which the metrics alone (thresholded) can hide for an epoch or two.
    """
    if not history:
        raise ValueError("no training history to plot (no epoch finished)")
    epochs = [int(row.get("epoch", i + 1)) for i, row in enumerate(history)]
    metrics = [k for k in history[0] if k not in _NOT_METRICS]
    fig = _figure(12 if metrics else 6.5, 4.2)
    axes = fig.subplots(1, 2 if metrics else 1, squeeze=False)[0]
    ax = axes[0]
    for key in _LOSS_KEYS:
        if any(key in row for row in history):
            ax.plot(epochs, _floats([row.get(key) for row in history]), "o-", label=key)
    ax.set(title="Loss per epoch", xlabel="epoch", ylabel="loss")
    ax.set_xticks(epochs)
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    if metrics:
        ax = axes[1]
        for key in metrics:
            ax.plot(epochs, _floats([row.get(key) for row in history]), "o-", label=key)
        ax.set(title="Validation metrics per epoch", xlabel="epoch", ylabel="score")
        ax.set_xticks(epochs)
        ax.legend(loc="lower right", fontsize="small")
        ax.grid(alpha=0.3)
    return _png(fig)


def precision_recall_curve(scores: Any, positives: Any) -> tuple[Any, Any]:
    """Precision and recall at every distinct score as a threshold, highest score first.

    Why by hand: numpy only (no scikit-learn in the image). Ties share one point: all images
    at a score are kept or dropped together, as a threshold does.
    """
    scores, positives = np.asarray(scores, dtype=float), np.asarray(positives, dtype=bool)
    n_pos = int(positives.sum())
    if n_pos == 0:
        return np.array([]), np.array([])
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positives[order]
    tp = np.cumsum(p)
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp, kept = tp[last_of_tie], (np.arange(len(s)) + 1)[last_of_tie]
    return tp / kept, tp / n_pos


def plot_precision_recall(probs: Any, targets: Any, vocab: Sequence[str]) -> bytes:
    """Each label's precision-recall curve on validation (legend: its support).

    A label without positives in validation has no curve and is named in the title.
    """
    probs, targets = np.asarray(probs, dtype=float), np.asarray(targets, dtype=bool)
    if probs.shape != targets.shape or probs.ndim != 2 or probs.shape[1] != len(vocab):
        raise ValueError(
            f"scores {probs.shape} and targets {targets.shape} must both be (images, {len(vocab)})"
        )
    fig = _figure(7.5, 6)
    ax = fig.subplots()
    missing = []
    for j, label in enumerate(vocab):
        precision, recall = precision_recall_curve(probs[:, j], targets[:, j])
        if not len(precision):
            missing.append(label)
            continue
        n_pos = int(targets[:, j].sum())
        ax.plot(recall, precision, linewidth=1, label=f"{label} (n={n_pos})")
    title = f"Precision-recall per label (validation, {len(probs)} images)"
    if missing:
        title += f"\nno positives: {', '.join(missing)}"
    ax.set(title=title, xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.02))
    if len(missing) < len(vocab):
        ax.legend(loc="lower left", fontsize="x-small", ncols=2)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_reliability(by_split: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Reliability diagram per split: share positive against mean score per bin, raw and
    calibrated (`training.calibration.reliability` bins); the diagonal is perfect calibration."""
    fig = _figure(5 * len(by_split), 4.5)
    axes = fig.subplots(1, len(by_split), squeeze=False)[0]
    for ax, (split, bins) in zip(axes, by_split.items(), strict=True):
        for key, style in (("before", "o--"), ("after", "s-")):
            b = bins.get(key) or {}
            conf, freq = _floats(b.get("confidence", [])), _floats(b.get("frequency", []))
            ok = np.isfinite(conf) & np.isfinite(freq)
            ax.plot(conf[ok], freq[ok], style, markersize=4, label=f"{key} calibration")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        ax.set(title=f"Reliability ({split})", xlabel="mean score in bin",
               ylabel="share positive", xlim=(0, 1), ylim=(0, 1.02))  # fmt: skip
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    return _png(fig)
