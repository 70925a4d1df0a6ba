"""Data-contract checks of a training dataset: one bad CSV per rule, the quirks that must pass."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest
import yaml
from PIL import Image

from multitag.data.contracts import (
    DEFAULT_CONTRACT,
    ContractError,
    ContractReport,
    DatasetUnusableError,
    Violation,
    compile_contract,
    load_contract,
    read_violations_csv,
    validate_dataset,
)

HEADER = "fname,labels,is_valid"
GOOD_ROWS = ["a.jpg,dog,False", "b.jpg,cat dog,False", "c.jpg,,True", "d.jpg,cat,True"]


@cache
def jpeg_bytes(shade: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade % 256, 40, 90)).save(buf, "JPEG")
    return buf.getvalue()


def write_dataset(
    root: Path,
    csv: str | bytes,
    images: Iterable[str] = ("a.jpg", "b.jpg", "c.jpg", "d.jpg"),
) -> Path:
    """A dataset folder: train.csv exactly as given, and tiny real JPEGs under train/."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_bytes(csv.encode() if isinstance(csv, str) else csv)
    for i, name in enumerate(images):
        path = root / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(i))
    return root


def csv_text(rows: Iterable[str], header: str = HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


def rules_at(vs: list[Violation]) -> set[tuple[str, int | None, int | None]]:
    return {(v.rule, v.row, v.line) for v in vs}


# ---------------------------------------------------------------------------------------------
# The happy path and the quirks that must pass
# ---------------------------------------------------------------------------------------------


def test_good_dataset_passes_with_counts_and_parsed_table(tmp_path: Path) -> None:
    report = validate_dataset(write_dataset(tmp_path / "ds", csv_text(GOOD_ROWS)))

    assert report.ok, report.format_text()
    assert report.errors == [] and report.warnings == []
    assert (report.n_rows, report.n_train, report.n_valid, report.n_unlabelled) == (4, 2, 2, 1)
    assert report.label_counts == {"cat": 2, "dog": 2}
    assert report.label_counts_train == {"cat": 1, "dog": 2}
    assert report.label_counts_valid == {"cat": 1}
    assert list(report.table.columns) == ["fname", "labels", "is_valid"]
    assert report.table["is_valid"].dtype == bool
    assert report.table["is_valid"].tolist() == [False, False, True, True]
    assert report.table["labels"].tolist() == ["dog", "cat dog", "", "cat"]


def test_csv_quirks_pass(tmp_path: Path) -> None:
    """BOM, CRLF, quoted fields (comma inside), empty labels, extra columns, blank lines."""
    raw = (
        "\ufefffname,labels,is_valid,source,notes\r\n"
        '"a,1.jpg","dog",False,web,"said ""hi"""\r\n'
        "b.jpg,,True,web,\r\n"
        '"c.jpg","cat dog","True",scan,"two\r\nlines"\r\n'
        "d.jpg,cat,false,scan,x\r\n"
        "\r\n\r\n   \r\n"
    )
    ds = write_dataset(tmp_path / "ds", raw.encode("utf-8"), ["a,1.jpg", "b.jpg", "c.jpg", "d.jpg"])

    report = validate_dataset(ds)

    assert report.ok, report.format_text()
    assert report.n_rows == 4
    assert report.table["fname"].tolist() == ["a,1.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert report.table["labels"].tolist() == ["dog", "", "cat dog", "cat"]
    assert report.table["is_valid"].tolist() == [False, True, True, False]
    assert list(report.table.columns) == ["fname", "labels", "is_valid"]  # extras ignored


def test_line_numbers_follow_multiline_records(tmp_path: Path) -> None:
    """`line` is where the record starts in the file, even after a quoted newline."""
    raw = csv_text(
        ['a.jpg,dog,False,"one\ntwo\nthree"', "", "b.jpg,dog,maybe,x"],
        header="fname,labels,is_valid,notes",
    )
    report = validate_dataset(write_dataset(tmp_path / "ds", raw))

    (bad,) = [v for v in report.errors if v.rule == "is_valid.type"]
    assert (bad.row, bad.line) == (2, 6)  # header 1, record 2-4, blank 5


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("True", True),
        ("False", False),
        ("true", True),
        ("false", False),
        ("TRUE", True),
        ("FALSE", False),
        ("1", True),
        ("0", False),
        ("yes", True),
        ("No", False),
        (" True ", True),
        ("False ", False),
    ],
)
def test_is_valid_spellings_parse_to_real_bools(tmp_path: Path, spelling: str, expected: bool):
    other = "True" if not expected else "False"
    rows = [f"a.jpg,dog,{spelling}", f"b.jpg,dog,{other}"]
    report = validate_dataset(write_dataset(tmp_path / "ds", csv_text(rows), ["a.jpg", "b.jpg"]))

    assert report.ok, report.format_text()
    value = report.table["is_valid"].iloc[0]
    assert value is expected or value == expected
    assert report.table["is_valid"].dtype == bool  # never the string 'False' (truthy)


