"""The data contract: `data_contracts/training_labels.yaml` (ODCS v3) read into column rules.

Why a compiled form: the checks in `contract_rows` and `contract_table` should never look at
YAML. This module reads the document once, refuses anything it cannot honour (an unknown
logicalType, a bad pattern, a quality rule with no implementation), and hands back frozen
specs, so a contract that loads is a contract the checks can enforce exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multitag.errors import InputError

DEFAULT_CONTRACT = Path(__file__).resolve().parents[2] / "data_contracts" / "training_labels.yaml"
CSV_NAME = "train.csv"
_SUPPORTED_TYPES = ("string", "boolean", "integer", "number")
# The text quality rules `contract_table.TEXT_RULE_CHECKS` implements (a test keeps the two
# equal). Listed here so compiling a contract needs no import of the checks.
TEXT_RULES = frozenset(
    {
        "has_training_rows",
        "has_validation_rows",
        "images_root_exists",
        "validation_labels_in_training",
    }
)


class ContractError(InputError, ValueError):
    """The contract YAML itself is malformed or asks for a rule this module does not know.

    An InputError (exit code 2): the contract is an input the run cannot use as given."""


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
    if kind == "text" and name not in TEXT_RULES:
        raise ContractError(
            f"quality rule {name!r} has no implementation in multitag.data.contract_table "
            f"(known: {sorted(TEXT_RULES)}); implement it or remove it from the contract"
        )
    return QualityRule(str(name), kind, severity, str(q.get("description", "")), dict(q))
