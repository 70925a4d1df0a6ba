"""Names and places in the registry: file names, version ids, URIs, and its JSON encoding.

Why one module: every other registry module agrees on these, and a version folder written by
one release must be read by the next; the layout is documented in `multitag.registry`.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from multitag.config import get_settings
from multitag.registry.errors import RegistryError
from multitag.storage import join

MODEL_FILE = "model.pkl"
VERSION_FILE = "version.json"
THRESHOLDS_FILE = "thresholds.json"
METRICS_FILE = "metrics.json"
INFERENCE_FILE = "inference.json"
REPORT_FILE = "report.md"
SUMS_FILE = "SHA256SUMS"
FASTPATH_FILE = "fastpath.json"  # multitag.inference.fastpath's export-time record (optional)
CALIBRATION_FILE = "calibration.json"  # multitag.training.calibration's per-label map (optional)
CHAMPION_FILE = "champion.json"
CHAIN_DIR = "_champion"
DECISIONS_DIR = "_decisions"

REQUIRED_FILES = (MODEL_FILE, VERSION_FILE, THRESHOLDS_FILE, METRICS_FILE, INFERENCE_FILE)
REGISTRY_OWNED = frozenset({*REQUIRED_FILES, SUMS_FILE})
# Version ids and file names become folder and cache paths: plain and traversal-free.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def models_uri(home: str | None) -> str:
    return get_settings(home).models


def version_uri(home: str | None, version: str) -> str:
    check_version_id(version)
    return join(models_uri(home), version)


def check_version_id(version: str) -> None:
    # Version ids become folder names and cache paths: keep them plain and traversal-free.
    if not isinstance(version, str) or not VERSION_RE.match(version) or ".." in version:
        raise RegistryError(
            f"invalid model version id {version!r}: use letters, digits, '.', '_' and '-' "
            "(at most 100 characters, starting with a letter or digit)"
        )
    if version == CHAMPION_FILE:
        raise RegistryError(f"{version!r} is reserved by the registry; choose another version id")


def new_version_id(model_sha256: str, when: datetime | None = None) -> str:
    """`20261128T123456Z-ab12cd`: sorts by creation time, and names the model bytes it holds."""
    when = (when or datetime.now(UTC)).astimezone(UTC)
    return f"{when:%Y%m%dT%H%M%SZ}-{model_sha256[:6]}"


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays (no numpy import needed) and paths; anything else is a caller bug.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable: {obj!r}")


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, default=_json_default) + "\n").encode("utf-8")


def loads_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{what} is not valid JSON: {exc}") from exc


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_time(when: datetime) -> str:
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")