def test_larger_dataset_is_fast_and_finds_the_one_bad_row(tmp_path: Path) -> None:
    n = 1500
    names = [f"sub{i % 7}/img_{i:05d}.jpg" for i in range(n)]
    labels = ["circle", "square", "triangle", "star square", "", "ring cross"]
    rows = [f"{name},{labels[i % 6]},{i % 5 == 0}" for i, name in enumerate(names)]
    rows[1233] = f"{names[1233]},star  ring,False"
    ds = write_dataset(tmp_path / "ds", csv_text(rows), names)

    report = validate_dataset(ds)

    assert rules_at(report.errors) == {("labels.whitespace", 1234, 1235)}
    assert report.n_rows == n and report.n_valid == n // 5 and report.n_train == n - n // 5
    assert report.label_counts["square"] == 500 - 1  # row 1234 had "star square"
    assert len(report.table) == n


# ---------------------------------------------------------------------------------------------
# One bad CSV per rule
# ---------------------------------------------------------------------------------------------

ROW_RULES = [
    # (id, bad row appended as data row 5 / line 6, expected rule)
    ("fname-required", ",dog,False", "fname.required"),
    ("fname-required-blank", "  ,dog,False", "fname.required"),
    ("fname-unique", "a.jpg,cat,True", "fname.unique"),
    ("fname-backslash", "sub\\e.jpg,dog,False", "fname.pattern"),
    ("fname-backslash-dotdot", "..\\..\\e.jpg,dog,False", "fname.pattern"),
    ("fname-control-char", "e\x01.jpg,dog,False", "fname.pattern"),
    ("fname-absolute", "/etc/e.jpg,dog,False", "fname.relative"),
    ("fname-unc", "//server/share/e.jpg,dog,False", "fname.relative"),
    ("fname-drive", "C:/data/e.jpg,dog,False", "fname.relative"),
    ("fname-drive-relative", "c:e.jpg,dog,False", "fname.relative"),
    ("fname-dotdot", "../e.jpg,dog,False", "fname.inside_root"),
    ("fname-dotdot-deep", "sub/../../e.jpg,dog,False", "fname.inside_root"),
    ("fname-extension", "notes.txt,dog,False", "fname.extension"),
    ("fname-no-extension", "e,dog,False", "fname.extension"),
    ("fname-too-long", f"{'x' * 1100}.jpg,dog,False", "fname.length"),
    ("fname-missing-file", "missing.jpg,dog,False", "fname.exists"),
    ("fname-folder", "folder.jpg,dog,False", "fname.exists"),
    ("fname-truncated", "trunc.jpg,dog,False", "fname.decodes"),
    ("fname-text-as-jpg", "text.jpg,dog,False", "fname.decodes"),
    ("fname-empty-file", "empty.png,dog,False", "fname.decodes"),
    ("labels-comma", 'e.jpg,"dog,cat",False', "labels.pattern"),
    ("labels-semicolon", "e.jpg,dog;cat,False", "labels.pattern"),
    ("labels-non-ascii", "e.jpg,chien dög,False", "labels.pattern"),
    ("labels-double-space", "e.jpg,dog  cat,False", "labels.whitespace"),
    ("labels-leading-space", "e.jpg, dog,False", "labels.whitespace"),
    ("labels-trailing-space", "e.jpg,dog ,False", "labels.whitespace"),
    ("labels-only-space", "e.jpg, ,False", "labels.whitespace"),
    ("labels-tab", "e.jpg,dog\tcat,False", "labels.whitespace"),
    ("labels-newline", 'e.jpg,"dog\n",False', "labels.whitespace"),
    ("is_valid-word", "e.jpg,dog,maybe", "is_valid.type"),
    ("is_valid-two", "e.jpg,dog,2", "is_valid.type"),
    ("is_valid-empty", "e.jpg,dog,", "is_valid.required"),
    ("too-many-fields", "e.jpg,dog,False,extra", "row.field_count"),
    ("too-few-fields", "e.jpg,dog", "row.field_count"),
]


