"""`multitag validate`: exit codes 0/1/2, what a person reads, the CSV report, import cost."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_parser, main
from tests.unit.test_contracts import GOOD_ROWS, csv_text, write_dataset


def test_valid_dataset_exits_0_with_counts_and_label_frequencies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = write_dataset(tmp_path / "ds", csv_text(GOOD_ROWS))

    assert main(["validate", str(ds)]) == 0

    out, err = capsys.readouterr()
    assert "Rows:     4 (train 2, valid 2, 1 without labels)" in out
    assert "cat" in out and "dog" in out
    assert "Contract holds: 0 errors, 0 warnings." in out
    assert err == ""


def test_broken_contract_exits_1_naming_rule_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = write_dataset(tmp_path / "ds", csv_text([*GOOD_ROWS, "e.jpg,dog  cat,False"]))
    (ds / "train" / "e.jpg").write_bytes((ds / "train" / "a.jpg").read_bytes())

    assert main(["validate", str(ds)]) == 1

    out, err = capsys.readouterr()
    assert "line 6 (row 5): [labels.whitespace]" in out
    assert "Contract FAILED: 1 errors" in out
    assert "breaks the data contract" in err and "fix the rows" in err


def test_warnings_alone_still_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = write_dataset(
        tmp_path / "ds",
        csv_text([*GOOD_ROWS, "e.jpg,bird,True"]),
        ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"],
    )

    assert main(["validate", str(ds)]) == 0
    assert "table.validation_labels_in_training" in capsys.readouterr().out


def test_report_csv_has_every_row_while_printing_is_capped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [*GOOD_ROWS, *(f"missing_{i}.jpg,dog,False" for i in range(60))]
    ds = write_dataset(tmp_path / "ds", csv_text(rows))
    report_csv = tmp_path / "reports" / "violations.csv"

    assert main(["validate", str(ds), "--report-csv", str(report_csv), "--max-print", "5"]) == 1

    out = capsys.readouterr().out
    assert out.count("[fname.exists]") == 5
    assert f"... and 55 more errors. All of them are in {report_csv}." in out
    with report_csv.open(newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 60
    assert {r["rule"] for r in records} == {"fname.exists"}
    assert records[0]["line"] == "6" and records[-1]["row"] == "64"


def test_default_cap_points_at_report_csv_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [*GOOD_ROWS, *(f"missing_{i}.jpg,dog,False" for i in range(55))]
    ds = write_dataset(tmp_path / "ds", csv_text(rows))

    assert main(["validate", str(ds)]) == 1

    out = capsys.readouterr().out
    assert out.count("[fname.exists]") == 50
    assert "... and 5 more errors. Rerun with --report-csv PATH" in out


@pytest.mark.parametrize("case", ["no-dir", "no-csv", "not-utf8"])
def test_unusable_input_exits_2_with_message_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    ds = tmp_path / "ds"
    if case == "no-csv":
        (ds / "train").mkdir(parents=True)
    elif case == "not-utf8":
        write_dataset(ds, "fname,labels,is_valid\ncaf\xe9.jpg,dog,False\n".encode("latin-1"))

    assert main(["validate", str(ds)]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("multitag validate: cannot use this dataset:")
    assert {"no-dir": "not found", "no-csv": "no train.csv", "not-utf8": "UTF-8"}[case] in err


def test_json_answers_with_one_object_for_each_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """0 contract holds, 1 broken (the violations listed), 2 unusable: stdout is JSON only."""
    good = write_dataset(tmp_path / "good", csv_text(GOOD_ROWS))
    bad = write_dataset(tmp_path / "bad", csv_text([*GOOD_ROWS, "../x.jpg,dog,False"]))

    assert main(["validate", str(good), "--json"]) == 0
    out, err = capsys.readouterr()
    held = json.loads(out)
    assert (held["ok"], held["exit_code"], held["n_rows"], held["errors"]) == (True, 0, 4, [])
    assert "Contract holds" in err  # the text for people, on stderr

    assert main(["validate", str(bad), "--json"]) == 1
    broken = json.loads(capsys.readouterr().out)
    assert broken["exit_code"] == 1 and not broken["ok"] and "breaks" in broken["error"]
    assert [v["rule"] for v in broken["errors"]] == ["fname.inside_root"]

    assert main(["validate", str(tmp_path / "nope"), "--json"]) == 2
    unusable = json.loads(capsys.readouterr().out)
    assert unusable["exit_code"] == 2 and "not found" in unusable["error"]


def test_bad_arguments_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["validate"]) == 2
    assert main(["--help"]) == 0
    assert "validate" in capsys.readouterr().out
    assert build_parser().parse_args(["validate", "x"]).func.__name__ == "_cmd_validate"


def _console_script() -> Path:
    script = Path(sys.executable).with_name("multitag")
    if not script.exists():
        pytest.fail(f"{script} missing: install the project with `pip install -e .` (make venv)")
    return script


def test_console_script_runs_in_a_real_process(tmp_path: Path) -> None:
    good = write_dataset(tmp_path / "good", csv_text(GOOD_ROWS))
    bad = write_dataset(tmp_path / "bad", csv_text([*GOOD_ROWS, "../x.jpg,dog,False"]))

    ok = subprocess.run([_console_script(), "validate", good], capture_output=True, text=True)
    failed = subprocess.run([_console_script(), "validate", bad], capture_output=True, text=True)
    unusable = subprocess.run(
        [_console_script(), "validate", tmp_path / "nope"], capture_output=True, text=True
    )

    assert (ok.returncode, failed.returncode, unusable.returncode) == (0, 1, 2), failed.stderr
    assert "fname.inside_root" in failed.stdout
    assert "not found" in unusable.stderr and "Traceback" not in unusable.stderr


def test_cli_import_stays_light() -> None:
    """`multitag --help` must not pay for pandas, torch, fastai or prefect."""
    code = (
        "import sys, flows.cli; "
        "print(sorted(m for m in ('pandas', 'torch', 'fastai', 'prefect', 'PIL') "
        "if m in sys.modules))"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert done.stdout.strip() == "[]"
