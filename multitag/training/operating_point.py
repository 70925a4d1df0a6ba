"""Run-time operating points: thresholds other than those chosen at training, per run.

Why: the thresholds chosen at training serve one objective; a user who needs "at least 95 %
precision per label" or a reviewed list of thresholds should not retrain for it. Both are
derived here, as values, from what is stored with the model (thresholds.json: its vocab,
support, parameters and validation curves), so tagging only applies a ThresholdSet.

`at_min_precision`: per label, the lowest threshold on the stored curve grid (0.00, 0.01,
..., 1.00) whose validation precision is >= P: the most recall that keeps the precision asked
for on validation. A label whose curve never reaches P gets NEVER (scores are probabilities,
<= 1, and a label is predicted when score > threshold, so it is never predicted) and is named.
Labels with fewer validation positives than the training's `min_positives` use the micro
(all-label) precision curve instead, as training selection falls back to the global value.

`from_file`: a JSON file of per-label thresholds, either a flat ``{"label": value}`` map or a
file in the format of the model's own thresholds.json (its ``per_label`` map is used), with
exactly the model's labels.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from multitag.config import ThresholdParams
from multitag.errors import InputError
from multitag.storage import read_json
from multitag.training.threshold_set import ThresholdSet

NEVER = 1.0  # score > 1 never happens for a probability: the label is never predicted
FASTPATH_NOTE = (
    "the fast path's agreement with the fp32 model was checked at the training thresholds; "
    "at this operating point its decisions may agree less (use --precision fp32 for exact)"
)

Kind = Literal["training", "min_precision", "file"]


class OperatingPointError(InputError):
    """The operating point asked for cannot be applied to this model (exit 2)."""


@dataclass(frozen=True)
class OperatingPoint:
    """The thresholds a run applies and how they were chosen; `to_manifest()` records it."""

    kind: Kind
    thresholds: ThresholdSet
    value: float | None = None  # min_precision's P
    path: str | None = None  # the thresholds file
    never: list[str] = field(default_factory=list)  # labels whose curve never reaches P
    fallback: list[str] = field(default_factory=list)  # too little support: micro curve used

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.value is not None:
            out["value"] = self.value
        if self.path is not None:
            out["path"] = self.path
        out["thresholds"] = dict(self.thresholds.per_label)
        if self.kind == "min_precision":
            out["never_predicted"] = list(self.never)
            out["micro_curve_fallback"] = list(self.fallback)
        if self.kind != "training":
            out["note"] = FASTPATH_NOTE
        return out


def training_point(ts: ThresholdSet) -> OperatingPoint:
    """The default: the thresholds chosen at training, unchanged."""
    return OperatingPoint("training", ts)


def lowest_threshold_at_precision(
    grid: Sequence[float], precision: Sequence[float | None], min_precision: float
) -> float | None:
    """The lowest grid threshold whose precision is >= min_precision; None if none is.

    None in `precision` marks a threshold with no predictions (precision undefined), which
    never counts as reaching the target.
    """
    if len(grid) != len(precision):
        raise OperatingPointError(
            f"stored curve has {len(precision)} precision values for {len(grid)} thresholds"
        )
    hits = [
        float(t)
        for t, p in zip(grid, precision, strict=True)
        if p is not None and p >= min_precision - 1e-12
    ]
    return min(hits) if hits else None


def at_min_precision(ts: ThresholdSet, min_precision: float) -> OperatingPoint:
    """Per label, the lowest threshold whose validation precision is >= `min_precision`."""
    if not 0.0 < min_precision <= 1.0:
        raise OperatingPointError(f"--min-precision must be in (0, 1]; got {min_precision}")
    curves = ts.curves or {}
    grid = curves.get("thresholds")
    per_label_curves = curves.get("per_label") or {}
    if not grid or any(label not in per_label_curves for label in ts.vocab):
        raise OperatingPointError(
            "this model's thresholds.json has no validation precision curve for every label, "
            "so --min-precision cannot be derived; pass --thresholds FILE instead"
        )
    min_pos = int(ts.params.get("min_positives", ThresholdParams().min_positives))
    micro = (curves.get("global") or {}).get("precision_micro")
    chosen: dict[str, float] = {}
    never: list[str] = []
    fallback: list[str] = []
    for label in ts.vocab:
        curve = per_label_curves[label].get("precision")
        if ts.support.get(label, 0) < min_pos and micro is not None:
            curve = micro
            fallback.append(label)
        if curve is None:
            raise OperatingPointError(f"thresholds.json has no precision curve for {label!r}")
        t = lowest_threshold_at_precision(grid, curve, min_precision)
        if t is None:
            never.append(label)
        chosen[label] = NEVER if t is None else t
    return OperatingPoint(
        "min_precision",
        dataclasses.replace(ts, per_label=chosen),
        value=min_precision,
        never=never,
        fallback=fallback,
    )


def parse_threshold_map(data: Any, vocab: Sequence[str], where: str) -> dict[str, float]:
    """Per-label thresholds from a flat map or a thresholds.json, with exactly `vocab`'s labels.

    Refused with a message naming the labels: unknown ones (a file for another model, or a
    typo, would silently tag nothing), missing ones, and values that are not numbers in [0, 1].
    """
    if isinstance(data, Mapping) and isinstance(data.get("per_label"), Mapping):
        data = data["per_label"]
    if not isinstance(data, Mapping) or not data:
        raise OperatingPointError(
            f'{where}: expected a JSON object {{"label": threshold, ...}} or a thresholds.json '
            "with a per_label map"
        )
    unknown = sorted(str(k) for k in data if k not in vocab)
    missing = [label for label in vocab if label not in data]
    if unknown or missing:
        raise OperatingPointError(
            f"{where}: labels do not match the model's vocab {list(vocab)}"
            + (f"; unknown: {unknown}" if unknown else "")
            + (f"; missing: {missing}" if missing else "")
        )
    out: dict[str, float] = {}
    for label in vocab:
        value = data[label]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise OperatingPointError(
                f"{where}: threshold for {label!r} must be a number in [0, 1]; got {value!r}"
            )
        out[label] = float(value)
    return out


def from_file(ts: ThresholdSet, path: str) -> OperatingPoint:
    """The thresholds of a JSON file (local path or fsspec URL), checked against the model."""
    try:
        data = read_json(path)
    except FileNotFoundError as exc:
        raise OperatingPointError(f"--thresholds {path}: no such file") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OperatingPointError(f"--thresholds {path}: not valid JSON ({exc})") from exc
    per_label = parse_threshold_map(data, ts.vocab, f"--thresholds {path}")
    return OperatingPoint("file", dataclasses.replace(ts, per_label=per_label), path=path)


def resolve(
    ts: ThresholdSet, *, min_precision: float | None = None, thresholds_file: str | None = None
) -> OperatingPoint:
    """The operating point a run asked for (at most one of the two), else training's."""
    if min_precision is not None and thresholds_file is not None:
        raise OperatingPointError("--min-precision and --thresholds are mutually exclusive")
    if min_precision is not None:
        return at_min_precision(ts, min_precision)
    if thresholds_file is not None:
        return from_file(ts, thresholds_file)
    return training_point(ts)
