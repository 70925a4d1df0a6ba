"""The same tag flow fanned out over a Dask cluster (local processes standing in for machines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from multitag.config import TagParams
from tests.tagging_helpers import read_tags, register_tiny_model, write_images

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_tag_flow_on_a_local_dask_cluster_tags_each_image_once(tmp_path: Path) -> None:
    from flows.tag import dask_runner_for, tag_images

    tiny = register_tiny_model(tmp_path / "home", tmp_path / "work")
    src = tmp_path / "imgs"
    write_images(src, 48, seed=4)
    params = TagParams(
        source=str(src),
        out=str(tmp_path / "out"),
        home=str(tiny.home),
        shard_size=12,
        dask_local_workers=2,
    )
    assert params.on_dask and type(dask_runner_for(params)).__name__ == "DaskTaskRunner"
    state = tag_images(**params.model_dump(), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["tagged"] == 48
    uris = read_tags(summary["output"]).column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == 48
