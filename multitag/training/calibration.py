"""Per-label Platt scaling of the model's scores, fitted on validation, and the ECE that judges it.

Why: a sigmoid output of 0.9 from a network trained to near-zero loss is rarely right 90% of
the time; downstream users reading `scores` as probabilities (to rank, to mix with other
evidence, to pick their own cut-off) need scores that are. Platt scaling maps a label's raw
probability p to ``sigmoid(slope * logit(p) + bias)`` with ``slope > 0`` (temperature scaling
is the case ``bias = 0``; the bias also fixes a label whose scores are shifted). It is
strictly increasing in p, so it ranks images exactly as the raw scores do (AP unchanged) and
a threshold t on raw scores is the threshold cal(t) on calibrated ones: tagging still decides
labels as ``raw > threshold`` and writes the calibrated scores next to them.

The fit: maximum likelihood (binary cross-entropy) per label by Newton's method, on Platt's
(1999) smoothed targets ``(n_pos + 1) / (n_pos + 2)`` and ``1 / (n_neg + 2)`` instead of 1
and 0, so a label the model separates perfectly on validation gets a finite slope rather
than one that drives every score to 0 or 1. The slope is bounded to [0.05, 20]. Labels with
fewer than `min_positives` positives (or negatives) on validation keep the identity
(recorded with the reason): too few events to fit two parameters honestly. Deterministic:
no random starts, a fixed iteration budget.

ECE (expected calibration error): 15 equal-width bins over [0, 1] (the last one includes
1.0); ECE = sum over bins of (share of scores in the bin) * |mean score - share positive|.
`ece` pools every (image, label) pair; `ece_per_label` does the same per label column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_VERSION = 1
METHOD = "platt"  # per label: sigmoid(slope * logit(p) + bias), slope > 0
N_BINS = 15
SLOPE_BOUNDS = (0.05, 20.0)
BIAS_BOUND = 30.0  # |bias| cap: beyond it every score of the label is ~0 or ~1 anyway
EPS = 1e-12  # probabilities are clipped to [EPS, 1 - EPS] before the logit (float64)
_MAX_ITER = 100


class CalibrationError(ValueError):
    """A calibration file or its inputs cannot be used (the message says which and why)."""


@dataclass(frozen=True)
class LabelFit:
    """One label's map and why it is what it is (`fitted=False`: identity, `reason` says why)."""

    slope: float
    bias: float
    fitted: bool
    reason: str
    n_pos: int
    n_neg: int


