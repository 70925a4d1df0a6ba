"""What a fast-path check measured, and the per-machine cache of it.

Why a module of its own: the record (`fastpath.json`) is the contract between the export-time
check (multitag.inference.measure), the registry that stores it, and the tagging run that only
reads it (multitag.inference.selection); the cache rules (keyed by the model file's sha256
and the onnxruntime + torch versions; a file that no longer matches its recorded sha256 is
never loaded) belong with it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from multitag.errors import RunFailedError
from multitag.hashing import sha256_file
from multitag.registry import cache_dir
from multitag.runtime import library_versions

log = logging.getLogger(__name__)

FASTPATH_FORMAT = "multitag-fastpath/1"
RECORD_FILE = "fastpath.json"
FP32_ONNX = "model.fp32.onnx"
INT8_ONNX = "model.int8.onnx"
TORCH_PROGRAM = "model.pt2"  # torch.export of the fp32 model, run under bf16 autocast
AOTI_PACKAGE = "model.bf16.aoti.pt2"  # AOTInductor-compiled bf16 program (native code)
DEFAULT_AGREEMENT_BAR = 0.995
# Candidate names, as recorded and as accepted by `scorers.make_scorer`.
ORT_INT8 = "onnx-int8"
TORCH_BF16 = "torch-bf16"
AOTI_BF16 = "aoti-bf16"
ORT_FP32 = "onnx-fp32"
TORCH_FP32 = "torch-fp32"
# The builds a record is measured with and keyed by (imported: torch's local label counts).
RECORD_LIBRARIES = ("onnxruntime", "torch")


class FastPathError(RunFailedError):
    """A fast path cannot be built or used; the message says what to do instead."""


@dataclass
class CandidateResult:
    name: str
    agreement: float  # share of image-label decisions equal to torch fp32 on the check set
    images_per_s: float  # on the check set, same process, after a warm-up batch
    max_abs_diff: float  # largest |score - fp32 score|
    n_flips: int
    file: str | None = None  # the candidate's model file in the record's folder
    sha256: str | None = None
    requires: list[str] | None = None  # CPU flags its native code needs (compiled candidates)


@dataclass
class FastPathRecord:
    """What was measured for one model file; `fastpath.json` in its cache folder."""

    model_sha256: str
    versions: dict[str, str]
    created_at: str
    bar: float
    n_calibration: int
    n_check: int
    n_labels: int
    candidates: dict[str, CandidateResult]
    chosen: str
    reason: str
    build_s: float
    format: str = FASTPATH_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FastPathRecord:
        if data.get("format") != FASTPATH_FORMAT:
            raise FastPathError(
                f"fast-path record format {data.get('format')!r} is not {FASTPATH_FORMAT}"
            )
        cands = {k: CandidateResult(**v) for k, v in data["candidates"].items()}
        return cls(**{**data, "candidates": cands})


def record_dir(model_sha256: str, root: Path | None = None) -> Path:
    """Cache folder of one model file under one onnxruntime/torch pair."""
    v = library_versions(RECORD_LIBRARIES, loaded=True)
    key = f"{model_sha256[:32]}-ort{v['onnxruntime']}-torch{v['torch']}"
    return (root or cache_dir() / "fastpath") / key.replace("+", "_")


def load_record(model_sha256: str, root: Path | None = None) -> FastPathRecord | None:
    """The cached record, or None when absent or when any file fails its sha256 check."""
    folder = record_dir(model_sha256, root)
    path = folder / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = FastPathRecord.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, FastPathError) as exc:
        log.warning("fast-path record %s is unreadable (%s): rebuilding it", path, exc)
        return None
    if record.model_sha256 != model_sha256:
        log.warning("fast-path record %s belongs to another model: rebuilding it", path)
        return None
    for cand in record.candidates.values():
        if cand.file is None:
            continue
        f = folder / cand.file
        if not f.is_file() or sha256_file(f) != cand.sha256:
            log.warning(
                "cached %s does not match its recorded sha256: rebuilding the fast "
                "path (never loading a changed model file)",
                f,
            )
            return None
    return record
