"""Small helpers that turn library results into Prefect UI artifacts.

Why a module of its own: every task publishes the same few shapes (a table, a markdown page,
a link); keeping the formatting here keeps the tasks a few lines each.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

_KEY_RE = re.compile(r"[^a-z0-9-]+")


def artifact_key(*parts: str) -> str:
    """Artifact keys may hold only lowercase letters, digits and dashes."""
    return _KEY_RE.sub("-", "-".join(parts).lower()).strip("-")[:100]


def publish_table(key: str, rows: Iterable[Mapping[str, Any]], description: str) -> None:
    create_table_artifact(
        key=artifact_key(key), table=[dict(r) for r in rows], description=description
    )


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)


def publish_link(key: str, link: str, text: str, description: str) -> None:
    create_link_artifact(key=artifact_key(key), link=link, link_text=text, description=description)


def fmt(value: Any) -> Any:
    """Round floats for tables a person reads; leave everything else alone."""
    if isinstance(value, float):
        return round(value, 4)
    return value
