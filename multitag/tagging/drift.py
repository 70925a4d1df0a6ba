"""Label drift: each label's rate in a run next to its prevalence in training, and a rule
that flags the labels that moved enough for a person to look."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from multitag.inference.spec import ModelBaseline

NONE_LABEL = "(none)"  # the "no label above threshold" row in rate tables


@dataclass(frozen=True)
class DriftRule:
    """When a label's rate in a run has moved enough from training to flag it.

    Flagged when the run tagged at least `min_images` images, the rates differ by at least
    `min_abs_diff` (absolute), AND the rate of the label or of its absence changed by a
    factor of at least `min_ratio` either way. Looking at the absence too keeps the rule
    symmetric for common labels, which can never double: 2% -> 5% is not flagged (too
    small), 2% -> 30% is; 60% -> 75% is not (absence 40% -> 25%), 60% -> 90% is (absence
    40% -> 10%), 60% -> 20% is. A label never seen in training is flagged at `min_abs_diff`.
    """

    min_images: int = 100
    min_abs_diff: float = 0.10
    min_ratio: float = 2.0

    def flags(self, rate: float, train_rate: float | None, n_images: int) -> bool:
        if train_rate is None or n_images < self.min_images:
            return False
        if abs(rate - train_rate) < self.min_abs_diff:
            return False
        return self._moved(rate, train_rate) or self._moved(1.0 - rate, 1.0 - train_rate)

    def _moved(self, now: float, before: float) -> bool:
        if before <= 0:
            return now > 0
        ratio = now / before
        return ratio >= self.min_ratio or ratio <= 1.0 / self.min_ratio


@dataclass(frozen=True)
class LabelRate:
    label: str
    count: int
    rate: float | None  # share of this run's tagged (non-error) images
    train_rate: float | None
    flagged: bool


@dataclass(frozen=True)
class DriftReport:
    n_images: int
    baseline_available: bool
    note: str
    rule: dict[str, float]
    labels: list[LabelRate]
    none: LabelRate
    flagged: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_drift(
    label_counts: Mapping[str, int],
    n_none: int,
    n_images: int,
    baseline: ModelBaseline,
    rule: DriftRule | None = None,
) -> DriftReport:
    """Rates of each label and of "no label" in this run next to training prevalence."""
    rule = rule or DriftRule()
    prev = baseline.train_label_prevalence
    available = prev is not None

    def rate_of(count: int) -> float | None:
        return round(count / n_images, 6) if n_images else None

    def entry(label: str, count: int, train: float | None) -> LabelRate:
        rate = rate_of(count)
        flagged = rate is not None and rule.flags(rate, train, n_images)
        return LabelRate(label, count, rate, train, flagged)

    vocab = list(baseline.vocab) + sorted(set(label_counts) - set(baseline.vocab))
    labels = [entry(lab, int(label_counts.get(lab, 0)), (prev or {}).get(lab)) for lab in vocab]
    none = entry(NONE_LABEL, n_none, baseline.train_none_rate)
    if not available:
        note = (
            "the model's metrics.json has no train_label_prevalence: rates are shown "
            "without a training baseline and nothing is flagged"
        )
    elif n_images < rule.min_images:
        note = f"only {n_images} images tagged (< {rule.min_images}): too few to flag drift"
    else:
        note = "rates are shares of this run's tagged (non-error) images"
    flagged = [e.label for e in [*labels, none] if e.flagged]
    return DriftReport(n_images, available, note, asdict(rule), labels, none, flagged)
