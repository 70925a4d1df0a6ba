"""Evaluate multi-label predictions and choose the per-label decision thresholds.

A model emits one sigmoid score per label; a threshold per label turns scores into labels.
Everything here works on saved validation predictions (numpy arrays, no torch), so the
thresholds can be chosen, reported and re-checked without the model.

Conventions, used by every function in this module:
- A label is predicted when ``score > threshold`` (strictly greater, compared in the scores'
  dtype as torch does): fastai's ``accuracy_multi`` and its ``loss_func.thresh`` decoding
  use ``>``, so exporting our thresholds into the learner (a float32 tensor, one per label)
  makes fastai's ``predict`` agree with ``apply_thresholds``.
- Thresholds are probabilities in [0, 1]. Chosen ones sit half-way between two adjacent
  distinct validation scores (never on a score), so ``>`` and ``>=`` make the same validation
  decisions and the boundary has room on both sides on new data. The exceptions are the
  ends: "predict nothing" above a score of 1.0 is the threshold 1.0, and a score of exactly
  0.0 can never be predicted. Stored thresholds are float32-representable whenever that
  keeps them strictly between the two scores, so a float32 comparison (torch) agrees too.
- Sweeps visit every distinct score, exactly, ties included: tied scores always fall on the
  same side of a threshold. One sort per label (and one over all scores for the global
  sweep) plus cumulative sums: O(N L log N).
- A ratio with a zero denominator is undefined, not zero (NaN here, ``None`` in dicts),
  except precision when a label with positives was never predicted: that is a failure on
  real positives and counts as 0, as in sklearn's ``zero_division=0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from multitag.config import ThresholdParams

FORMAT_VERSION = 1
CONVENTION = "predict a label when its score > threshold"
CURVE_POINTS = 101  # thresholds 0.00, 0.01, ..., 1.00 in the stored curves
SHRINK_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # fraction of the way from global to own
RESAMPLE_BINS = 1024  # the shrunk policy's resampling groups scores into at most this many bins
_TOL = 1e-12  # float slack when comparing a computed precision/recall with its target


class ThresholdError(ValueError):
    """Inputs that thresholds cannot be chosen or evaluated on (the message says which)."""


# ----------------------------------------------------------------------------- input checks


def _as_probs(probs: Any, name: str = "probs") -> np.ndarray:
    """float32 stays float32 (fastai's output; enables the fast sort), anything else float64."""
    p = np.asarray(probs)
    if p.dtype != np.float32:
        p = p.astype(np.float64)
    if p.ndim != 2:
        raise ThresholdError(f"{name} must be 2-D (images, labels); got shape {p.shape}.")
    bad = ~np.isfinite(p) | (p < 0) | (p > 1)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ThresholdError(
            f"{name}[{row}, {col}] = {p[row, col]!r}: scores must be sigmoid probabilities in "
            f"[0, 1] ({int(bad.sum())} bad values). Pass probabilities, not logits."
        )
    return p


def _as_targets(targets: Any, shape: tuple[int, ...]) -> np.ndarray:
    t = np.asarray(targets)
    if t.shape != shape:
        raise ThresholdError(f"targets have shape {t.shape} but probs have shape {shape}.")
    if t.dtype == np.bool_:
        return t
    bad = (t != 0) & (t != 1)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ThresholdError(
            f"targets[{row}, {col}] = {t[row, col]!r}: targets must be boolean or 0/1 "
            "(one-hot multi-label encoding)."
        )
    return t.astype(bool)


def _as_vocab(vocab: Sequence[str], n_labels: int) -> list[str]:
    labels = [str(v) for v in vocab]
    if len(labels) != n_labels:
        raise ThresholdError(
            f"vocab has {len(labels)} labels but the arrays have {n_labels} columns."
        )
    seen: set[str] = set()
    for i, label in enumerate(labels):
        if not label:
            raise ThresholdError(f"vocab[{i}] is empty: every label needs a name.")
        if label in seen:
            raise ThresholdError(f"vocab has {label!r} twice: labels must be unique.")
        seen.add(label)
    return labels


def _check(
    probs: Any, targets: Any, vocab: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    p = _as_probs(probs)
    if p.shape[0] == 0:
        raise ThresholdError("probs has no rows: nothing to evaluate or choose thresholds on.")
    return p, _as_targets(targets, p.shape), _as_vocab(vocab, p.shape[1])


# ------------------------------------------------------------------ sorted score groups


@dataclass(frozen=True)
class _Groups:
    """Distinct scores, descending, with how many positives/negatives share each score.

    Everything downstream works on these counts: "predict the top k groups" is the k-th cut,
    cut 0 predicts nothing, cut len(score) predicts everything.
    """

    hi: np.ndarray  # highest score in each group (float64, descending)
    lo: np.ndarray  # lowest score in each group (== hi for exact groups; bins span a range)
    pos: np.ndarray  # int64 positives per group
    neg: np.ndarray  # int64 negatives per group

    @property
    def n_pos(self) -> int:
        return int(self.pos.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg.sum())

    @cached_property
    def _cuts(self) -> tuple[np.ndarray, np.ndarray]:
        return np.pad(np.cumsum(self.pos), (1, 0)), np.pad(np.cumsum(self.neg), (1, 0))

    def cut_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """True and false positives at every cut (length n_groups + 1), as ranked (for AP)."""
        return self._cuts

    @cached_property
    def decision_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Like `cut_counts`, but what each cut's threshold really predicts.

        Thresholds stay in [0, 1] and the test is `>`, so a score of exactly 0 is never
        predicted: with a bottom group at 0 the last cut (threshold 0) predicts what the
        one before it does.
        """
        tp, fp = self._cuts
        if self.lo[-1] <= 0.0:
            tp, fp = tp.copy(), fp.copy()
            tp[-1], fp[-1] = tp[-2], fp[-2]
        return tp, fp

    def cut_thresholds(self, k: Any = None) -> np.ndarray:
        """The threshold of cut(s) k (default all): half-way between the groups either side.

        The ends are 1.0 (predict nothing, even a score of 1.0) and half-way to 0.0.
        """
        above = np.concatenate(([1.0], self.lo))
        below = np.concatenate((self.hi, [0.0]))
        if k is not None:
            above, below = above[k], below[k]
        return _between(np.asarray(below), np.asarray(above))

    def count_above(self, thresholds: np.ndarray) -> np.ndarray:
        """Cut index for arbitrary thresholds: how many groups lie wholly above each."""
        return np.searchsorted(-self.lo, -np.asarray(thresholds, dtype=np.float64), side="left")


def _between(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A value strictly between lo and hi, float32-representable when possible, else lo.

    `lo` itself is the last resort (adjacent float64 scores, or lo == hi at the ends of
    [0, 1]): under the `>` convention it still makes the intended decisions.
    """
    mid = lo + (hi - lo) / 2.0
    mid32 = mid.astype(np.float32).astype(np.float64)
    ok32 = (mid32 > lo) & (mid32 < hi)
    ok64 = (mid > lo) & (mid < hi)
    return np.where(ok32, mid32, np.where(ok64, mid, lo))


def _sort_desc(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores in descending order with their targets (order inside a tie is irrelevant).

    For float32 scores, sorting one uint64 key (score bits << 1 | target) is ~2x faster than
    an argsort plus gathers: non-negative IEEE floats order like their bit patterns.
    """
    if scores.dtype == np.float32:
        bits = (scores + np.float32(0.0)).view(np.uint32).astype(np.uint64)  # -0.0 -> +0.0
        key = np.sort((bits << np.uint64(1)) | targets.astype(np.uint64))[::-1]
        s = (key >> np.uint64(1)).astype(np.uint32).view(np.float32)
        return s, (key & np.uint64(1)).astype(bool)
    order = np.argsort(scores, kind="stable")[::-1]
    return scores[order], targets[order]


def _groups(scores: np.ndarray, targets: np.ndarray) -> _Groups:
    s, y = _sort_desc(scores, targets)
    ends = np.flatnonzero(s[1:] != s[:-1])
    ends = np.append(ends, s.size - 1)
    cum_pos = np.cumsum(y, dtype=np.int64)[ends]
    pos = np.diff(cum_pos, prepend=0)
    neg = np.diff(ends, prepend=-1) - pos
    score = s[ends].astype(np.float64)
    return _Groups(hi=score, lo=score, pos=pos, neg=neg)


def _bin(g: _Groups, max_bins: int) -> _Groups:
    """Merge adjacent groups into about `max_bins` bins of equal row count (never splits a tie)."""
    if g.hi.size <= max_bins:
        return g
    size = g.pos + g.neg
    before = np.cumsum(size) - size
    bin_id = (before * max_bins) // int(size.sum())
    starts = np.flatnonzero(np.diff(bin_id, prepend=-1))
    ends = np.append(starts[1:], g.hi.size) - 1
    return _Groups(
        hi=g.hi[starts],
        lo=g.lo[ends],
        pos=np.add.reduceat(g.pos, starts),
        neg=np.add.reduceat(g.neg, starts),
    )


# -------------------------------------------------------------- metrics on count arrays


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, np.float64))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _precision(tp: Any, fp: Any, n_pos: Any) -> np.ndarray:
    prec = _div(tp, np.add(tp, fp))
    nothing_predicted = np.broadcast_to(np.add(tp, fp) == 0, prec.shape)
    had_positives = np.broadcast_to(np.asarray(n_pos) > 0, prec.shape)
    return np.where(nothing_predicted & had_positives, 0.0, prec)


def _recall(tp: Any, n_pos: Any) -> np.ndarray:
    return _div(tp, n_pos)


def _f1(tp: Any, fp: Any, n_pos: Any) -> np.ndarray:
    # 2TP / (2TP + FP + FN) with FN = n_pos - TP.
    return _div(np.multiply(tp, 2), np.add(np.add(tp, fp), n_pos))


def _accuracy(tp: Any, fp: Any, n_pos: Any, n_neg: Any) -> np.ndarray:
    return _div(np.add(tp, np.subtract(n_neg, fp)), np.add(n_pos, n_neg))


def _first_argmax(score: np.ndarray) -> np.ndarray:
    """Argmax over the last axis, NaN as worst; ties go to the first (highest threshold)."""
    return np.argmax(np.where(np.isnan(score), -np.inf, score), axis=-1)


def _last_argmax(score: np.ndarray) -> np.ndarray:
    """Argmax over the last axis, NaN as worst; ties go to the last (lowest threshold)."""
    flipped = np.where(np.isnan(score), -np.inf, score)[..., ::-1]
    return score.shape[-1] - 1 - np.argmax(flipped, axis=-1)


def _select_cut(
    tp: np.ndarray, fp: np.ndarray, n_pos: Any, n_neg: Any, objective: str, params: ThresholdParams
) -> tuple[np.ndarray, np.ndarray]:
    """Index of the chosen cut along the last axis, and whether its target was met.

    f1 / accuracy: the best value, ties to the highest threshold (fewest predictions).
    recall_at_precision: the lowest threshold whose precision >= target; if none reaches it,
    the most precise cut (ties to the lowest threshold) and met=False.
    precision_at_recall: the most precise cut among those with recall >= target (ties to the
    lowest threshold); recall 1 is always reachable, so met is False only without positives.
    """
    if objective == "f1":
        score = _f1(tp, fp, n_pos)
        return _first_argmax(score), ~np.isnan(score).all(axis=-1)
    if objective == "accuracy":
        score = _accuracy(tp, fp, n_pos, n_neg)
        return _first_argmax(score), ~np.isnan(score).all(axis=-1)
    if objective == "recall_at_precision":
        prec = _precision(tp, fp, n_pos)
        predicts = np.broadcast_to(np.add(tp, fp) > 0, prec.shape)
        met = predicts & (prec >= params.precision_target - _TOL)
        any_met = met.any(axis=-1)
        last_met = met.shape[-1] - 1 - np.argmax(met[..., ::-1], axis=-1)
        return np.where(any_met, last_met, _last_argmax(prec)), any_met
    if objective == "precision_at_recall":
        rec = _recall(tp, np.broadcast_to(n_pos, np.shape(tp)))
        met = rec >= params.recall_target - _TOL
        prec = np.where(met, _precision(tp, fp, n_pos), np.nan)
        return _last_argmax(prec), met.any(axis=-1)
    raise ThresholdError(f"unknown objective {objective!r}")


def _holdout_score(
    tp: np.ndarray, fp: np.ndarray, n_pos: Any, n_neg: Any, objective: str, params: ThresholdParams
) -> np.ndarray:
    """One number per decision for comparing thresholds on held-out rows (higher is better).

    Constraint objectives score lexicographically: a decision meeting the constraint scores
    its free metric in [0, 1]; one missing it scores (constrained metric - 1) < 0, so meeting
    the target always wins and, failing that, getting closer does.
    """
    if objective == "f1":
        return _f1(tp, fp, n_pos)
    if objective == "accuracy":
        return _accuracy(tp, fp, n_pos, n_neg)
    prec = _precision(tp, fp, n_pos)
    rec = _recall(tp, np.broadcast_to(n_pos, np.shape(tp)))
    if objective == "recall_at_precision":
        empty = np.broadcast_to(np.add(tp, fp) == 0, prec.shape)
        met = empty | (prec >= params.precision_target - _TOL)
        return np.where(np.isnan(rec), np.nan, np.where(met, rec, prec - 1.0))
    if objective == "precision_at_recall":
        met = rec >= params.recall_target - _TOL
        return np.where(np.isnan(rec), np.nan, np.where(met, prec, rec - 1.0))
    raise ThresholdError(f"unknown objective {objective!r}")


# ------------------------------------------------------------------------- evaluation


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one label, exactly as sklearn's ``average_precision_score``.

    AP = sum over distinct thresholds (descending) of (R_k - R_{k-1}) * P_k: a step function,
    no interpolation; tied scores enter together. NaN when there are no positives (AP is
    undefined there; `evaluate` leaves such labels out of mAP).
    """
    s = _as_probs(np.asarray(scores).reshape(-1, 1), "scores")[:, 0]
    y = _as_targets(np.asarray(targets).reshape(-1, 1), (s.size, 1))[:, 0]
    if s.size == 0:
        raise ThresholdError("average_precision needs at least one score.")
    return _ap_from_groups(_groups(s, y))


def _ap_from_groups(g: _Groups) -> float:
    n_pos = g.n_pos
    if n_pos == 0:
        return math.nan
    tp, fp = g.cut_counts()
    prec = tp[1:] / (tp[1:] + fp[1:])
    return float(np.sum(g.pos / n_pos * prec))


@dataclass(frozen=True)
class LabelMetrics:
    """One label's figures at its threshold; None-able ratios are NaN when undefined."""

    threshold: float
    support: int  # positives in the targets
    n_predicted: int
    ap: float  # NaN without positives
    precision: float  # 0 if never predicted while positives exist; NaN if neither
    recall: float  # NaN without positives
    f1: float  # NaN only when there are no positives and nothing was predicted


@dataclass(frozen=True)
class Evaluation:
    """Figures of one set of decisions; `to_dict()` is the JSON form (NaN -> None).

    Macro averages and mAP run over the labels that have at least one positive: a label the
    targets never contain cannot be recalled, and its AP is undefined. How many labels that
    left out is `n_labels_without_positives`. "None" figures treat an image with no
    predicted label as an answer: `none_rate` is how often it is given, `none_correct_rate`
    how often it is right when given, `none_recall` how many truly empty images get it.
    """

    n_images: int
    n_labels: int
    accuracy_multi: float
    exact_match: float
    precision_micro: float
    recall_micro: float
    f1_micro: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    mAP: float
    n_labels_without_positives: int
    none_rate: float
    true_none_rate: float
    none_correct_rate: float
    none_recall: float
    per_label: dict[str, LabelMetrics] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            if name != "per_label":
                out[name] = _plain(getattr(self, name))
        out["per_label"] = {
            label: {k: _plain(v) for k, v in vars(m).items()} for label, m in self.per_label.items()
        }
        return out


def _threshold_array(thresholds: Any, vocab: list[str]) -> np.ndarray:
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


def evaluate(
    probs: np.ndarray,
    targets: np.ndarray,
    thresholds: float | np.ndarray | ThresholdSet,
    vocab: Sequence[str],
) -> Evaluation:
    """Score decisions ``probs > thresholds`` (as `apply_thresholds`) against `targets`.

    accuracy_multi is fastai's: the fraction of all image-label decisions that are right.
    mAP is threshold-free: the mean of per-label `average_precision`.
    """
    p, y, labels = _check(probs, targets, vocab)
    thr = _threshold_array(thresholds, labels)
    pred = _decide(p, thr)
    n, n_labels = p.shape
    tp = np.count_nonzero(pred & y, axis=0)
    n_pred = np.count_nonzero(pred, axis=0)
    fp = n_pred - tp
    n_pos = np.count_nonzero(y, axis=0)
    has_pos = n_pos > 0

    prec, rec, f1 = _precision(tp, fp, n_pos), _recall(tp, n_pos), _f1(tp, fp, n_pos)
    cols = np.ascontiguousarray(p.T)
    ys = np.ascontiguousarray(y.T)
    ap = np.array([_ap_from_groups(_groups(cols[j], ys[j])) for j in range(n_labels)])

    def macro(values: np.ndarray) -> float:
        return float(values[has_pos].mean()) if has_pos.any() else math.nan

    pred_none = ~pred.any(axis=1)
    true_none = ~y.any(axis=1)
    tp_all, fp_all, pos_all = int(tp.sum()), int(fp.sum()), int(n_pos.sum())
    return Evaluation(
        n_images=n,
        n_labels=n_labels,
        accuracy_multi=float(np.mean(pred == y)),
        exact_match=float(np.mean((pred == y).all(axis=1))),
        precision_micro=float(_precision(tp_all, fp_all, pos_all)),
        recall_micro=float(_recall(tp_all, pos_all)),
        f1_micro=float(_f1(tp_all, fp_all, pos_all)),
        precision_macro=macro(prec),
        recall_macro=macro(rec),
        f1_macro=macro(f1),
        mAP=macro(ap),
        n_labels_without_positives=int((~has_pos).sum()),
        none_rate=float(pred_none.mean()),
        true_none_rate=float(true_none.mean()),
        none_correct_rate=float(true_none[pred_none].mean()) if pred_none.any() else math.nan,
        none_recall=float(pred_none[true_none].mean()) if true_none.any() else math.nan,
        per_label={
            label: LabelMetrics(
                threshold=float(thr[j]),
                support=int(n_pos[j]),
                n_predicted=int(n_pred[j]),
                ap=float(ap[j]),
                precision=float(prec[j]),
                recall=float(rec[j]),
                f1=float(f1[j]),
            )
            for j, label in enumerate(labels)
        },
    )


# ----------------------------------------------------------------- threshold selection


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
        return _plain(
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
    """Boolean decisions (N, L): ``probs > threshold`` per label (the module's convention)."""
    p = _as_probs(probs)
    if isinstance(ts, ThresholdSet):
        thr = ts.as_array()
        if thr.size != p.shape[1]:
            raise ThresholdError(
                f"probs have {p.shape[1]} labels but the thresholds cover {thr.size} ({ts.vocab})."
            )
    else:
        thr = _threshold_array(ts, [str(i) for i in range(p.shape[1])])
    return _decide(p, thr)


def _decide(p: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """``p > thr`` in the scores' own precision, as torch compares ``sigmoid(x) > thresh``.

    float32(0.2) > 0.2 in float64, so comparing float32 scores with float64 thresholds would
    disagree with fastai's decoding. Thresholds chosen here are float32-exact for float32
    scores, so the cast never moves them.
    """
    return p > thr.astype(p.dtype)[None, :]


def select_thresholds(
    probs: np.ndarray,
    targets: np.ndarray,
    vocab: Sequence[str],
    params: ThresholdParams | None = None,
) -> ThresholdSet:
    """Choose one threshold per label on validation predictions.

    1. Global sweep (fastbook): every distinct score over all labels is a candidate; the one
       threshold maximising accuracy_multi and the one maximising micro-F1 are recorded, and
       `params.objective` picks the global value (its micro version for the constraint
       objectives).
    2. Each label's own optimum for `params.objective` over its distinct scores.
    3. The policy sets the final value. `global`: the global value everywhere. `per_label`:
       the own optimum, except labels with fewer than `min_positives` validation positives,
       which take the global value. `shrunk` (default): same fallback; every other label gets
       ``global + w * (own - global)`` with w in {0, .25, .5, .75, 1} chosen by resampling:
       `n_resamples` times the validation rows are split at random into halves (seeded);
       on each half the label's own optimum is re-selected and, shrunk by each w, scored on
       the other half (F1 / accuracy / the constraint score of `_holdout_score`). The w with
       the best mean held-out score wins, ties to the smaller w, so a label keeps its own
       threshold only where that beats the global value on rows it was not chosen on. The
       global value is not re-selected per half: pooled over all labels it is far steadier.
       For speed the halves are scored on at most RESAMPLE_BINS equal-count score bins
       (exact while a label has that few distinct scores).
    Why not per-label optima alone: on small validation sets they overfit (on this project
    they beat the global 0.4 on validation and lost to it on test).
    """
    params = params or ThresholdParams()
    p, y, labels = _check(probs, targets, vocab)
    n, n_labels = p.shape
    if not y.any():
        raise ThresholdError(
            "targets contain no positive label at all: thresholds cannot be chosen. Check that "
            "the validation split has labelled images."
        )

    g_all = _groups(p.ravel(), y.ravel())
    g_tp, g_fp = g_all.decision_counts
    g_pos, g_neg = g_all.n_pos, g_all.n_neg
    k_acc, _ = _select_cut(g_tp, g_fp, g_pos, g_neg, "accuracy", params)
    k_f1, _ = _select_cut(g_tp, g_fp, g_pos, g_neg, "f1", params)
    k_obj, g_met = _select_cut(g_tp, g_fp, g_pos, g_neg, params.objective, params)
    global_t = float(g_all.cut_thresholds(k_obj))
    global_sweep = {
        "accuracy_multi": {
            "threshold": float(g_all.cut_thresholds(k_acc)),
            "value": float(_accuracy(g_tp[k_acc], g_fp[k_acc], g_pos, g_neg)),
        },
        "f1_micro": {
            "threshold": float(g_all.cut_thresholds(k_f1)),
            "value": float(_f1(g_tp[k_f1], g_fp[k_f1], g_pos)),
        },
        "objective": {"threshold": global_t, "target_met": bool(g_met)},
    }

    cols, ys = np.ascontiguousarray(p.T), np.ascontiguousarray(y.T)
    groups = [_groups(cols[j], ys[j]) for j in range(n_labels)]
    own = np.empty(n_labels)
    own_met = np.empty(n_labels, dtype=bool)
    for j, g in enumerate(groups):
        tp, fp = g.decision_counts
        k, met = _select_cut(tp, fp, g.n_pos, g.n_neg, params.objective, params)
        own[j], own_met[j] = g.cut_thresholds(k), met
    support = np.array([g.n_pos for g in groups])
    eligible = support >= params.min_positives

    if params.policy == "global":
        weights = np.zeros(n_labels)
    elif params.policy == "per_label":
        weights = eligible.astype(np.float64)
    elif params.policy == "shrunk":
        weights = _resampled_weights(groups, eligible, global_t, params)
    else:
        raise ThresholdError(f"unknown policy {params.policy!r}")
    final = _interpolate(global_t, own, weights)

    details = {}
    for j, label in enumerate(labels):
        if not eligible[j] and params.policy != "global":
            source = f"global (support {support[j]} < min_positives {params.min_positives})"
        else:
            source = {0.0: "global", 1.0: "own"}.get(float(weights[j]), "shrunk")
        entry: dict[str, Any] = {
            "own": float(own[j]),
            "weight": float(weights[j]),
            "source": source,
        }
        if params.objective in ("recall_at_precision", "precision_at_recall"):
            entry["target_met"] = bool(own_met[j])
        details[label] = entry

    return ThresholdSet(
        vocab=labels,
        objective=params.objective,
        policy=params.policy,
        global_threshold=global_t,
        per_label={label: float(final[j]) for j, label in enumerate(labels)},
        support={label: int(support[j]) for j, label in enumerate(labels)},
        curves=_curves(g_all, groups, labels),
        global_sweep=global_sweep,
        label_details=details,
        params=params.model_dump(),
        n_images=n,
    )


def _interpolate(global_t: float, own: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """global + w (own - global), exact at w in {0, 1}, rounded to float32 in between.

    Rounding to the nearest float32 (kept only if it stays between the two ends) makes
    torch's float32 comparison agree with ours.
    """
    mixed = global_t + weights * (own - global_t)
    mixed32 = mixed.astype(np.float32).astype(np.float64)
    inside = (mixed32 >= np.minimum(own, global_t)) & (mixed32 <= np.maximum(own, global_t))
    mixed = np.where(inside, mixed32, mixed)
    return np.where(weights == 0, global_t, np.where(weights == 1, own, mixed))


def _resampled_weights(
    groups: list[_Groups], eligible: np.ndarray, global_t: float, params: ThresholdParams
) -> np.ndarray:
    """Per label, the shrink weight with the best mean held-out score over random half-splits.

    Each row goes to half A with probability 1/2, independently, so the A-count of every
    score bin is Binomial(count, 1/2): the split is drawn on bin counts, exactly, without
    touching rows. All labels and resamples are handled as one (R, L, bins) array.
    """
    weights = np.zeros(len(groups))
    idx = np.flatnonzero(eligible)
    if idx.size == 0:
        return weights
    binned = [_bin(groups[j], RESAMPLE_BINS) for j in idx]
    n_bins = max(b.hi.size for b in binned)
    n_lab = idx.size
    pos = np.zeros((n_lab, n_bins), dtype=np.int64)
    neg = np.zeros((n_lab, n_bins), dtype=np.int64)
    lo = np.full((n_lab, n_bins), -np.inf)
    thr = np.empty((n_lab, n_bins + 1))
    for i, b in enumerate(binned):
        m = b.hi.size
        pos[i, :m], neg[i, :m], lo[i, :m] = b.pos, b.neg, b.lo
        cut_thr = b.cut_thresholds()
        thr[i, : m + 1], thr[i, m + 1 :] = cut_thr, cut_thr[-1]

    rng = np.random.default_rng(params.seed)
    size = (params.n_resamples, n_lab, n_bins)
    a_pos, a_neg = rng.binomial(pos, 0.5, size=size), rng.binomial(neg, 0.5, size=size)
    halves = ((a_pos, a_neg), (pos - a_pos, neg - a_neg))
    reachable = lo > 0.0  # scores of exactly 0 are never predicted (see decision_counts)
    cums = [_cum_cuts(hp * reachable, hn * reachable) for hp, hn in halves]
    totals = [(hp.sum(axis=-1), hn.sum(axis=-1)) for hp, hn in halves]
    w = np.asarray(SHRINK_WEIGHTS)[:, None, None]
    scores = []
    for train, test in ((0, 1), (1, 0)):
        tp, fp = cums[train]
        n_pos, n_neg = (t[..., None] for t in totals[train])
        k, _ = _select_cut(tp, fp, n_pos, n_neg, params.objective, params)
        own = np.take_along_axis(thr[None], k[..., None], axis=-1)[..., 0]  # (R, L)
        t_w = global_t + w * (own[None] - global_t)  # (W, R, L)
        k_test = np.empty(t_w.shape, dtype=np.intp)
        for i in range(n_lab):  # bins wholly above each threshold (lo is descending)
            k_test[..., i] = np.searchsorted(-lo[i], -t_w[..., i], side="left")
        tp_t, fp_t = cums[test]
        tp_w = np.take_along_axis(tp_t[None], k_test[..., None], axis=-1)[..., 0]
        fp_w = np.take_along_axis(fp_t[None], k_test[..., None], axis=-1)[..., 0]
        n_pos, n_neg = (t[None] for t in totals[test])
        scores.append(_holdout_score(tp_w, fp_w, n_pos, n_neg, params.objective, params))
    weights[idx] = np.asarray(SHRINK_WEIGHTS)[_choose_weight(np.stack(scores))]
    return weights


def _choose_weight(scores: np.ndarray) -> np.ndarray:
    """Index of the best mean held-out score per label; ties (and no data) go to w = 0.

    scores: (2 directions, W, R, L); NaN where a half had nothing to score (no positives).
    """
    valid = ~np.isnan(scores)
    total = np.where(valid, scores, 0.0).sum(axis=(0, 2))  # (W, L)
    mean = _div(total, valid.sum(axis=(0, 2)))
    return _first_argmax(mean.T)


def _cum_cuts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pad = [(0, 0)] * (pos.ndim - 1) + [(1, 0)]
    return np.pad(np.cumsum(pos, axis=-1), pad), np.pad(np.cumsum(neg, axis=-1), pad)


def _curves(g_all: _Groups, groups: list[_Groups], labels: list[str]) -> dict[str, Any]:
    """Precision/recall/F1/accuracy at thresholds 0, 0.01, ..., 1 (for reports and plots)."""
    grid = np.round(np.linspace(0.0, 1.0, CURVE_POINTS), 2)

    def at_grid(g: _Groups) -> tuple[np.ndarray, np.ndarray, int, int]:
        tp, fp = g.decision_counts
        k = g.count_above(grid)
        return tp[k], fp[k], g.n_pos, g.n_neg

    tp, fp, n_pos, n_neg = at_grid(g_all)
    out: dict[str, Any] = {
        "thresholds": grid,
        "global": {
            "accuracy_multi": _accuracy(tp, fp, n_pos, n_neg),
            "precision_micro": _precision(tp, fp, n_pos),
            "recall_micro": _recall(tp, np.full(grid.shape, n_pos)),
            "f1_micro": _f1(tp, fp, n_pos),
        },
        "per_label": {},
    }
    for label, g in zip(labels, groups, strict=True):
        tp, fp, n_pos, n_neg = at_grid(g)
        out["per_label"][label] = {
            "precision": _precision(tp, fp, n_pos),
            "recall": _recall(tp, np.full(grid.shape, n_pos)),
            "f1": _f1(tp, fp, n_pos),
            "accuracy": _accuracy(tp, fp, n_pos, n_neg),
        }
    return _plain(out, digits=6)


def _plain(obj: Any, digits: int | None = None) -> Any:
    """JSON-ready copy: numpy scalars/arrays -> Python, NaN/inf -> None, optional rounding."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v, digits) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
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
