"""Run the tag flow from tests, and read back what a run recorded.

Not a test module. There is one shard runner, the flow's (`flows.tag.tag_images`): the CLI,
deployments, benchmarks and these tests all run it. In-process callers need the session's
Prefect server (`prefect_harness` in tests/conftest.py); a run's counts come back from the
manifest it wrote, the record an operator reads too.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from multitag.config import TagParams
from multitag.storage import read_json
from multitag.tagging import TagSummary


def run_tag_flow(params: TagParams) -> TagSummary:
    """`tag_images(**params.model_dump())` to completion; raises what the flow raised."""
    from flows.tag import tag_images

    result = tag_images(**params.model_dump())
    return read_summary(result["manifest"])


def read_summary(manifest_uri: str) -> TagSummary:
    """The `TagSummary` a manifest (`_manifests/<run-id>.json`) was written from."""
    return summary_from_dict(read_json(manifest_uri))


def summary_from_dict(d: dict[str, Any]) -> TagSummary:
    """A manifest's dict back into its dataclasses (drift report, shard results, ...)."""
    return _from_dict(TagSummary, d)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _value(hints[k], v) for k, v in data.items() if k in names})


def _value(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _from_dict(tp, value)  # type: ignore[arg-type]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and isinstance(value, list):
        return [_value(args[0], v) for v in value]
    for arg in args:  # X | None
        if dataclasses.is_dataclass(arg) and isinstance(value, dict):
            return _from_dict(arg, value)  # type: ignore[arg-type]
    return value


def manifests(dataset_dir: Path) -> list[dict[str, Any]]:
    """Every manifest of a local dataset folder, oldest run first."""
    found = [json.loads(m.read_text()) for m in (dataset_dir / "_manifests").glob("*.json")]
    return sorted(found, key=lambda m: m["started_at"])
