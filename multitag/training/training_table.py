"""train.csv as the exact table training needs: real booleans, single-spaced labels.

Why before fastai: fastai reads the table without complaint when it is wrong in ways that
ruin a run (`ColSplitter` treats the string 'False' as true; a doubled space becomes an
empty-string class), so it is coerced and checked here first. No fastai or torch here, so
these checks (and TrainingError, which every training step raises) import in milliseconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from multitag.errors import MultitagError

REQUIRED_COLUMNS = ("fname", "labels", "is_valid")
_BOOL_SPELLINGS = {"true": True, "false": False, "1": True, "0": False}


class TrainingError(MultitagError):
    """Training cannot start or finish; the message says what to change."""


def read_training_table(dataset_dir: Path) -> pd.DataFrame:
    """Parse train.csv into fname (str), labels (str, '' = none), is_valid (real bool).

    Why not `pd.read_csv` defaults: an empty labels cell would become NaN, and fastai's
    ColSplitter treats the *string* 'False' as true, putting every row in validation.
    """
    path = Path(dataset_dir) / "train.csv"
    if not path.is_file():
        raise TrainingError(f"{path} not found: a dataset needs train.csv next to train/.")
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    return normalise_table(raw, source=str(path))


def normalise_table(table: pd.DataFrame, source: str = "table") -> pd.DataFrame:
    """Coerce a parsed table (ours or the contract report's) to the exact types training needs."""
    table = table.rename(columns=lambda c: str(c).strip())
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise TrainingError(f"{source}: missing column(s) {missing}; expected {REQUIRED_COLUMNS}.")
    out = pd.DataFrame(
        {
            "fname": table["fname"].astype(str).str.strip(),
            "labels": [_normalise_labels(v) for v in table["labels"]],
            "is_valid": [_parse_bool(v, i, source) for i, v in enumerate(table["is_valid"])],
        }
    )
    out["is_valid"] = out["is_valid"].astype(bool)
    if not out["is_valid"].any() or out["is_valid"].all():
        raise TrainingError(
            f"{source}: needs at least one training row and one validation row "
            f"(is_valid True: {int(out['is_valid'].sum())} of {len(out)})."
        )
    return out


def _normalise_labels(value: Any) -> str:
    """Single spaces between tokens, so label_delim=' ' never yields an empty label."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return " ".join(str(value).split())


def _parse_bool(value: Any, row: int, source: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    key = str(value).strip().lower()
    if key not in _BOOL_SPELLINGS:
        raise TrainingError(
            f"{source}: row {row + 2} (line in the CSV) has is_valid={value!r}; "
            "use True/False, true/false or 1/0."
        )
    return _BOOL_SPELLINGS[key]


def label_vocab(table: pd.DataFrame) -> list[str]:
    """Sorted union of every label in train and valid rows (fastai's order: sorted)."""
    return sorted({tok for labels in table["labels"] for tok in labels.split()})


def cap_validation(table: pd.DataFrame, max_valid: int | None, seed: int) -> pd.DataFrame:
    """Drop (never move to training) validation rows beyond `max_valid`, chosen by seed."""
    valid_idx = np.flatnonzero(table["is_valid"].to_numpy())
    if max_valid is None or len(valid_idx) <= max_valid:
        return table
    rng = np.random.default_rng(seed)
    drop = rng.choice(valid_idx, size=len(valid_idx) - max_valid, replace=False)
    return table.drop(index=table.index[drop]).reset_index(drop=True)
