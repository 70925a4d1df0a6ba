"""Score a set of threshold decisions against true labels: the figures reports and gates use.

Why threshold-free mAP next to thresholded F1: mAP judges the model's ranking (the thing
training improves), F1/accuracy judge the decisions users get; promotion and reports need
both, computed the same way on validation and test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multitag.training.score_groups import (
    ScoreGroups,
    ThresholdError,
    as_probs,
    as_targets,
    check_inputs,
    f1_of,
    group_scores,
    precision_of,
    recall_of,
)
from multitag.training.threshold_set import ThresholdSet, decide, json_ready, threshold_array


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one label, exactly as sklearn's ``average_precision_score``.

    AP = sum over distinct thresholds (descending) of (R_k - R_{k-1}) * P_k: a step function,
    no interpolation; tied scores enter together. NaN when there are no positives (AP is
    undefined there; `evaluate` leaves such labels out of mAP).
    """
    s = as_probs(np.asarray(scores).reshape(-1, 1), "scores")[:, 0]
    y = as_targets(np.asarray(targets).reshape(-1, 1), (s.size, 1))[:, 0]
    if s.size == 0:
        raise ThresholdError("average_precision needs at least one score.")
    return _ap_from_groups(group_scores(s, y))


def _ap_from_groups(g: ScoreGroups) -> float:
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
                out[name] = json_ready(getattr(self, name))
        out["per_label"] = {
            label: {k: json_ready(v) for k, v in vars(m).items()}
            for label, m in self.per_label.items()
        }
        return out


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
    p, y, labels = check_inputs(probs, targets, vocab)
    thr = threshold_array(thresholds, labels)
    pred = decide(p, thr)
    n, n_labels = p.shape
    tp = np.count_nonzero(pred & y, axis=0)
    n_pred = np.count_nonzero(pred, axis=0)
    fp = n_pred - tp
    n_pos = np.count_nonzero(y, axis=0)
    has_pos = n_pos > 0

    prec, rec, f1 = precision_of(tp, fp, n_pos), recall_of(tp, n_pos), f1_of(tp, fp, n_pos)
    cols = np.ascontiguousarray(p.T)
    ys = np.ascontiguousarray(y.T)
    ap = np.array([_ap_from_groups(group_scores(cols[j], ys[j])) for j in range(n_labels)])

    def macro(values: np.ndarray) -> float:
        return float(values[has_pos].mean()) if has_pos.any() else math.nan

    pred_none = ~np.asarray(pred.any(axis=1))  # numpy types any() as scalar | array
    true_none = ~np.asarray(y.any(axis=1))
    tp_all, fp_all, pos_all = int(tp.sum()), int(fp.sum()), int(n_pos.sum())
    return Evaluation(
        n_images=n,
        n_labels=n_labels,
        accuracy_multi=float(np.mean(pred == y)),
        exact_match=float(np.mean((pred == y).all(axis=1))),
        precision_micro=float(precision_of(tp_all, fp_all, pos_all)),
        recall_micro=float(recall_of(tp_all, pos_all)),
        f1_micro=float(f1_of(tp_all, fp_all, pos_all)),
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
