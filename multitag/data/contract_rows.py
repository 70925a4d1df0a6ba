"""Row checks: each cell against its column's rules, and `fname` against the disk.

Why per cell, first failure only: a person fixes one thing per cell at a time, and a list of
five complaints about one empty value hides the other rows. The order is required, length,
pattern, type, then (for `fname`) the path rules before any file is opened. What YAML cannot
say lives here too: paths stay inside the images root, files exist and decode. Images are
opened in threads because Pillow releases the GIL while decoding.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from multitag.data.contract_csv import Record
from multitag.data.contract_report import Violation
from multitag.data.contract_spec import ColumnSpec, CompiledContract

_DRIVE = re.compile(r"^[A-Za-z]:")

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


def _violation(rec: Record, column: str, rule: str, message: str, hint: str = "") -> Violation:
    return Violation(
        rec.row, column, rec.values.get(column), rule, message, hint or _hint(rule), rec.line
    )


def check_value(spec: ColumnSpec, rec: Record) -> tuple[Violation | None, Any]:
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


def _pattern_violation(spec: ColumnSpec, rec: Record, value: str) -> Violation:
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


def _parse_type(spec: ColumnSpec, rec: Record, value: str) -> tuple[Violation | None, Any]:
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


def unique_violations(spec: ColumnSpec, records: Iterable[Record]) -> list[Violation]:
    """Every repeat of a value after its first occurrence (empty cells are `required`'s job)."""
    first: dict[str, Record] = {}
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


def _path_violation(contract: CompiledContract, rec: Record) -> Violation | None:
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


def _image_violations(root: Path, recs: list[Record], workers: int | None) -> list[Violation]:
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda r: _check_image(root, r.values["fname"]), recs))
    out = []
    for rec, result in zip(recs, results, strict=True):
        if result is not None:
            rule, message = result
            out.append(_violation(rec, "fname", rule, message, _image_hint(rule, root, rec)))
    return out


def _image_hint(rule: str, root: Path, rec: Record) -> str:
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
# Header, and the per-row passes the entry point runs
# ---------------------------------------------------------------------------------------------


def column_violations(spec: CompiledContract, header: list[str]) -> list[Violation]:
    """Header problems: a contract column missing or appearing twice."""
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


def fname_violations(
    spec: CompiledContract,
    records: list[Record],
    good: dict[int, Any],
    root: Path,
    check_images: bool,
    workers: int | None,
) -> list[Violation]:
    """Path rules for each `fname` that parsed, then (optionally) open the images."""
    out: list[Violation] = []
    to_open: list[Record] = []
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


def duplicate_token_warnings(
    records: list[Record], labels_of_row: dict[int, list[str]]
) -> Iterator[Violation]:
    """A label listed twice in one row: harmless (it counts once) but worth fixing."""
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
