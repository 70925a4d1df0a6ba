"""Read train.csv into records that remember the line each one starts on.

Why not pandas: a report must point at the physical line to fix, and `pd.read_csv` loses it
(quoted fields can span lines). The csv module keeps it, and a file that cannot be read at all
(no folder, no train.csv, empty, not UTF-8, broken quoting) raises DatasetUnusableError with
what to do, while a row of the wrong width is only a violation.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from multitag.data.contract_report import Violation
from multitag.errors import InputError


class DatasetUnusableError(InputError):
    """The dataset cannot be checked at all (no folder, no train.csv, unreadable file).

    An InputError (exit code 2); a dataset that can be read but breaks the contract is not
    an error here but a report with violations (the CLI exits 1 for it)."""


@dataclass
class Record:
    """One data row: 1-based `row`, the `line` it starts on, and its cells by header name."""

    row: int
    line: int
    values: dict[str, str]


@dataclass
class ParsedCsv:
    """The header, the well-formed records, and a violation for each row of the wrong width."""

    header: list[str]
    records: list[Record]
    problems: list[Violation]


def find_csv(dataset: Path, csv_name: str) -> Path:
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


def read_csv(csv_path: Path) -> ParsedCsv:
    """Parse with the csv module so each record keeps the line it starts on."""
    reader = csv.reader(io.StringIO(_decode(csv_path), newline=""), strict=True)
    header: list[str] | None = None
    records: list[Record] = []
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
            records.append(Record(row, start, dict(zip(header, fields_, strict=True))))
    except csv.Error as e:
        raise DatasetUnusableError(
            f"{csv_path} is not a well-formed CSV near line {reader.line_num}: {e}. "
            "A field that starts with a double quote must end with one, and quotes inside it "
            'are doubled ("").'
        ) from e
    assert header is not None  # _decode refused a blank file
    return ParsedCsv(header, records, problems)


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
