"""Check a training dataset (train.csv + train/ images) against its data contract.

Why: fastai reads train.csv without complaint when it is wrong in ways that ruin a run hours
later, or silently: `ColSplitter` treats the string 'False' as true (every row lands in
validation), a doubled space in `labels` becomes an empty-string class, a missing or corrupt
image crashes epoch 3. This module finds all of that up front, lists every bad row with the
line to fix, and hands the flow a parsed table it can train on.

The rules come from `data_contracts/training_labels.yaml` (ODCS v3): column names, `required`,
`unique`, `logicalTypeOptions` (pattern, lengths), `logicalType` and the table-level quality
rules with their severity. What YAML cannot say (paths stay inside the images root, files
exist and decode, labels seen only in validation) is code below, bound to the contract's
quality rules by name; a contract naming a rule this module does not implement is refused.

Decisions a user sees:
- Rows are numbered twice: `row` is the 1-based data row (header and blank lines not counted,
  so it equals pandas' `read_csv(...).iloc[row - 1]`) and `line` is the physical line in
  train.csv where the record starts, counting the header as line 1.
- `labels` must use exactly one space between tokens. Doubled, leading or trailing spaces are
  errors (`labels.whitespace`), not silently normalised: fastai splits on a single ' ' and
  would invent an empty-string class, so the CSV itself must be fixed.
- A missing column is a contract violation (exit 1, listed in the report); an unreadable file
  (no folder, no train.csv, empty, not UTF-8, broken CSV quoting) raises DatasetUnusableError.
- Row checks are independent per column; for one column only the first failing rule is
  reported (required, length, pattern, type, then the path and image rules for `fname`);
  `unique` is checked on its own and flags every repeat after the first occurrence.
- `label_counts` count rows carrying a label (a label repeated within a row counts once, and
  the repeat is a `labels.duplicate_token` warning).

Where each part lives: `contract_spec` (the YAML into column rules), `contract_csv` (reading
train.csv with line numbers), `contract_rows` (cell, path and image checks), `contract_table`
(the table-level quality rules), `contract_report` (violations and the report's CSV, text and
markdown forms). This module runs them in order and re-exports the public names.

No pandera underneath: its failure cases carry no physical line numbers and it would need a
second pass for the per-row path and image rules, so plain Python checks are simpler here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from multitag.data.contract_csv import DatasetUnusableError, ParsedCsv, Record, find_csv, read_csv
from multitag.data.contract_report import (
    REPORT_COLUMNS,
    ContractReport,
    Violation,
    read_violations_csv,
)
from multitag.data.contract_rows import (
    check_value,
    column_violations,
    duplicate_token_warnings,
    fname_violations,
    unique_violations,
)
from multitag.data.contract_spec import (
    CSV_NAME,
    DEFAULT_CONTRACT,
    ColumnSpec,
    CompiledContract,
    ContractError,
    QualityRule,
    compile_contract,
    load_contract,
)
from multitag.data.contract_table import Facts, quality_violations

__all__ = [
    "CSV_NAME",
    "DEFAULT_CONTRACT",
    "REPORT_COLUMNS",
    "ColumnSpec",
    "CompiledContract",
    "ContractError",
    "ContractReport",
    "DatasetUnusableError",
    "QualityRule",
    "Violation",
    "compile_contract",
    "load_contract",
    "read_violations_csv",
    "validate_dataset",
]


def validate_dataset(
    path: Path,
    contract: Path | None = None,
    *,
    check_images: bool = True,
    workers: int | None = None,
) -> ContractReport:
    """Check `path/train.csv` and the images under `path/train` against the contract.

    Never raises for bad rows or bad images (they become violations); raises
    DatasetUnusableError when there is nothing to check and ContractError for a bad contract.
    `check_images=False` skips opening the files (exists/decode), e.g. for a quick look.
    """
    spec = compile_contract(load_contract(contract))
    dataset = Path(path)
    parsed = read_csv(find_csv(dataset, spec.csv_name))
    errors: list[Violation] = list(parsed.problems)
    warnings: list[Violation] = []
    present = [c for c in spec.columns if c.name in parsed.header]
    errors += column_violations(spec, parsed.header)

    values: dict[str, dict[int, Any]] = {c.name: {} for c in present}
    for rec in parsed.records:
        for col in present:
            problem, value = check_value(col, rec)
            if problem is not None:
                errors.append(problem)
            else:
                values[col.name][rec.row] = value
    for col in present:
        if col.unique:
            errors += unique_violations(col, parsed.records)

    root = dataset / spec.images_root
    if "fname" in values:
        errors += fname_violations(
            spec, parsed.records, values["fname"], root, check_images, workers
        )
    labels_of_row = _tokens(values.get("labels", {}))
    warnings += duplicate_token_warnings(parsed.records, labels_of_row)
    facts = Facts(
        n_rows=len(parsed.records) + len(parsed.problems),
        split_of_row=values.get("is_valid", {}),
        labels_of_row=labels_of_row,
        line_of_row={r.row: r.line for r in parsed.records},
        images_root=root,
    )
    for rule in spec.quality:
        found = quality_violations(rule, facts)
        (warnings if rule.severity == "warning" else errors).extend(found)
    return _build_report(dataset, spec, parsed, values, facts, errors, warnings, check_images)


def _tokens(labels: dict[int, Any]) -> dict[int, list[str]]:
    return {row: value.split(" ") if value else [] for row, value in labels.items()}


def _build_report(
    dataset: Path,
    spec: CompiledContract,
    parsed: ParsedCsv,
    values: dict[str, dict[int, Any]],
    facts: Facts,
    errors: list[Violation],
    warnings: list[Violation],
    check_images: bool,
) -> ContractReport:
    splits = facts.split_of_row
    train: Counter[str] = Counter()
    valid: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for row, tokens in facts.labels_of_row.items():
        unique = set(tokens)
        total.update(unique)
        if row in splits:
            (valid if splits[row] else train).update(unique)
    order = sorted(total, key=lambda k: (-total[k], k))
    table = _table(spec, parsed.records, values)
    return ContractReport(
        dataset=dataset,
        contract_id=spec.id,
        contract_version=spec.version,
        errors=sorted(errors, key=_order),
        warnings=sorted(warnings, key=_order),
        n_rows=facts.n_rows,
        n_train=sum(1 for v in splits.values() if not v),
        n_valid=sum(1 for v in splits.values() if v),
        n_unlabelled=sum(1 for t in facts.labels_of_row.values() if not t),
        label_counts={k: total[k] for k in order},
        label_counts_train={k: train[k] for k in order if train[k]},
        label_counts_valid={k: valid[k] for k in order if valid[k]},
        table=table,
        images_checked=check_images,
    )


def _order(v: Violation) -> tuple[int, int, str]:
    return (v.row or 0, v.line or 0, v.rule)


def _table(
    spec: CompiledContract, records: list[Record], values: dict[str, dict[int, Any]]
) -> pd.DataFrame:
    """Contract columns, parsed, for the rows whose boolean columns parsed (all rows when ok)."""
    bools = [c.name for c in spec.columns if c.logical_type == "boolean" and c.name in values]
    keep = [r for r in records if all(r.row in values[b] for b in bools)]
    data = {name: [col.get(r.row, r.values[name]) for r in keep] for name, col in values.items()}
    frame = pd.DataFrame(data, columns=list(values))
    return frame.astype({b: bool for b in bools})