@dataclass(frozen=True)
class Calibration:
    """Per-label Platt parameters in vocab order; `to_json()` is a version's calibration.json."""

    vocab: tuple[str, ...]
    labels: Mapping[str, LabelFit]
    method: str = METHOD

    @property
    def slopes(self) -> np.ndarray:
        return np.array([self.labels[v].slope for v in self.vocab], dtype=np.float64)

    @property
    def biases(self) -> np.ndarray:
        return np.array([self.labels[v].bias for v in self.vocab], dtype=np.float64)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, L), float64, from raw sigmoid probabilities (N, L)."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(self.vocab):
            raise CalibrationError(
                f"scores of shape {p.shape} do not match the calibration's {len(self.vocab)} labels"
            )
        return self.apply_logits(logit(p))

    def apply_logits(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from raw logits (N, L): sigmoid(slope * z + bias)."""
        z = np.asarray(logits, dtype=np.float64)
        return sigmoid(z * self.slopes + self.biases)

    def map_thresholds(self, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
        """Thresholds on raw scores (vocab order) in the calibrated scale: raw > t <=> cal > cal(t)
        (up to rounding where calibrated scores saturate)."""
        t = np.asarray(thresholds, dtype=np.float64).reshape(1, -1)
        return self.apply(t)[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "formula": "score = sigmoid(slope * logit(clip(raw, eps, 1 - eps)) + bias)",
            "eps": EPS,
            "vocab": list(self.vocab),
            "per_label": {
                v: {
                    "slope": f.slope,
                    "bias": f.bias,
                    "fitted": f.fitted,
                    "reason": f.reason,
                    "n_pos": f.n_pos,
                    "n_neg": f.n_neg,
                }
                for v in self.vocab
                for f in (self.labels[v],)
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        """Rebuild from `to_json()`; refuses a file it cannot trust to mean the same map."""
        if data.get("format_version") != FORMAT_VERSION or data.get("method") != METHOD:
            raise CalibrationError(
                f"calibration.json format {data.get('format_version')!r} / method "
                f"{data.get('method')!r} is not {FORMAT_VERSION} / {METHOD!r}: written by "
                "another multitag version"
            )
        vocab = tuple(str(v) for v in data.get("vocab") or ())
        per_label = data.get("per_label") or {}
        if not vocab or sorted(per_label) != sorted(vocab):
            raise CalibrationError(
                f"calibration.json labels {sorted(per_label)} do not match its vocab {list(vocab)}"
            )
        labels = {}
        for v in vocab:
            f = per_label[v]
            slope, bias = float(f["slope"]), float(f["bias"])
            if not (math.isfinite(slope) and math.isfinite(bias) and slope > 0):
                raise CalibrationError(
                    f"calibration.json label {v!r}: slope {slope} / bias {bias} must be finite "
                    "with slope > 0 (a non-increasing map would reorder scores)"
                )
            labels[v] = LabelFit(
                slope, bias, bool(f["fitted"]), str(f.get("reason", "")),
                int(f.get("n_pos", 0)), int(f.get("n_neg", 0)),
            )  # fmt: skip
        return cls(vocab, labels)


def identity(vocab: Sequence[str], reason: str = "not fitted") -> Calibration:
    return Calibration(tuple(vocab), {v: LabelFit(1.0, 0.0, False, reason, 0, 0) for v in vocab})


def logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable in both tails (no overflow warning for large |z|)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def fit(
    probs: np.ndarray, targets: np.ndarray, vocab: Sequence[str], *, min_positives: int
) -> Calibration:
    """Per-label Platt scaling of validation probabilities (N, L) against targets (N, L)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets).astype(bool)
    if p.ndim != 2 or p.shape != y.shape or p.shape[1] != len(vocab):
        raise CalibrationError(
            f"probs {p.shape} and targets {y.shape} must both be (images, {len(vocab)} labels)"
        )
    if not np.isfinite(p).all():
        raise CalibrationError("validation probabilities contain NaN or inf; cannot calibrate")
    z = logit(p)
    labels = {}
    for j, label in enumerate(vocab):
        n_pos = int(y[:, j].sum())
        n_neg = len(y) - n_pos
        if min(n_pos, n_neg) < min_positives:
            reason = (
                f"identity: {n_pos} positives and {n_neg} negatives on validation "
                f"(fewer than min_positives={min_positives} of one class)"
            )
            labels[label] = LabelFit(1.0, 0.0, False, reason, n_pos, n_neg)
            continue
        slope, bias = _fit_label(z[:, j], y[:, j], n_pos, n_neg)
        labels[label] = LabelFit(slope, bias, True, "fitted", n_pos, n_neg)
    return Calibration(tuple(vocab), labels)


def _fit_label(z: np.ndarray, y: np.ndarray, n_pos: int, n_neg: int) -> tuple[float, float]:
    """(slope, bias) minimising BCE on Platt's targets; Newton with backtracking, slope boxed.

    The loss is convex in (slope, bias), so when the unconstrained optimum's slope falls
    outside the box the constrained one lies on the violated edge: the bias is then refitted
    with the slope fixed there.
    """
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    w = _newton(z, t, np.array([1.0, 0.0]), free_slope=True)
    lo, hi = SLOPE_BOUNDS
    if not lo <= w[0] <= hi:
        w = _newton(z, t, np.array([min(max(w[0], lo), hi), 0.0]), free_slope=False)
    return float(w[0]), float(np.clip(w[1], -BIAS_BOUND, BIAS_BOUND))


def _loss(z: np.ndarray, t: np.ndarray, w: np.ndarray) -> float:
    s = w[0] * z + w[1]
    # BCE with logits: log(1 + e^s) - t * s, stable for large |s|.
    return float(np.mean(np.logaddexp(0.0, s) - t * s))


