"""What a contract check found: violations, the report, and its CSV/text/markdown forms.

Why one home for these: the CLI prints the report, the retrain flow publishes it as a Prefect
artifact and a CSV, and a person sorts that CSV in a spreadsheet; all three must list the same
rows, so they are rendered from one `ContractReport` here. `read_violations_csv` reads the CSV
back, which keeps the file a faithful copy (tests round-trip it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

REPORT_COLUMNS = ("severity", "row", "line", "column", "value", "rule", "message", "hint")


@dataclass(frozen=True)
class Violation:
    """One broken rule; `row`/`line` are None for table-level rules (see `contracts`)."""

    row: int | None
    column: str | None
    value: str | None
    rule: str
    message: str
    hint: str
    line: int | None = None


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
