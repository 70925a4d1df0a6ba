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

No pandera underneath: its failure cases carry no physical line numbers and it would need a
second pass for the per-row path and image rules, so plain Python checks are simpler here.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

DEFAULT_CONTRACT = Path(__file__).resolve().parents[2] / "data_contracts" / "training_labels.yaml"
CSV_NAME = "train.csv"
REPORT_COLUMNS = ("severity", "row", "line", "column", "value", "rule", "message", "hint")
_SUPPORTED_TYPES = ("string", "boolean", "integer", "number")
_DRIVE = re.compile(r"^[A-Za-z]:")


class DatasetUnusableError(Exception):
    """The dataset cannot be checked at all (no folder, no train.csv, unreadable file)."""


class ContractError(ValueError):
    """The contract YAML itself is malformed or asks for a rule this module does not know."""


@dataclass(frozen=True)
class Violation:
    """One broken rule; `row`/`line` are None for table-level rules (see module docstring)."""

    row: int | None
    column: str | None
    value: str | None
    rule: str
    message: str
    hint: str
    line: int | None = None


# ---------------------------------------------------------------------------------------------
# The contract
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnSpec:
    """The checks one ODCS property asks for."""

    name: str
    logical_type: str
    required: bool
    unique: bool
    pattern: re.Pattern[str] | None = None
    min_length: int | None = None
    max_length: int | None = None
    true_values: frozenset[str] = frozenset()
    false_values: frozenset[str] = frozenset()


@dataclass(frozen=True)
class QualityRule:
    """A table-level ODCS quality entry; `severity` decides error or warning."""

    name: str
    kind: str
    severity: str
    description: str
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def rule_id(self) -> str:
        return f"table.{self.name}"


@dataclass(frozen=True)
class CompiledContract:
    """The contract reduced to what the checks need."""

    id: str
    version: str
    csv_name: str
    columns: tuple[ColumnSpec, ...]
    images_root: str
    image_extensions: frozenset[str]
    quality: tuple[QualityRule, ...]

    def column(self, name: str) -> ColumnSpec | None:
        return next((c for c in self.columns if c.name == name), None)


