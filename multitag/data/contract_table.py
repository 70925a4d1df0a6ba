"""Table checks: the contract's quality rules, run once over facts the row pass gathered.

Why facts and not the rows: the row pass already parsed every cell, so a table rule (at least
one validation row, labels seen only in validation) reads those results instead of parsing
again, and never reports a cell the row checks already flagged. `rowCount` is ODCS's library
rule; the text rules are bound by name (`contract_spec.TEXT_RULES` lists them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitag.data.contract_report import Violation
from multitag.data.contract_spec import QualityRule


@dataclass
class Facts:
    """What table-level rules look at, gathered once by the row pass."""

    n_rows: int
    split_of_row: dict[int, bool]  # row -> is_valid, rows whose is_valid parsed
    labels_of_row: dict[int, list[str]]  # row -> tokens, rows whose labels parsed
    line_of_row: dict[int, int]
    images_root: Path


_COMPARATORS: dict[str, Callable[[float, Any], bool]] = {
    "mustBe": lambda v, x: v == x,
    "mustNotBe": lambda v, x: v != x,
    "mustBeGreaterThan": lambda v, x: v > x,
    "mustBeGreaterOrEqualTo": lambda v, x: v >= x,
    "mustBeLessThan": lambda v, x: v < x,
    "mustBeLessOrEqualTo": lambda v, x: v <= x,
    "mustBeBetween": lambda v, x: x[0] <= v <= x[1],
    "mustNotBeBetween": lambda v, x: not x[0] <= v <= x[1],
}


def _row_count(rule: QualityRule, facts: Facts) -> list[Violation]:
    failed = [
        k
        for k, cmp in _COMPARATORS.items()
        if k in rule.spec and not cmp(facts.n_rows, rule.spec[k])
    ]
    if not failed:
        return []
    bound = ", ".join(f"{k} {rule.spec[k]}" for k in failed)
    return [
        Violation(
            None,
            None,
            str(facts.n_rows),
            rule.rule_id,
            f"row count {facts.n_rows} breaks {bound}",
            "Add data rows below the header (fname,labels,is_valid).",
        )
    ]


def _split_rule(want_valid: bool) -> Callable[[QualityRule, Facts], list[Violation]]:
    def check(rule: QualityRule, facts: Facts) -> list[Violation]:
        if not facts.split_of_row or want_valid in facts.split_of_row.values():
            return []  # no parsed is_valid at all: the row or column errors already say why
        split = "validation" if want_valid else "training"
        flag = "True" if want_valid else "False"
        return [
            Violation(
                None,
                "is_valid",
                None,
                rule.rule_id,
                f"no {split} rows",
                f"Set is_valid to {flag} on some rows (about 20% for validation).",
            )
        ]

    return check


def _images_root_exists(rule: QualityRule, facts: Facts) -> list[Violation]:
    if facts.images_root.is_dir():
        return []
    return [
        Violation(
            None,
            "fname",
            None,
            rule.rule_id,
            f"images folder {facts.images_root} not found",
            "Put the images in a train/ folder next to train.csv.",
        )
    ]


def _validation_labels_in_training(rule: QualityRule, facts: Facts) -> list[Violation]:
    train: set[str] = set()
    first_valid: dict[str, int] = {}
    for row, tokens in facts.labels_of_row.items():
        is_valid = facts.split_of_row.get(row)
        if is_valid is False:
            train.update(tokens)
        elif is_valid:
            for t in tokens:
                first_valid.setdefault(t, row)
    return [
        Violation(
            row,
            "labels",
            label,
            rule.rule_id,
            f"label '{label}' occurs only in validation (first at row {row})",
            "Move some of its rows to training (is_valid False) or drop the label.",
            facts.line_of_row.get(row),
        )
        for label, row in sorted(first_valid.items(), key=lambda kv: kv[1])
        if label not in train
    ]


TEXT_RULE_CHECKS: dict[str, Callable[[QualityRule, Facts], list[Violation]]] = {
    "has_training_rows": _split_rule(want_valid=False),
    "has_validation_rows": _split_rule(want_valid=True),
    "images_root_exists": _images_root_exists,
    "validation_labels_in_training": _validation_labels_in_training,
}


def quality_violations(rule: QualityRule, facts: Facts) -> list[Violation]:
    """What one compiled quality rule finds (its severity is applied by the caller)."""
    if rule.kind == "library":
        return _row_count(rule, facts)
    return TEXT_RULE_CHECKS[rule.name](rule, facts)