def _extra_files(train: Path) -> None:
    """Files the bad rows point at: a good e.jpg, a folder, corrupt images."""
    (train / "e.jpg").write_bytes(jpeg_bytes(7))
    (train / "folder.jpg").mkdir()
    (train / "trunc.jpg").write_bytes(jpeg_bytes(9)[: len(jpeg_bytes(9)) // 2])
    (train / "text.jpg").write_text("this is not a JPEG\n")
    (train / "empty.png").write_bytes(b"")


@pytest.mark.parametrize(
    ("bad_row", "rule"), [r[1:] for r in ROW_RULES], ids=[r[0] for r in ROW_RULES]
)
def test_each_row_rule_is_reported_at_its_row(tmp_path: Path, bad_row: str, rule: str) -> None:
    ds = write_dataset(tmp_path / "ds", csv_text([*GOOD_ROWS, bad_row]))
    _extra_files(ds / "train")

    report = validate_dataset(ds)

    assert not report.ok
    assert rules_at(report.errors) == {(rule, 5, 6)}, report.format_text()
    (v,) = report.errors
    assert v.hint and v.message
    assert v.column == (None if rule == "row.field_count" else rule.split(".")[0])


def test_unique_names_every_repeat_and_points_at_the_first(tmp_path: Path) -> None:
    rows = [*GOOD_ROWS, "b.jpg,cat,True", "b.jpg,dog,False"]
    report = validate_dataset(write_dataset(tmp_path / "ds", csv_text(rows)))

    assert rules_at(report.errors) == {("fname.unique", 5, 6), ("fname.unique", 6, 7)}
    assert all("row 2 (line 3)" in v.message for v in report.errors)


def test_symlink_escaping_the_images_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(jpeg_bytes(3))
    ds = write_dataset(tmp_path / "ds", csv_text([*GOOD_ROWS, "link.jpg,dog,False"]))
    os.symlink(outside, ds / "train" / "link.jpg")

    report = validate_dataset(ds)

    assert rules_at(report.errors) == {("fname.inside_root", 5, 6)}


def test_missing_file_hint_names_a_case_mismatch(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path / "ds", csv_text([*GOOD_ROWS, "E.JPG,dog,False"]))
    (ds / "train" / "e.jpg").write_bytes(jpeg_bytes(1))

    (v,) = validate_dataset(ds).errors

    assert v.rule == "fname.exists" and "e.jpg" in v.hint


def test_skip_images_checks_paths_but_does_not_open_files(tmp_path: Path) -> None:
    ds = write_dataset(
        tmp_path / "ds", csv_text([*GOOD_ROWS, "trunc.jpg,dog,False", "../x.jpg,,True"])
    )
    _extra_files(ds / "train")

    report = validate_dataset(ds, check_images=False)

    assert rules_at(report.errors) == {("fname.inside_root", 6, 7)}
    assert not report.images_checked


TABLE_RULES = [
    ("no-rows", [], "table.not_empty"),
    ("no-training-rows", ["a.jpg,dog,True", "b.jpg,cat,True"], "table.has_training_rows"),
    ("no-validation-rows", ["a.jpg,dog,False", "b.jpg,cat,0"], "table.has_validation_rows"),
]


@pytest.mark.parametrize(
    ("rows", "rule"), [r[1:] for r in TABLE_RULES], ids=[r[0] for r in TABLE_RULES]
)
def test_each_table_rule_is_reported(tmp_path: Path, rows: list[str], rule: str) -> None:
    report = validate_dataset(write_dataset(tmp_path / "ds", csv_text(rows)))

    assert {v.rule for v in report.errors} == {rule}, report.format_text()
    assert report.errors[0].row is None


def test_missing_images_folder_is_one_error_not_one_per_row(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path / "ds", csv_text(GOOD_ROWS), images=[])

    report = validate_dataset(ds)

    assert rules_at(report.errors) == {("table.images_root_exists", None, None)}


def test_missing_column_is_a_violation_with_a_rename_hint(tmp_path: Path) -> None:
    raw = csv_text(["a.jpg,dog,False", "b.jpg,cat,True"], header="fname,labels, is_valid")
    report = validate_dataset(write_dataset(tmp_path / "ds", raw))

    (v,) = report.errors
    assert (v.rule, v.column, v.row) == ("table.columns", "is_valid", None)
    assert "' is_valid'" in v.hint
    assert report.n_train == report.n_valid == 0  # no split without the column


def test_semicolon_file_gets_a_delimiter_hint(tmp_path: Path) -> None:
    raw = "fname;labels;is_valid\na.jpg;dog;False\n"
    report = validate_dataset(write_dataset(tmp_path / "ds", raw))

    assert {v.rule for v in report.errors} == {"table.columns"}
    assert all("comma-separated" in v.hint for v in report.errors)


def test_duplicate_contract_column_is_reported(tmp_path: Path) -> None:
    raw = csv_text(["a.jpg,dog,False,x", "b.jpg,cat,True,y"], header="fname,labels,is_valid,labels")
    report = validate_dataset(write_dataset(tmp_path / "ds", raw))

    assert "table.duplicate_column" in {v.rule for v in report.errors}


# ---------------------------------------------------------------------------------------------
# Warnings are kept apart from errors
# ---------------------------------------------------------------------------------------------


def test_label_only_in_validation_is_a_warning_not_an_error(tmp_path: Path) -> None:
    rows = [*GOOD_ROWS, "e.jpg,bird,True", "f.jpg,bird cat,True"]
    ds = write_dataset(
        tmp_path / "ds", csv_text(rows), ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]
    )

    report = validate_dataset(ds)

    assert report.ok and report.errors == []
    (w,) = report.warnings
    assert (w.rule, w.row, w.line, w.value) == ("table.validation_labels_in_training", 5, 6, "bird")


def test_repeated_label_in_a_row_is_a_warning(tmp_path: Path) -> None:
    rows = ["a.jpg,dog dog,False", "b.jpg,dog,True"]
    report = validate_dataset(write_dataset(tmp_path / "ds", csv_text(rows), ["a.jpg", "b.jpg"]))

    assert report.ok
    assert rules_at(report.warnings) == {("labels.duplicate_token", 1, 2)}
    assert report.label_counts == {"dog": 2}  # rows carrying the label, repeats count once


def test_errors_and_warnings_together(tmp_path: Path) -> None:
    rows = [*GOOD_ROWS, "e.jpg,bird,True", "missing.jpg,dog,False"]
    ds = write_dataset(
        tmp_path / "ds", csv_text(rows), ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    )

    report = validate_dataset(ds)

    assert rules_at(report.errors) == {("fname.exists", 6, 7)}
    assert {v.rule for v in report.warnings} == {"table.validation_labels_in_training"}
    assert report.summary()["n_errors"] == 1 and report.summary()["n_warnings"] == 1


# ---------------------------------------------------------------------------------------------
# Unusable input
# ---------------------------------------------------------------------------------------------


def test_missing_folder_is_unusable(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnusableError, match="not found"):
        validate_dataset(tmp_path / "nope")


def test_csv_passed_instead_of_folder_points_at_the_folder(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path / "ds", csv_text(GOOD_ROWS))
    with pytest.raises(DatasetUnusableError, match="Pass its folder"):
        validate_dataset(ds / "train.csv")


def test_no_train_csv_names_a_nested_candidate(tmp_path: Path) -> None:
    write_dataset(tmp_path / "outer" / "pascal", csv_text(GOOD_ROWS))
    with pytest.raises(DatasetUnusableError, match="pascal"):
        validate_dataset(tmp_path / "outer")


def test_no_train_csv_lists_the_folder(tmp_path: Path) -> None:
    (tmp_path / "ds" / "images").mkdir(parents=True)
    with pytest.raises(DatasetUnusableError, match="images"):
        validate_dataset(tmp_path / "ds")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "empty"),
        (b"\n\n  \n", "empty"),
        ("fname,labels,is_valid\ncaf\xe9.jpg,dog,False\n".encode("latin-1"), "not UTF-8.*line 2"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01", "not UTF-8"),
        (b"fname,labels,is_valid\na.jpg,dog,False\x00\n", "NUL"),
        (b'fname,labels,is_valid\n"a.jpg,dog,False\nb.jpg,cat,True\n', "well-formed CSV"),
        (b'fname,labels,is_valid\na.jpg,"dog"cat,False\n', "well-formed CSV.*line 2"),
    ],
    ids=["empty", "blank", "latin1", "binary", "nul", "unclosed-quote", "junk-after-quote"],
)
def test_unreadable_csv_is_unusable(tmp_path: Path, raw: bytes, match: str) -> None:
    ds = write_dataset(tmp_path / "ds", raw)
    with pytest.raises(DatasetUnusableError, match=match):
        validate_dataset(ds)


