"""Label-prior baselines: what a model that never looks at the image scores on validation.

Why: on a small or hard dataset a trained model can land at or below guessing (measured in
issue 17: blood-smear mAP 0.852 against 0.845 for each label's frequency, playing-card
accuracy_multi 0.653 against 0.71 for predicting no label at all), and a number without its
baseline reads as success. The champion gate refuses a model that does not beat these by a
margin, and the report and `multitag models show` print them next to the model's figures.

Every figure is computed by `evaluate`, the function that scores the model, so ties, labels
without positives (left out of mAP and macro averages) and NaN conventions are the same:

- mAP: every image scored with each label's training prevalence. A constant score ties all
  images, so each label's AP is its validation positive rate, whatever the constant.
- accuracy_multi: predict no label at all (the best constant answer when labels are rare).
- f1_micro / f1_macro: predict every label on every image (all-positive). Among answers that
  ignore the image this is the best per label for F1 (all-negative scores 0); for micro F1 a
  subset of frequent labels can score a little higher, so this baseline is not a ceiling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from multitag.training.evaluation import evaluate
from multitag.training.score_groups import ThresholdError
from multitag.training.threshold_set import json_ready

# How each baseline figure was obtained, stored with the numbers so a reader need not guess.
PREDICTORS = {
    "mAP": "prevalence scores (each label scored with its training prevalence)",
    "accuracy_multi": "all-negative (no label on any image)",
    "f1_micro": "all-positive (every label on every image)",
    "f1_macro": "all-positive (every label on every image)",
}


def label_prior_baselines(
    targets: np.ndarray, vocab: Sequence[str], prevalence: Mapping[str, float]
) -> dict[str, Any]:
    """{metric: value, ..., "predictors": {metric: how}} on these (validation) targets.

    `prevalence` maps each label to its share of training images (labels it lacks count as
    0): only the mAP figure uses it, and only as the constant score of its label.
    """
    y = np.asarray(targets)
    if y.ndim != 2 or y.shape[1] != len(vocab):
        raise ThresholdError(
            f"targets have shape {y.shape}; expected (images, {len(vocab)}) for the vocab"
        )
    if y.shape[0] == 0:
        raise ThresholdError("label-prior baselines need at least one validation image")
    prior = np.array([float(prevalence.get(label, 0.0)) for label in vocab])
    if not np.all((prior >= 0.0) & (prior <= 1.0)):
        raise ThresholdError(f"training prevalence must lie in [0, 1]; got {prior.tolist()}")
    n = y.shape[0]
    prevalence_scores = np.broadcast_to(prior, (n, len(vocab)))
    # evaluate() decides probs > threshold: 0 > 0.5 is never, 1 > 0.5 always.
    none = evaluate(np.zeros((n, len(vocab))), y, 0.5, vocab)
    every = evaluate(np.ones((n, len(vocab))), y, 0.5, vocab)
    ranked = evaluate(prevalence_scores, y, 0.5, vocab)
    return {
        "mAP": json_ready(ranked.mAP),
        "accuracy_multi": json_ready(none.accuracy_multi),
        "f1_micro": json_ready(every.f1_micro),
        "f1_macro": json_ready(every.f1_macro),
        "predictors": dict(PREDICTORS),
    }
