"""Validation scores as sorted groups with their positive/negative counts, and the ratios on them.

Why counts: every threshold decision over N scores is "predict the top k distinct scores", so
one sort per label plus cumulative sums gives true and false positives at every possible
threshold at once (O(N log N), ties exact). Selection, evaluation and the stored curves all
read these counts; the input checks that guard them live here too, so each entry point
refuses bad arrays with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from multitag.errors import MultitagError


class ThresholdError(MultitagError, ValueError):
    """Inputs that thresholds cannot be chosen or evaluated on (the message says which)."""


# ----------------------------------------------------------------------------- input checks


def as_probs(probs: Any, name: str = "probs") -> np.ndarray:
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


def as_targets(targets: Any, shape: tuple[int, ...]) -> np.ndarray:
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


def as_vocab(vocab: Sequence[str], n_labels: int) -> list[str]:
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


def check_inputs(
    probs: Any, targets: Any, vocab: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    p = as_probs(probs)
    if p.shape[0] == 0:
        raise ThresholdError("probs has no rows: nothing to evaluate or choose thresholds on.")
    return p, as_targets(targets, p.shape), as_vocab(vocab, p.shape[1])


# ------------------------------------------------------------------ sorted score groups


@dataclass(frozen=True)
class ScoreGroups:
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
        return between(np.asarray(below), np.asarray(above))

    def count_above(self, thresholds: np.ndarray) -> np.ndarray:
        """Cut index for arbitrary thresholds: how many groups lie wholly above each."""
        return np.searchsorted(-self.lo, -np.asarray(thresholds, dtype=np.float64), side="left")


def between(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
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


def group_scores(scores: np.ndarray, targets: np.ndarray) -> ScoreGroups:
    s, y = _sort_desc(scores, targets)
    ends = np.flatnonzero(s[1:] != s[:-1])
    ends = np.append(ends, s.size - 1)
    cum_pos = np.cumsum(y, dtype=np.int64)[ends]
    pos = np.diff(cum_pos, prepend=0)
    neg = np.diff(ends, prepend=-1) - pos
    score = s[ends].astype(np.float64)
    return ScoreGroups(hi=score, lo=score, pos=pos, neg=neg)


def bin_groups(g: ScoreGroups, max_bins: int) -> ScoreGroups:
    """Merge adjacent groups into about `max_bins` bins of equal row count (never splits a tie)."""
    if g.hi.size <= max_bins:
        return g
    size = g.pos + g.neg
    before = np.cumsum(size) - size
    bin_id = (before * max_bins) // int(size.sum())
    starts = np.flatnonzero(np.diff(bin_id, prepend=-1))
    ends = np.append(starts[1:], g.hi.size) - 1
    return ScoreGroups(
        hi=g.hi[starts],
        lo=g.lo[ends],
        pos=np.add.reduceat(g.pos, starts),
        neg=np.add.reduceat(g.neg, starts),
    )


# -------------------------------------------------------------- metrics on count arrays


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, np.float64))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def precision_of(tp: Any, fp: Any, n_pos: Any) -> np.ndarray:
    prec = safe_div(tp, np.add(tp, fp))
    nothing_predicted = np.broadcast_to(np.add(tp, fp) == 0, prec.shape)
    had_positives = np.broadcast_to(np.asarray(n_pos) > 0, prec.shape)
    return np.where(nothing_predicted & had_positives, 0.0, prec)


def recall_of(tp: Any, n_pos: Any) -> np.ndarray:
    return safe_div(tp, n_pos)


def f1_of(tp: Any, fp: Any, n_pos: Any) -> np.ndarray:
    # 2TP / (2TP + FP + FN) with FN = n_pos - TP.
    return safe_div(np.multiply(tp, 2), np.add(np.add(tp, fp), n_pos))


def accuracy_of(tp: Any, fp: Any, n_pos: Any, n_neg: Any) -> np.ndarray:
    return safe_div(np.add(tp, np.subtract(n_neg, fp)), np.add(n_pos, n_neg))
