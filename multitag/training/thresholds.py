"""Evaluate multi-label predictions and choose the per-label decision thresholds.

A model emits one sigmoid score per label; a threshold per label turns scores into labels.
Everything here works on saved validation predictions (numpy arrays, no torch), so the
thresholds can be chosen, reported and re-checked without the model.

Where each part lives: `score_groups` (input checks, sorted score groups and the ratios on
their counts), `threshold_selection` (`select_thresholds`: sweep, own optima, policies),
`threshold_set` (`ThresholdSet`: thresholds.json and `apply_thresholds`), `evaluation`
(`evaluate`, `average_precision`). This module re-exports their public API.

Conventions, used by every one of those modules:
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

from multitag.training.evaluation import Evaluation, LabelMetrics, average_precision, evaluate
from multitag.training.score_groups import ThresholdError
from multitag.training.threshold_selection import (
    CURVE_POINTS,
    RESAMPLE_BINS,
    SHRINK_WEIGHTS,
    select_thresholds,
)
from multitag.training.threshold_set import (
    CONVENTION,
    FORMAT_VERSION,
    ThresholdSet,
    apply_thresholds,
)

__all__ = [
    "CONVENTION",
    "CURVE_POINTS",
    "FORMAT_VERSION",
    "RESAMPLE_BINS",
    "SHRINK_WEIGHTS",
    "Evaluation",
    "LabelMetrics",
    "ThresholdError",
    "ThresholdSet",
    "apply_thresholds",
    "average_precision",
    "evaluate",
    "select_thresholds",
]