# ---------------------------------------------------------------------------------------------
# The contract drives the checks
# ---------------------------------------------------------------------------------------------


def _edited_contract(tmp_path: Path, edit) -> Path:
    doc = load_contract()
    edit(doc)
    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _prop(doc: dict, name: str) -> dict:
    return next(p for p in doc["schema"][0]["properties"] if p["name"] == name)


def test_shipped_contract_is_odcs_v3_and_compiles() -> None:
    doc = load_contract()
    assert doc["apiVersion"].startswith("v3.0.") and doc["kind"] == "DataContract"
    spec = compile_contract(doc)
    assert [c.name for c in spec.columns] == ["fname", "labels", "is_valid"]
    fname = spec.column("fname")
    assert fname is not None and fname.required and fname.unique
    assert spec.column("is_valid").logical_type == "boolean"
    assert spec.images_root == "train" and ".jpg" in spec.image_extensions
    assert DEFAULT_CONTRACT.name == "training_labels.yaml"


def test_label_pattern_comes_from_the_contract(tmp_path: Path) -> None:
    contract = _edited_contract(
        tmp_path,
        lambda d: _prop(d, "labels")["logicalTypeOptions"].update(pattern="^([a-z]+( [a-z]+)*)?$"),
    )
    rows = ["a.jpg,dog,False", "b.jpg,Cat,True"]
    ds = write_dataset(tmp_path / "ds", csv_text(rows), ["a.jpg", "b.jpg"])

    assert validate_dataset(ds).ok
    assert rules_at(validate_dataset(ds, contract).errors) == {("labels.pattern", 2, 3)}


