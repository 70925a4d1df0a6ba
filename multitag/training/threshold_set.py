"""The chosen thresholds as a value: thresholds.json (de)serialisation, and applying them.

Why apart from selection: tagging only loads and applies thresholds, so this module is what
`multitag.inference` needs, and it must read the same file selection wrote, byte for byte in
meaning: `from_json` refuses a file of another format version or with labels that disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multitag.training.score_groups import ThresholdError, as_probs

FORMAT_VERSION = 1
CONVENTION = "predict a label when its score > threshold"


@dataclass(frozen=True)
class ThresholdSet:
    """The chosen thresholds and how they were chosen; `to_json()` is thresholds.json.

    `label_details[label]` records `own` (the label's validation optimum), `weight` (how far
    the final value moved from global toward own: 0 = global, 1 = own), `source` and, for
    constraint objectives, `target_met`. `global_sweep` holds the fastbook sweep: the best
    single threshold for accuracy_multi and for micro-F1, with their validation values.
    """

    vocab: list[str]
    objective: str
    policy: str
    global_threshold: float
    per_label: dict[str, float]
    support: dict[str, int]
    curves: dict[str, Any] = field(default_factory=dict)
    global_sweep: dict[str, dict[str, float]] = field(default_factory=dict)
    label_details: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    n_images: int = 0

    def as_array(self) -> np.ndarray:
        """Thresholds in vocab order (float64), ready to compare against (N, L) scores."""
        return np.array([self.per_label[label] for label in self.vocab], dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return json_ready(
            {
                "format_version": FORMAT_VERSION,
                "convention": CONVENTION,
                "vocab": list(self.vocab),
                "objective": self.objective,
                "policy": self.policy,
                "global_threshold": self.global_threshold,
                "per_label": self.per_label,
                "support": self.support,
                "n_images": self.n_images,
                "global_sweep": self.global_sweep,
                "label_details": self.label_details,
                "params": self.params,
                "curves": self.curves,
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ThresholdSet:
        """Rebuild from `to_json()` output; refuses files it cannot trust to mean the same."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ThresholdError(
                f"thresholds.json format_version {version!r} is not {FORMAT_VERSION}: written "
                "by another multitag version; re-select thresholds with this one."
            )
        missing = [
            k
            for k in ("vocab", "objective", "policy", "global_threshold", "per_label")
            if k not in data
        ]
        if missing:
            raise ThresholdError(f"thresholds.json lacks {missing}.")
        vocab = [str(v) for v in data["vocab"]]
        per_label = {str(k): float(v) for k, v in data["per_label"].items()}
        if set(per_label) != set(vocab) or len(vocab) != len(set(vocab)):
            raise ThresholdError(
                f"thresholds.json per_label labels {sorted(per_label)} do not match its vocab "
                f"{vocab}."
            )
        if not all(math.isfinite(v) for v in per_label.values()):
            raise ThresholdError(f"thresholds.json has a non-finite threshold: {per_label}.")
        return cls(
            vocab=vocab,
            objective=str(data["objective"]),
            policy=str(data["policy"]),
            global_threshold=float(data["global_threshold"]),
            per_label=per_label,
            support={str(k): int(v) for k, v in data.get("support", {}).items()},
            curves=dict(data.get("curves", {})),
            global_sweep={k: dict(v) for k, v in data.get("global_sweep", {}).items()},
            label_details={k: dict(v) for k, v in data.get("label_details", {}).items()},
            params=dict(data.get("params", {})),
            n_images=int(data.get("n_images", 0)),
        )


def apply_thresholds(probs: np.ndarray, ts: ThresholdSet | np.ndarray | float) -> np.ndarray:
    """Boolean decisions (N, L): ``probs > threshold`` per label (`thresholds`' convention)."""
    p = as_probs(probs)
    if isinstance(ts, ThresholdSet):
        thr = ts.as_array()
        if thr.size != p.shape[1]:
            raise ThresholdError(
                f"probs have {p.shape[1]} labels but the thresholds cover {thr.size} ({ts.vocab})."
            )
    else:
        thr = threshold_array(ts, [str(i) for i in range(p.shape[1])])
    return decide(p, thr)


def decide(p: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """``p > thr`` in the scores' own precision, as torch compares ``sigmoid(x) > thresh``.

    float32(0.2) > 0.2 in float64, so comparing float32 scores with float64 thresholds would
    disagree with fastai's decoding. Thresholds chosen here are float32-exact for float32
    scores, so the cast never moves them.
    """
    return p > thr.astype(p.dtype)[None, :]


def threshold_array(thresholds: Any, vocab: list[str]) -> np.ndarray:
    """One finite float64 threshold per label from a ThresholdSet (same vocab), a number or
    an array; refuses a ThresholdSet of another model rather than misaligning labels."""
    if isinstance(thresholds, ThresholdSet):
        if list(thresholds.vocab) != vocab:
            raise ThresholdError(
                f"ThresholdSet vocab {thresholds.vocab} differs from {vocab}: thresholds "
                "belong to the model that produced these scores."
            )
        return thresholds.as_array()
    thr = np.asarray(thresholds, dtype=np.float64)
    if thr.ndim == 0:
        thr = np.full(len(vocab), float(thr))
    if thr.shape != (len(vocab),):
        raise ThresholdError(
            f"thresholds must be a number or one per label ({len(vocab)}); got shape {thr.shape}."
        )
    if not np.isfinite(thr).all():
        raise ThresholdError(f"thresholds must be finite; got {thr.tolist()}.")
    return thr


def json_ready(obj: Any, digits: int | None = None) -> Any:
    """JSON-ready copy: numpy scalars/arrays -> Python, NaN/inf -> None, optional rounding."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [
            json_ready(v, digits) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)
        ]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if not math.isfinite(value):
            return None
        return round(value, digits) if digits is not None else value
    return obj