def load_contract(path: Path | None = None) -> dict:
    """The ODCS document as a dict, checked enough that `compile_contract` can trust it."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_CONTRACT
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ContractError(f"data contract not found: {path}") from e
    except yaml.YAMLError as e:
        raise ContractError(f"data contract {path} is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ContractError(
            f"data contract {path} must be a YAML mapping, got {type(doc).__name__}"
        )
    if doc.get("kind") != "DataContract" or not str(doc.get("apiVersion", "")).startswith("v3."):
        raise ContractError(
            f"{path} is not an ODCS v3 data contract (need kind: DataContract, apiVersion: v3.x.y)"
        )
    for key in ("id", "version", "status", "schema"):
        if key not in doc:
            raise ContractError(f"data contract {path} lacks the required key '{key}'")
    return doc


def compile_contract(doc: dict) -> CompiledContract:
    """Turn the ODCS dict into column specs and quality rules (fails on anything unknown)."""
    schema = doc.get("schema") or []
    if len(schema) != 1 or not isinstance(schema[0], dict):
        raise ContractError("the training contract must describe exactly one schema object")
    obj = schema[0]
    custom = _custom_properties(obj)
    columns = tuple(_column_spec(p) for p in obj.get("properties") or [])
    if not columns:
        raise ContractError(f"schema object '{obj.get('name')}' has no properties")
    quality = tuple(_quality_rule(q) for q in obj.get("quality") or [])
    return CompiledContract(
        id=str(doc["id"]),
        version=str(doc["version"]),
        csv_name=str(obj.get("physicalName") or CSV_NAME),
        columns=columns,
        images_root=str(custom.get("imagesRoot", "train")),
        image_extensions=frozenset(e.lower() for e in custom.get("imageExtensions", [".jpg"])),
        quality=quality,
    )


def _custom_properties(element: dict) -> dict[str, Any]:
    return {c["property"]: c.get("value") for c in element.get("customProperties") or []}


def _column_spec(prop: dict) -> ColumnSpec:
    name = prop.get("name")
    ltype = prop.get("logicalType", "string")
    if not name or ltype not in _SUPPORTED_TYPES:
        raise ContractError(f"property {name!r}: logicalType must be one of {_SUPPORTED_TYPES}")
    opts = prop.get("logicalTypeOptions") or {}
    custom = _custom_properties(prop)
    true_values = frozenset(str(v).lower() for v in custom.get("trueValues", ["true"]))
    false_values = frozenset(str(v).lower() for v in custom.get("falseValues", ["false"]))
    if true_values & false_values:
        raise ContractError(f"property {name!r}: trueValues and falseValues overlap")
    return ColumnSpec(
        name=str(name),
        logical_type=ltype,
        required=bool(prop.get("required", False)),
        unique=bool(prop.get("unique", False)),
        pattern=_compile_pattern(name, opts.get("pattern")),
        min_length=opts.get("minLength"),
        max_length=opts.get("maxLength"),
        true_values=true_values,
        false_values=false_values,
    )


def _compile_pattern(column: str, pattern: str | None) -> re.Pattern[str] | None:
    """Compile an ECMA-262 pattern; a final `$` becomes `\\Z` because Python's `$` also
    matches before a trailing newline, which a quoted CSV field can contain."""
    if pattern is None:
        return None
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ContractError(f"property {column!r}: bad pattern {pattern!r}: {e}") from e


def _quality_rule(q: dict) -> QualityRule:
    name = q.get("name")
    kind = q.get("type", "library")
    severity = q.get("severity", "error")
    if kind not in ("library", "text") or not name:
        raise ContractError(f"quality rule {name!r}: type must be 'library' or 'text' with a name")
    if severity not in ("error", "warning"):
        raise ContractError(f"quality rule {name!r}: severity must be 'error' or 'warning'")
    if kind == "library" and q.get("rule") != "rowCount":
        raise ContractError(f"quality rule {name!r}: only the library rule rowCount is supported")
    if kind == "text" and name not in _TEXT_RULES:
        raise ContractError(
            f"quality rule {name!r} has no implementation in multitag.data.contracts "
            f"(known: {sorted(_TEXT_RULES)}); implement it or remove it from the contract"
        )
    return QualityRule(str(name), kind, severity, str(q.get("description", "")), dict(q))


# ---------------------------------------------------------------------------------------------
# Reading train.csv
# ---------------------------------------------------------------------------------------------


@dataclass
class _Record:
    row: int
    line: int
    values: dict[str, str]


@dataclass
class _Csv:
    header: list[str]
    records: list[_Record]
    problems: list[Violation]


def _find_csv(dataset: Path, csv_name: str) -> Path:
    if not dataset.exists():
        raise DatasetUnusableError(
            f"dataset folder not found: {dataset}. "
            f"Pass the folder that holds {csv_name} and train/."
        )
    if dataset.is_file():
        hint = f" Pass its folder: {dataset.parent}" if dataset.name == csv_name else ""
        raise DatasetUnusableError(f"{dataset} is a file, not a dataset folder.{hint}")
    csv_path = dataset / csv_name
    if csv_path.is_file():
        return csv_path
    nested = sorted(p.parent for p in dataset.glob(f"*/{csv_name}"))
    if nested:
        raise DatasetUnusableError(
            f"no {csv_name} in {dataset}, but {nested[0]} has one: pass that folder instead."
        )
    listing = ", ".join(sorted(p.name for p in dataset.iterdir())[:10]) or "nothing"
    raise DatasetUnusableError(
        f"no {csv_name} in {dataset} (it contains: {listing}). A dataset folder needs "
        f"{csv_name} (fname,labels,is_valid) and the images under train/."
    )


def _decode(csv_path: Path) -> str:
    try:
        data = csv_path.read_bytes()
    except OSError as e:
        raise DatasetUnusableError(f"cannot read {csv_path}: {e}") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DatasetUnusableError(
            f"{csv_path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}): "
            "re-save it as UTF-8 CSV."
        ) from e
    if "\x00" in text:
        raise DatasetUnusableError(f"{csv_path} contains NUL bytes: it is not a text CSV file.")
    if not text.strip():
        raise DatasetUnusableError(
            f"{csv_path} is empty: it needs a header row (fname,labels,is_valid) and data rows."
        )
    return text


def _read_csv(csv_path: Path) -> _Csv:
    """Parse with the csv module so each record keeps the line it starts on."""
    reader = csv.reader(io.StringIO(_decode(csv_path), newline=""), strict=True)
    header: list[str] | None = None
    records: list[_Record] = []
    problems: list[Violation] = []
    try:
        next_line = 1
        for fields_ in reader:
            start, next_line = next_line, reader.line_num + 1
            if not fields_ or (len(fields_) == 1 and not fields_[0].strip()):
                continue  # blank line: allowed anywhere, e.g. trailing ones
            if header is None:
                header = fields_
                continue
            row = len(records) + len(problems) + 1
            if len(fields_) != len(header):
                problems.append(_field_count(row, start, fields_, header))
                continue
            records.append(_Record(row, start, dict(zip(header, fields_, strict=True))))
    except csv.Error as e:
        raise DatasetUnusableError(
            f"{csv_path} is not a well-formed CSV near line {reader.line_num}: {e}. "
            "A field that starts with a double quote must end with one, and quotes inside it "
            'are doubled ("").'
        ) from e
    assert header is not None  # _decode refused a blank file
    return _Csv(header, records, problems)


def _field_count(row: int, line: int, values: list[str], header: list[str]) -> Violation:
    return Violation(
        row=row,
        column=None,
        value=",".join(values),
        rule="row.field_count",
        message=f"{len(values)} fields where the header has {len(header)}",
        hint='Quote values that contain commas ("a,b.jpg") and make every row as wide as the '
        "header.",
        line=line,
    )


# ---------------------------------------------------------------------------------------------
# Column rules derived from the contract
# ---------------------------------------------------------------------------------------------

_HINTS = {
    "required": "Fill in a value; rows without one cannot be used.",
    "length": "Shorten the value to the allowed length.",
    "pattern": "Make the value match the pattern in data_contracts/training_labels.yaml.",
    "whitespace": "Remove tabs, line breaks, doubled and leading/trailing spaces.",
    "fname.required": "Every row needs the image path relative to train/, e.g. 000005.jpg.",
    "fname.pattern": "Use forward slashes and printable characters only, e.g. sub/img_01.jpg.",
    "labels.pattern": "Labels are tokens of letters, digits, '_' and '-' separated by single "
    "spaces, e.g. 'dog chair'; leave the field empty for no label.",
    "labels.whitespace": "Separate labels with exactly one space and remove leading/trailing "
    "spaces (fastai splits on ' ' and would create an empty label).",
    "is_valid.type": "Write True or False (also accepted: true/false, 1/0, yes/no).",
    "is_valid.required": "Write True for a validation row, False for a training row.",
}


def _hint(rule: str) -> str:
    return _HINTS.get(rule) or _HINTS.get(rule.split(".", 1)[1], "")


def _violation(rec: _Record, column: str, rule: str, message: str, hint: str = "") -> Violation:
    return Violation(
        rec.row, column, rec.values.get(column), rule, message, hint or _hint(rule), rec.line
    )


def _check_value(spec: ColumnSpec, rec: _Record) -> tuple[Violation | None, Any]:
    """First failing rule for this cell, and the parsed value when it passes."""
    value = rec.values[spec.name]
    if spec.required and not value.strip():
        return _violation(rec, spec.name, f"{spec.name}.required", "value is empty"), None
    if value == "":  # legal for an optional column, e.g. labels: "no label"
        return None, "" if spec.logical_type == "string" else None
    if spec.max_length is not None and len(value) > spec.max_length:
        msg = f"{len(value)} characters, more than {spec.max_length}"
        return _violation(rec, spec.name, f"{spec.name}.length", msg), None
    if spec.min_length is not None and len(value) < spec.min_length:
        msg = f"{len(value)} characters, fewer than {spec.min_length}"
        return _violation(rec, spec.name, f"{spec.name}.length", msg), None
    if spec.pattern is not None and not spec.pattern.search(value):
        return _pattern_violation(spec, rec, value), None
    return _parse_type(spec, rec, value)


def _pattern_violation(spec: ColumnSpec, rec: _Record, value: str) -> Violation:
    # A value that only breaks the pattern through its spacing gets its own rule, so the
    # message says what to fix instead of quoting a regular expression.
    if spec.pattern is not None and spec.pattern.search(" ".join(value.split())):
        return _violation(
            rec,
            spec.name,
            f"{spec.name}.whitespace",
            "doubled, leading or trailing spaces, or tabs/newlines between values",
        )
    bad = _offending_tokens(spec, value)
    detail = f": bad token(s) {', '.join(repr(t) for t in bad)}" if bad else ""
    msg = f"does not match the contract pattern {spec.pattern.pattern if spec.pattern else ''}"
    return _violation(rec, spec.name, f"{spec.name}.pattern", msg + detail)


def _offending_tokens(spec: ColumnSpec, value: str) -> list[str]:
    """For space-delimited columns, the tokens that fail the pattern on their own."""
    tokens = value.split()
    if len(tokens) < 2 or spec.pattern is None:
        return []
    return [t for t in tokens if not spec.pattern.search(t)]


def _parse_type(spec: ColumnSpec, rec: _Record, value: str) -> tuple[Violation | None, Any]:
    if spec.logical_type == "boolean":
        key = value.strip().lower()
        if key in spec.true_values:
            return None, True
        if key in spec.false_values:
            return None, False
        allowed = "/".join(sorted(spec.true_values | spec.false_values))
        return _violation(rec, spec.name, f"{spec.name}.type", f"not a boolean ({allowed})"), None
    if spec.logical_type in ("integer", "number"):
        try:
            return None, int(value) if spec.logical_type == "integer" else float(value)
        except ValueError:
            msg = f"not an {spec.logical_type}"
            return _violation(rec, spec.name, f"{spec.name}.type", msg), None
    return None, value


def _unique_violations(spec: ColumnSpec, records: Iterable[_Record]) -> list[Violation]:
    first: dict[str, _Record] = {}
    out: list[Violation] = []
    for rec in records:
        value = rec.values[spec.name]
        if not value.strip():
            continue
        if value in first:
            seen = first[value]
            out.append(
                _violation(
                    rec,
                    spec.name,
                    f"{spec.name}.unique",
                    f"duplicate of row {seen.row} (line {seen.line})",
                    "Keep one row per image; merge the labels of the duplicates into it.",
                )
            )
        else:
            first[value] = rec
    return out


# ---------------------------------------------------------------------------------------------
# fname: paths and images (what YAML cannot say)
# ---------------------------------------------------------------------------------------------


def _path_violation(contract: CompiledContract, rec: _Record) -> Violation | None:
    """Textual path rules, checked before touching the disk."""
    fname = rec.values["fname"]
    root = contract.images_root
    if fname.startswith("/") or _DRIVE.match(fname):
        return _violation(
            rec,
            "fname",
            "fname.relative",
            "absolute path",
            f"Write the path relative to {root}/, e.g. {PurePosixPath(fname).name}.",
        )
    if ".." in fname.split("/"):
        return _violation(
            rec,
            "fname",
            "fname.inside_root",
            f"'..' leaves the images folder {root}/",
            f"Move the image under {root}/ and write its path without '..'.",
        )
    if PurePosixPath(fname).suffix.lower() not in contract.image_extensions:
        exts = ", ".join(sorted(contract.image_extensions))
        return _violation(
            rec,
            "fname",
            "fname.extension",
            "not an image file extension",
            f"fname must end in one of: {exts}.",
        )
    return None


def _check_image(root: Path, fname: str) -> tuple[str, str] | None:
    """(rule, message) for a missing, escaping or undecodable image; None when it loads.

    Runs in worker threads: Pillow releases the GIL while decoding.
    """
    from PIL import Image

    path = root / fname
    try:
        resolved = path.resolve()
        if not resolved.is_relative_to(root.resolve()):
            return "fname.inside_root", f"resolves outside {root.name}/ (link to {resolved})"
        if not path.is_file():
            return "fname.exists", "is a folder, not a file" if path.is_dir() else "no such file"
    except (OSError, RuntimeError) as e:  # RuntimeError: symlink loop (Python 3.11)
        return "fname.exists", f"cannot be reached: {type(e).__name__}: {e}"
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (1, 1))  # decode at 1/8 scale: every byte is still read
            img.load()
    except Exception as e:  # any decoder failure is a finding about this file, not a crash
        return "fname.decodes", f"cannot be decoded: {type(e).__name__}: {e}"
    return None


def _image_violations(root: Path, recs: list[_Record], workers: int | None) -> list[Violation]:
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda r: _check_image(root, r.values["fname"]), recs))
    out = []
    for rec, result in zip(recs, results, strict=True):
        if result is not None:
            rule, message = result
            out.append(_violation(rec, "fname", rule, message, _image_hint(rule, root, rec)))
    return out


def _image_hint(rule: str, root: Path, rec: _Record) -> str:
    fname = rec.values["fname"]
    if rule == "fname.decodes":
        return "Re-export or re-download the image, or remove its row."
    if rule == "fname.inside_root":
        return f"Copy the image into {root}/ instead of linking to it."
    target = (root / fname).parent
    if target.is_dir():  # case mismatch is the commonest cause of "no such file"
        name = PurePosixPath(fname).name.lower()
        for p in target.iterdir():
            if p.name.lower() == name:
                return f"A file named {p.name} exists: fix the case in train.csv."
    return f"Add the image as {root / fname} or remove the row."


# ---------------------------------------------------------------------------------------------
# Table-level quality rules
# ---------------------------------------------------------------------------------------------


@dataclass
class _Facts:
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


def _row_count(rule: QualityRule, facts: _Facts) -> list[Violation]:
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


def _split_rule(want_valid: bool) -> Callable[[QualityRule, _Facts], list[Violation]]:
    def check(rule: QualityRule, facts: _Facts) -> list[Violation]:
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


def _images_root_exists(rule: QualityRule, facts: _Facts) -> list[Violation]:
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


def _validation_labels_in_training(rule: QualityRule, facts: _Facts) -> list[Violation]:
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


_TEXT_RULES: dict[str, Callable[[QualityRule, _Facts], list[Violation]]] = {
    "has_training_rows": _split_rule(want_valid=False),
    "has_validation_rows": _split_rule(want_valid=True),
    "images_root_exists": _images_root_exists,
    "validation_labels_in_training": _validation_labels_in_training,
}


def _quality_violations(rule: QualityRule, facts: _Facts) -> list[Violation]:
    if rule.kind == "library":
        return _row_count(rule, facts)
    return _TEXT_RULES[rule.name](rule, facts)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass
class ContractReport:
    """Everything `validate_dataset` found; `ok` means no errors (warnings allowed)."""

    dataset: Path
    contract_id: str
    contract_version: str
    errors: list[Violation]
    warnings: list[Violation]
    n_rows: int
    n_train: int
    n_valid: int
    n_unlabelled: int
    label_counts: dict[str, int]
    label_counts_train: dict[str, int]
    label_counts_valid: dict[str, int]
    table: pd.DataFrame
    images_checked: bool = True

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict:
        """JSON-ready counts for logs, metrics.json and the flow's return value."""
        return {
            "ok": self.ok,
            "dataset": str(self.dataset),
            "contract": f"{self.contract_id}@{self.contract_version}",
            "n_rows": self.n_rows,
            "n_train": self.n_train,
            "n_valid": self.n_valid,
            "n_unlabelled": self.n_unlabelled,
            "n_labels": len(self.label_counts),
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "errors_by_rule": dict(Counter(v.rule for v in self.errors).most_common()),
            "warnings_by_rule": dict(Counter(v.rule for v in self.warnings).most_common()),
            "label_counts": dict(self.label_counts),
            "label_counts_train": dict(self.label_counts_train),
            "label_counts_valid": dict(self.label_counts_valid),
            "images_checked": self.images_checked,
        }

    def violations_frame(self) -> pd.DataFrame:
        """Errors then warnings, one row each, columns REPORT_COLUMNS."""
        rows = [
            {"severity": sev, **asdict(v)}
            for sev, vs in (("error", self.errors), ("warning", self.warnings))
            for v in vs
        ]
        frame = pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
        return frame.astype({"row": "Int64", "line": "Int64"})

    def to_csv(self, path: Path) -> Path:
        """Write every violation (no cap) for a person to sort and filter; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.violations_frame().to_csv(path, index=False)
        return path

    def format_text(self, limit: int = 50, more: str = "") -> str:
        """The CLI's report: counts, label frequencies, then up to `limit` violations."""
        lines = [
            f"Dataset:  {self.dataset}",
            f"Contract: {self.contract_id} {self.contract_version}",
            f"Rows:     {self.n_rows} (train {self.n_train}, valid {self.n_valid}, "
            f"{self.n_unlabelled} without labels)",
            *_format_labels(self),
        ]
        if not self.images_checked:
            lines.append("Images:   not opened (--skip-images); fname paths checked only")
        lines += _format_violations("Errors", self.errors, limit, more)
        lines += _format_violations("Warnings", self.warnings, limit, more)
        verdict = "holds" if self.ok else "FAILED"
        lines.append(
            f"Contract {verdict}: {len(self.errors)} errors, {len(self.warnings)} warnings."
        )
        return "\n".join(lines)

    def to_markdown(self, limit: int = 200) -> str:
        """Markdown for a Prefect artifact: verdict, counts, labels, violations (capped)."""
        verdict = "holds" if self.ok else "**FAILED**"
        out = [
            f"# Data contract {verdict}: `{self.dataset.name}`",
            "",
            f"Contract `{self.contract_id}` {self.contract_version}; "
            f"{self.n_rows} rows (train {self.n_train}, valid {self.n_valid}, "
            f"{self.n_unlabelled} without labels); "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings.",
            "",
            "| label | train | valid | total |",
            "|---|---:|---:|---:|",
        ]
        out += [
            f"| {_md(k)} | {self.label_counts_train.get(k, 0)} | "
            f"{self.label_counts_valid.get(k, 0)} | {n} |"
            for k, n in self.label_counts.items()
        ]
        frame = self.violations_frame()
        if len(frame):
            out += [
                "",
                "| " + " | ".join(REPORT_COLUMNS) + " |",
                "|" + "---|" * len(REPORT_COLUMNS),
            ]
            for rec in frame.head(limit).itertuples(index=False):
                out.append("| " + " | ".join(_md(x) for x in rec) + " |")
            if len(frame) > limit:
                out.append(f"\n{len(frame) - limit} more violations are in the CSV report.")
        return "\n".join(out) + "\n"