def test_boolean_spellings_come_from_the_contract(tmp_path: Path) -> None:
    def strict_bools(doc: dict) -> None:
        _prop(doc, "is_valid")["customProperties"] = [
            {"property": "trueValues", "value": ["true"]},
            {"property": "falseValues", "value": ["false"]},
        ]

    contract = _edited_contract(tmp_path, strict_bools)
    ds = write_dataset(
        tmp_path / "ds",
        csv_text(["a.jpg,dog,0", "b.jpg,dog,True", "c.jpg,dog,false"]),
        ["a.jpg", "b.jpg", "c.jpg"],
    )

    assert rules_at(validate_dataset(ds, contract).errors) == {("is_valid.type", 1, 2)}


def test_required_and_unique_come_from_the_contract(tmp_path: Path) -> None:
    def loosen(doc: dict) -> None:
        _prop(doc, "fname")["unique"] = False
        _prop(doc, "labels")["required"] = True

    contract = _edited_contract(tmp_path, loosen)
    rows = ["a.jpg,dog,False", "a.jpg,,True"]
    ds = write_dataset(tmp_path / "ds", csv_text(rows), ["a.jpg"])

    assert rules_at(validate_dataset(ds, contract).errors) == {("labels.required", 2, 3)}


def test_quality_severity_comes_from_the_contract(tmp_path: Path) -> None:
    def soften(doc: dict) -> None:
        for q in doc["schema"][0]["quality"]:
            if q["name"] == "has_validation_rows":
                q["severity"] = "warning"

    contract = _edited_contract(tmp_path, soften)
    ds = write_dataset(tmp_path / "ds", csv_text(["a.jpg,dog,False"]), ["a.jpg"])

    report = validate_dataset(ds, contract)
    assert report.ok
    assert {v.rule for v in report.warnings} == {"table.has_validation_rows"}


