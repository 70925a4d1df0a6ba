"""What a person sees of a tag run in the Prefect UI, read back from a real server's API.

One run of 600 images in a single 600-image shard (batches of 64) shows: the progress bar
moving within the shard, not once at its end; the run tagged `model:<version>` and
`dataset:<name>`; artifacts keyed by the dataset, with links a browser can open.

The library's own `multitag.*` log lines in the run's logs are asserted where users meet
them, from a real `multitag tag` process (tests/e2e/test_ui_pages.py): read back in this
process after other modules' runs, the run's logs were sometimes not on the server yet.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname
from uuid import UUID

import pytest

from tasks import artifacts
from tests.tagging_helpers import TinyModel, register_tiny_model, write_images

pytestmark = pytest.mark.usefixtures("prefect_harness")

N_IMAGES = 600
BAD_NAME = b"bad-\xff-name.jpg"  # not UTF-8: the listing skips it and says so (a WARNING)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-model-ui")
    return register_tiny_model(root / "home", root / "work")


def _read(flow_run_id: UUID) -> tuple[Any, list[Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    return run, arts


def test_tag_run_shows_progress_tags_and_links(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.tag import tag_images
    from multitag.config import TagParams

    src = tmp_path / "batch"
    write_images(src, N_IMAGES, seed=5)
    with open(os.path.join(os.fsencode(src), BAD_NAME), "wb") as f:
        f.write(b"not listed")
    # A short interval so a laptop-fast shard still shows several steps; the rule under test
    # is that batches, not finished shards, move the bar.
    monkeypatch.setattr(artifacts, "PROGRESS_INTERVAL_S", 0.05)
    updates: list[tuple[str, float]] = []
    monkeypatch.setattr(artifacts, "progress_listeners", [lambda k, p: updates.append((k, p))])
    params = TagParams(
        source=str(src),
        out=str(tmp_path / "out"),
        home=str(tiny.home),
        shard_size=N_IMAGES,
        batch_size=64,
        decode_workers=1,
    )
    state = tag_images(**params.model_dump(), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["tagged"] == N_IMAGES

    # Progress: several updates while the one shard ran, rising, then 100 %.
    steps = [p for k, p in updates if k == "tagging-progress-batch"]
    assert steps and steps[-1] == 100.0, updates
    within = [p for p in steps if 0.0 < p < 100.0]
    assert len(within) >= 2, f"the bar moved only {steps} over one {N_IMAGES}-image shard"
    assert steps == sorted(steps)
    # Each step is a whole number of finished batches of 64 (the last batch, 24, ends it).
    assert all(round(p * N_IMAGES / 100) % 64 == 0 for p in within), steps

    assert state.state_details.flow_run_id is not None
    run, arts = _read(state.state_details.flow_run_id)
    # Tags a person can filter runs by.
    assert {f"model:{tiny.version}", "dataset:batch"} <= set(run.tags), run.tags
    # Artifacts keyed by the dataset; the progress bar ended at 100 %.
    by_key = {a.key: a for a in arts if a.key}
    assert {"tagging-progress-batch", "tagging-summary-batch", "label-rates-batch"} <= set(by_key)
    assert float(str(by_key["tagging-progress-batch"].data)) == 100.0
    # Links that open: the Parquet folder and the manifest, as file:// URLs that exist.
    for key, target in (
        ("tags-output-batch", summary["output"]),
        ("tagging-manifest-batch", summary["manifest"]),
    ):
        # Prefect stores a link artifact as the markdown `[text](url)` the UI renders.
        found = re.fullmatch(r"\[(.+)\]\((.+)\)", str(by_key[key].data))
        assert found, by_key[key].data
        text, url = found.groups()
        assert text == target and url == Path(target).resolve().as_uri(), (key, url)
        assert Path(url2pathname(urlparse(url).path)).exists()  # `=` is quoted as %3D