def read_violations_csv(path: Path) -> dict[str, list[Violation]]:
    """Load a CSV written by `ContractReport.to_csv` back into violations, by severity."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    out: dict[str, list[Violation]] = {"error": [], "warning": []}
    names = [f.name for f in fields(Violation)]
    for rec in frame.to_dict("records"):
        kw: dict[str, Any] = {k: (rec[k] or None) for k in names}
        kw["row"] = int(kw["row"]) if kw["row"] else None
        kw["line"] = int(kw["line"]) if kw["line"] else None
        kw["message"], kw["hint"] = rec["message"], rec["hint"]
        if kw["row"] is not None and kw["value"] is None:
            kw["value"] = ""  # a row-level violation always carries its cell, maybe empty
        out.setdefault(rec["severity"], []).append(Violation(**kw))
    return out


def _md(x: object) -> str:
    if x is None or (not isinstance(x, str) and pd.isna(x)):
        return ""
    return str(x).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _format_labels(report: ContractReport, top: int = 30) -> list[str]:
    if not report.label_counts:
        return ["Labels:   none"]
    out = [f"Labels:   {len(report.label_counts)} (count: train / valid)"]
    for label, n in list(report.label_counts.items())[:top]:
        out.append(
            f"  {label:<24} {n:>7}: {report.label_counts_train.get(label, 0)} / "
            f"{report.label_counts_valid.get(label, 0)}"
        )
    if len(report.label_counts) > top:
        out.append(f"  ... and {len(report.label_counts) - top} more labels")
    return out


def _format_violations(title: str, vs: list[Violation], limit: int, more: str) -> list[str]:
    if not vs:
        return []
    by_rule = ", ".join(f"{r} {n}" for r, n in Counter(v.rule for v in vs).most_common())
    out = [f"{title}: {len(vs)} ({by_rule})"]
    for v in vs[:limit]:
        where = f"line {v.line} (row {v.row})" if v.line is not None else "table"
        value = "" if v.value is None else _short(v.value)
        cell = " ".join(x for x in (v.column or "", value) if x)
        out.append(f"  {where}: [{v.rule}] {cell}: {v.message}")
        if v.hint:
            out.append(f"      -> {v.hint}")
    if len(vs) > limit:
        out.append(f"  ... and {len(vs) - limit} more {title.lower()}. {more}".rstrip())
    return out


def _short(value: str, width: int = 60) -> str:
    text = repr(value)  # quotes make doubled/trailing spaces visible
    return text if len(text) <= width else text[: width - 4] + "...'"


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


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
    parsed = _read_csv(_find_csv(dataset, spec.csv_name))
    errors: list[Violation] = list(parsed.problems)
    warnings: list[Violation] = []
    present = [c for c in spec.columns if c.name in parsed.header]
    errors += _column_violations(spec, parsed.header)

    values: dict[str, dict[int, Any]] = {c.name: {} for c in present}
    for rec in parsed.records:
        for col in present:
            problem, value = _check_value(col, rec)
            if problem is not None:
                errors.append(problem)
            else:
                values[col.name][rec.row] = value
    for col in present:
        if col.unique:
            errors += _unique_violations(col, parsed.records)

    root = dataset / spec.images_root
    if "fname" in values:
        errors += _fname_violations(
            spec, parsed.records, values["fname"], root, check_images, workers
        )
    labels_of_row = _tokens(values.get("labels", {}))
    warnings += _duplicate_token_warnings(parsed.records, labels_of_row)
    facts = _Facts(
        n_rows=len(parsed.records) + len(parsed.problems),
        split_of_row=values.get("is_valid", {}),
        labels_of_row=labels_of_row,
        line_of_row={r.row: r.line for r in parsed.records},
        images_root=root,
    )
    for rule in spec.quality:
        found = _quality_violations(rule, facts)
        (warnings if rule.severity == "warning" else errors).extend(found)
    return _build_report(dataset, spec, parsed, values, facts, errors, warnings, check_images)


def _column_violations(spec: CompiledContract, header: list[str]) -> list[Violation]:
    out = []
    for name, n in Counter(header).items():
        if n > 1 and spec.column(name) is not None:
            out.append(
                Violation(
                    None,
                    name,
                    name,
                    "table.duplicate_column",
                    f"column '{name}' appears {n} times in the header",
                    "Keep one column of that name.",
                )
            )
    for col in spec.columns:
        if col.name not in header:
            out.append(
                Violation(
                    None,
                    col.name,
                    None,
                    "table.columns",
                    f"required column '{col.name}' is missing (header: {','.join(header)})",
                    _missing_hint(col.name, header),
                )
            )
    return out


def _missing_hint(name: str, header: list[str]) -> str:
    near = [h for h in header if h.strip().lower() == name]
    if near:
        return f"Rename column {near[0]!r} to '{name}' (no spaces, lower case)."
    if len(header) == 1 and any(d in header[0] for d in ";\t|"):
        return "The file is not comma-separated: save it as CSV with ',' between fields."
    return "The header must be fname,labels,is_valid (extra columns are allowed)."


def _fname_violations(
    spec: CompiledContract,
    records: list[_Record],
    good: dict[int, Any],
    root: Path,
    check_images: bool,
    workers: int | None,
) -> list[Violation]:
    out: list[Violation] = []
    to_open: list[_Record] = []
    for rec in records:
        if rec.row not in good:
            continue
        problem = _path_violation(spec, rec)
        if problem is not None:
            out.append(problem)
        else:
            to_open.append(rec)
    if check_images and root.is_dir():
        out += _image_violations(root, to_open, workers)
    return out


def _tokens(labels: dict[int, Any]) -> dict[int, list[str]]:
    return {row: value.split(" ") if value else [] for row, value in labels.items()}


def _duplicate_token_warnings(
    records: list[_Record], labels_of_row: dict[int, list[str]]
) -> Iterator[Violation]:
    for rec in records:
        tokens = labels_of_row.get(rec.row, [])
        dupes = sorted(t for t, n in Counter(tokens).items() if n > 1)
        if dupes:
            yield _violation(
                rec,
                "labels",
                "labels.duplicate_token",
                f"label(s) repeated in one row: {', '.join(dupes)}",
                "List each label once per row (repeats count once).",
            )


def _build_report(
    dataset: Path,
    spec: CompiledContract,
    parsed: _Csv,
    values: dict[str, dict[int, Any]],
    facts: _Facts,
    errors: list[Violation],
    warnings: list[Violation],
    check_images: bool,
) -> ContractReport:
    splits = facts.split_of_row
    train, valid, total = Counter(), Counter(), Counter()
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
    spec: CompiledContract, records: list[_Record], values: dict[str, dict[int, Any]]
) -> pd.DataFrame:
    """Contract columns, parsed, for the rows whose boolean columns parsed (all rows when ok)."""
    bools = [c.name for c in spec.columns if c.logical_type == "boolean" and c.name in values]
    keep = [r for r in records if all(r.row in values[b] for b in bools)]
    data = {name: [col.get(r.row, r.values[name]) for r in keep] for name, col in values.items()}
    frame = pd.DataFrame(data, columns=list(values))
    return frame.astype({b: bool for b in bools})