def test_contract_with_unimplemented_rule_is_refused(tmp_path: Path) -> None:
    def add_rule(doc: dict) -> None:
        doc["schema"][0]["quality"].append({"name": "labels_are_spelled_right", "type": "text"})

    contract = _edited_contract(tmp_path, add_rule)
    ds = write_dataset(tmp_path / "ds", csv_text(GOOD_ROWS))
    with pytest.raises(ContractError, match="labels_are_spelled_right"):
        validate_dataset(ds, contract)


def test_every_known_text_rule_has_a_check_and_every_check_is_known() -> None:
    # compile_contract admits the names in contract_spec.TEXT_RULES without importing the
    # checks; a name there without a check would pass compilation and crash validation.
    from multitag.data import contract_spec, contract_table

    assert set(contract_table.TEXT_RULE_CHECKS) == contract_spec.TEXT_RULES
    doc = load_contract(DEFAULT_CONTRACT)
    used = {q["name"] for q in doc["schema"][0]["quality"] if q.get("type") == "text"}
    assert used <= contract_spec.TEXT_RULES


def test_not_an_odcs_document_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kind: Something\napiVersion: v2\n")
    with pytest.raises(ContractError, match="ODCS v3"):
        load_contract(path)


# ---------------------------------------------------------------------------------------------
# Report output
# ---------------------------------------------------------------------------------------------


def _mixed_report(tmp_path: Path) -> ContractReport:
    rows = [
        *GOOD_ROWS,
        '"we,ird ""q"".jpg",dog,False',
        "e.jpg,bird,True",
        'f.jpg,"dog\n cat",False',
        "a.jpg,dog|cat,False",
    ]
    ds = write_dataset(
        tmp_path / "ds", csv_text(rows), ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]
    )
    return validate_dataset(ds)


def test_to_csv_round_trips_every_violation(tmp_path: Path) -> None:
    report = _mixed_report(tmp_path)
    assert len(report.errors) >= 4 and report.warnings

    path = report.to_csv(tmp_path / "out" / "report.csv")
    back = read_violations_csv(path)

    assert back["error"] == report.errors
    assert back["warning"] == report.warnings
    assert 'we,ird "q".jpg' in {v.value for v in back["error"]}


def test_clean_report_csv_has_only_the_header(tmp_path: Path) -> None:
    report = validate_dataset(write_dataset(tmp_path / "ds", csv_text(GOOD_ROWS)))
    path = report.to_csv(tmp_path / "r.csv")
    assert path.read_text().strip() == "severity,row,line,column,value,rule,message,hint"


def test_text_markdown_and_summary(tmp_path: Path) -> None:
    report = _mixed_report(tmp_path)

    text = report.format_text(limit=2, more="See the CSV.")
    assert "Contract FAILED" in text and "more errors. See the CSV." in text
    assert "line 6 (row 5)" in text and "fname.exists" in text

    md = report.to_markdown()
    assert md.startswith("# Data contract **FAILED**")
    assert "dog\\|cat" in md  # a pipe in a value does not break the table
    assert "| bird | 0 | 1 | 1 |" in md

    summary = report.summary()
    json.dumps(summary)  # JSON-ready for logs and artifacts
    assert summary["ok"] is False
    assert summary["errors_by_rule"]["labels.pattern"] == 1
    assert sum(summary["errors_by_rule"].values()) == len(report.errors)


def test_violation_order_follows_the_file(tmp_path: Path) -> None:
    report = _mixed_report(tmp_path)
    rows = [v.row or 0 for v in report.errors]
    assert rows == sorted(rows)
