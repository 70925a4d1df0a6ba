"""Choose one threshold per label on validation predictions: global sweep, own optima, policy.

Why a policy on top of per-label optima: on small validation sets a label's own optimum
overfits, so `shrunk` moves each label from the global value toward its own only as far as
held-out halves of the validation rows reward (see `select_thresholds`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from multitag.config import ThresholdParams
from multitag.training.score_groups import (
    ScoreGroups,
    ThresholdError,
    accuracy_of,
    bin_groups,
    check_inputs,
    f1_of,
    group_scores,
    precision_of,
    recall_of,
    safe_div,
)
from multitag.training.threshold_set import ThresholdSet, json_ready

CURVE_POINTS = 101  # thresholds 0.00, 0.01, ..., 1.00 in the stored curves
SHRINK_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # fraction of the way from global to own
RESAMPLE_BINS = 1024  # the shrunk policy's resampling groups scores into at most this many bins
_TOL = 1e-12  # float slack when comparing a computed precision/recall with its target


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
        score = f1_of(tp, fp, n_pos)
        return _first_argmax(score), ~np.isnan(score).all(axis=-1)
    if objective == "accuracy":
        score = accuracy_of(tp, fp, n_pos, n_neg)
        return _first_argmax(score), ~np.isnan(score).all(axis=-1)
    if objective == "recall_at_precision":
        prec = precision_of(tp, fp, n_pos)
        predicts = np.broadcast_to(np.add(tp, fp) > 0, prec.shape)
        met = predicts & (prec >= params.precision_target - _TOL)
        any_met = np.asarray(met.any(axis=-1))  # numpy types any() as scalar | array
        last_met = met.shape[-1] - 1 - np.argmax(met[..., ::-1], axis=-1)
        return np.where(any_met, last_met, _last_argmax(prec)), any_met
    if objective == "precision_at_recall":
        rec = recall_of(tp, np.broadcast_to(n_pos, np.shape(tp)))
        met = rec >= params.recall_target - _TOL
        prec = np.where(met, precision_of(tp, fp, n_pos), np.nan)
        return _last_argmax(prec), np.asarray(met.any(axis=-1))
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
        return f1_of(tp, fp, n_pos)
    if objective == "accuracy":
        return accuracy_of(tp, fp, n_pos, n_neg)
    prec = precision_of(tp, fp, n_pos)
    rec = recall_of(tp, np.broadcast_to(n_pos, np.shape(tp)))
    if objective == "recall_at_precision":
        empty = np.broadcast_to(np.add(tp, fp) == 0, prec.shape)
        met = empty | (prec >= params.precision_target - _TOL)
        return np.where(np.isnan(rec), np.nan, np.where(met, rec, prec - 1.0))
    if objective == "precision_at_recall":
        met = rec >= params.recall_target - _TOL
        return np.where(np.isnan(rec), np.nan, np.where(met, prec, rec - 1.0))
    raise ThresholdError(f"unknown objective {objective!r}")


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
    p, y, labels = check_inputs(probs, targets, vocab)
    n, n_labels = p.shape
    if not y.any():
        raise ThresholdError(
            "targets contain no positive label at all: thresholds cannot be chosen. Check that "
            "the validation split has labelled images."
        )

    g_all = group_scores(p.ravel(), y.ravel())
    g_tp, g_fp = g_all.decision_counts
    g_pos, g_neg = g_all.n_pos, g_all.n_neg
    k_acc, _ = _select_cut(g_tp, g_fp, g_pos, g_neg, "accuracy", params)
    k_f1, _ = _select_cut(g_tp, g_fp, g_pos, g_neg, "f1", params)
    k_obj, g_met = _select_cut(g_tp, g_fp, g_pos, g_neg, params.objective, params)
    global_t = float(g_all.cut_thresholds(k_obj))
    global_sweep = {
        "accuracy_multi": {
            "threshold": float(g_all.cut_thresholds(k_acc)),
            "value": float(accuracy_of(g_tp[k_acc], g_fp[k_acc], g_pos, g_neg)),
        },
        "f1_micro": {
            "threshold": float(g_all.cut_thresholds(k_f1)),
            "value": float(f1_of(g_tp[k_f1], g_fp[k_f1], g_pos)),
        },
        "objective": {"threshold": global_t, "target_met": bool(g_met)},
    }

    cols, ys = np.ascontiguousarray(p.T), np.ascontiguousarray(y.T)
    groups = [group_scores(cols[j], ys[j]) for j in range(n_labels)]
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
    groups: list[ScoreGroups], eligible: np.ndarray, global_t: float, params: ThresholdParams
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
    binned = [bin_groups(groups[j], RESAMPLE_BINS) for j in idx]
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
    mean = safe_div(total, valid.sum(axis=(0, 2)))
    return _first_argmax(mean.T)


def _cum_cuts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pad = [(0, 0)] * (pos.ndim - 1) + [(1, 0)]
    return np.pad(np.cumsum(pos, axis=-1), pad), np.pad(np.cumsum(neg, axis=-1), pad)


def _curves(g_all: ScoreGroups, groups: list[ScoreGroups], labels: list[str]) -> dict[str, Any]:
    """Precision/recall/F1/accuracy at thresholds 0, 0.01, ..., 1 (for reports and plots)."""
    grid = np.round(np.linspace(0.0, 1.0, CURVE_POINTS), 2)

    def at_grid(g: ScoreGroups) -> tuple[np.ndarray, np.ndarray, int, int]:
        tp, fp = g.decision_counts
        k = g.count_above(grid)
        return tp[k], fp[k], g.n_pos, g.n_neg

    tp, fp, n_pos, n_neg = at_grid(g_all)
    out: dict[str, Any] = {
        "thresholds": grid,
        "global": {
            "accuracy_multi": accuracy_of(tp, fp, n_pos, n_neg),
            "precision_micro": precision_of(tp, fp, n_pos),
            "recall_micro": recall_of(tp, np.full(grid.shape, n_pos)),
            "f1_micro": f1_of(tp, fp, n_pos),
        },
        "per_label": {},
    }
    for label, g in zip(labels, groups, strict=True):
        tp, fp, n_pos, n_neg = at_grid(g)
        out["per_label"][label] = {
            "precision": precision_of(tp, fp, n_pos),
            "recall": recall_of(tp, np.full(grid.shape, n_pos)),
            "f1": f1_of(tp, fp, n_pos),
            "accuracy": accuracy_of(tp, fp, n_pos, n_neg),
        }
    return json_ready(out, digits=6)