def _newton(z: np.ndarray, t: np.ndarray, w: np.ndarray, *, free_slope: bool) -> np.ndarray:
    """Damped Newton (Levenberg): a step that does not lower the loss is retried with more
    damping, down to small gradient steps, so saturated scores (a flat Hessian) still move."""
    loss = _loss(z, t, w)
    for _ in range(_MAX_ITER):
        q = sigmoid(w[0] * z + w[1])
        r, s = q - t, q * (1.0 - q)
        grad = np.array([np.mean(r * z) if free_slope else 0.0, np.mean(r)])
        hess = np.array([[np.mean(s * z * z), np.mean(s * z)], [np.mean(s * z), np.mean(s)]])
        if not free_slope:
            hess = np.array([[1.0, 0.0], [0.0, hess[1, 1]]])
        if float(np.abs(grad).max()) < 1e-12:
            break
        lam = 1e-9
        while lam < 1e9:
            cand = w - np.linalg.solve(hess + lam * np.eye(2), grad)
            new = _loss(z, t, cand)
            if new < loss:
                break
            lam *= 10
        else:
            break  # no step lowers the loss: at the optimum up to rounding
        w, done = cand, loss - new < 1e-15
        loss = new
        if done:
            break
    return w


# ------------------------------------------------------------------------------ ECE


def reliability(probs: np.ndarray, targets: np.ndarray, n_bins: int = N_BINS) -> dict[str, Any]:
    """Per bin (equal width over [0, 1], last bin closed): count, mean score, share positive."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(targets).astype(np.float64).ravel()
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=n_bins) / count
        freq = np.bincount(idx, weights=y, minlength=n_bins) / count
    return {"count": count, "confidence": conf, "frequency": freq}


def ece(probs: np.ndarray, targets: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE over every (image, label) pair pooled; NaN for no scores."""
    bins = reliability(probs, targets, n_bins)
    total = int(bins["count"].sum())
    if total == 0:
        return float("nan")
    gap = np.abs(bins["confidence"] - bins["frequency"])
    return float(np.nansum(bins["count"] * gap) / total)


def ece_per_label(
    probs: np.ndarray, targets: np.ndarray, vocab: Sequence[str], n_bins: int = N_BINS
) -> dict[str, float]:
    p, y = np.asarray(probs), np.asarray(targets)
    return {v: ece(p[:, j], y[:, j], n_bins) for j, v in enumerate(vocab)}


def ece_before_after(cal: Calibration, probs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """ECE of the raw and the calibrated scores on one split, pooled and per label."""
    after = cal.apply(probs)
    return {
        "before": ece(probs, targets),
        "after": ece(after, targets),
        "n_images": int(np.asarray(probs).shape[0]),
        "reliability": {
            "before": _bins_json(reliability(probs, targets)),
            "after": _bins_json(reliability(after, targets)),
        },
        "per_label": {
            v: {"before": b, "after": a}
            for (v, b), a in zip(
                ece_per_label(probs, targets, cal.vocab).items(),
                ece_per_label(after, targets, cal.vocab).values(),
                strict=True,
            )
        },
    }


def _bins_json(bins: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
    """Reliability bins for JSON: empty bins' undefined means are None, not NaN."""
    return {
        k: [
            None if not math.isfinite(float(x)) else (int(x) if k == "count" else float(x))
            for x in v
        ]
        for k, v in bins.items()
    }


def summary(
    cal: Calibration,
    thresholds: Sequence[float] | np.ndarray,
    ece_by_split: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """metrics.json's "calibration": method, per-label parameters with the training thresholds
    in both scales, and ECE before/after per split (validation is in-sample; test is not)."""
    score_thr = cal.map_thresholds(thresholds)
    return {
        "method": cal.method,
        "file": "calibration.json",
        "ece_bins": f"{N_BINS} equal-width bins over [0, 1], every (image, label) pair pooled",
        "per_label": {
            v: {
                "slope": cal.labels[v].slope,
                "bias": cal.labels[v].bias,
                "fitted": cal.labels[v].fitted,
                "reason": cal.labels[v].reason,
                "threshold": float(t),
                "score_threshold": float(s),
            }
            for v, t, s in zip(cal.vocab, thresholds, score_thr, strict=True)
        },
        "ece": {split: dict(v) for split, v in ece_by_split.items()},
    }


def brief(cal_summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What `multitag models show` prints: method, labels fitted, ECE before/after per split
    (None: a version registered without calibration; its scores are raw)."""
    if not isinstance(cal_summary, Mapping):
        return None
    per_label = cal_summary.get("per_label") or {}
    ece_ = cal_summary.get("ece") or {}
    return {
        "method": cal_summary.get("method"),
        "labels_fitted": sum(bool(p.get("fitted")) for p in per_label.values()),
        "labels": len(per_label),
        "ece": {
            split: {k: v.get(k) for k in ("before", "after", "n_images")}
            for split, v in ece_.items()
            if isinstance(v, Mapping)
        },
    }
