"""What a model version was made from: data content, split sizes, contract and code versions.

Why recorded with every version (metrics.json's `lineage`): a model is only reproducible, and
a tag row only explainable, when one can say which bytes it was trained on, under which data
contract, by which code. The dataset hash is `multitag.data.fingerprint` (sha256 of every
file's bytes), so two versions trained on the same data show the same hash wherever the data
came from.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

from multitag import __version__
from multitag.data.fingerprint import fingerprint_folder

LINEAGE_KEY = "lineage"


@functools.cache
def git_commit() -> str | None:
    """The commit of the multitag checkout this code runs from; None for an installed wheel.

    Why a subprocess with a short timeout: it costs ~5 ms once per process, and no git, no
    repository or a slow disk must never fail (or stall) registering a model.
    """
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def code_version() -> dict[str, str | None]:
    """multitag's package version and, when cheaply known, the git commit."""
    return {"package": __version__, "git_commit": git_commit()}


def build_lineage(
    dataset_dir: str | Path | None,
    contract_summary: dict[str, Any],
    *,
    n_train: int,
    n_valid: int,
    dataset_sha256: str | None = None,
) -> dict[str, Any]:
    """The lineage block of metrics.json.

    `dataset_sha256` when the caller already knows it (the dataset cache records it);
    otherwise the folder is hashed here (~0.2 s for the 7,000-file shapes set).
    """
    content: dict[str, Any] = {"sha256": dataset_sha256}
    if dataset_sha256 is None and dataset_dir and (Path(dataset_dir) / "train.csv").is_file():
        content = fingerprint_folder(dataset_dir).to_dict()
    contract = str(contract_summary.get("contract") or "")
    return {
        "dataset_sha256": content.get("sha256"),
        "dataset_content": content,
        "rows": {"train": int(n_train), "valid": int(n_valid)},
        "contract": contract or None,
        "contract_version": contract.rpartition("@")[2] or None,
        "code_version": code_version(),
    }


def dataset_sha256_of(metrics: dict[str, Any] | None) -> str | None:
    """The dataset content hash a version's metrics.json records (None for older versions)."""
    lineage = (metrics or {}).get(LINEAGE_KEY) or {}
    value = lineage.get("dataset_sha256") if isinstance(lineage, dict) else None
    return value if isinstance(value, str) else None
