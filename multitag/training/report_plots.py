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
