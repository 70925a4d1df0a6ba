"""Parameter models reject what would otherwise fail deep inside a flow run."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from multitag.config import RetrainParams, TagParams, get_settings


def test_unfilled_deployment_template_is_refused_with_the_variable_named() -> None:
    with pytest.raises(ValidationError, match="MULTITAG_TAG_SOURCE"):
        TagParams(source="{{ $MULTITAG_TAG_SOURCE }}")


def test_unknown_fields_are_errors_not_silently_ignored() -> None:
    with pytest.raises(ValidationError, match="epoch"):
        RetrainParams.model_validate({"train": {"epoch": 3}})


def test_settings_come_from_env_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTITAG_HOME", "s3://bucket/prefix")
    s = get_settings()
    assert s.models == "s3://bucket/prefix/models" and s.tags == "s3://bucket/prefix/tags"
    assert get_settings("/data/mt").datasets == "/data/mt/datasets"
