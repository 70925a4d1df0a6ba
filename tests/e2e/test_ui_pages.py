"""The Prefect UI shows what a person needs: headless Chromium on a real server's pages.

A tiny retrain (shapes, 2 epochs at 32 px) runs in this process against a `prefect server
start`; then `multitag tag` runs in a fresh process (its own PREFECT_LOGGING_EXTRA_LOGGERS) on
the dataset's test images with the champion it made. The tests read back over the API what
the pages render (run tags `model:<version>` / `dataset:<name>`, artifacts keyed per dataset,
the training and precision-recall plots of the model report, links, the library's own log
line), then load the run pages in Chromium, keep the screenshots under
test-output/e2e/screenshots/ and check the rendered DOM for the run's name and tags.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import REPO_ROOT, TEST_OUTPUT, PrefectStack, run_chromium

pytestmark = pytest.mark.slow

SCREENSHOTS = TEST_OUTPUT / "screenshots"
DATASET = "ui-shapes"  # the retrain's dataset folder: its artifacts end in -ui-shapes
TAG_DATASET = "test"  # the tag source is <dataset>/test
BAD_NAME = b"skipped-\xff.jpg"  # a name the listing cannot list: a multitag WARNING in the run


@dataclass(frozen=True)
class UiRuns:
    stack: PrefectStack
    retrain_run: Any
    tag_run: Any
    version: str
    home: Path


def _send_to_this_server_now() -> None:
    """Send this process's queued events and logs to the module's server while it is up.

    Why: a run in this process queues its task-run events and logs for the server it ran
    against; left queued when that server stops, Prefect's events worker retries it forever
    and the test process never exits (seen: its exit-time drain waiting on 1,035 events).
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=60)
    EventsWorker.drain_all(timeout=60)


def _run_retrain(stack: PrefectStack, dataset: Path, home: Path) -> Any:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import retrain
    from multitag.config import RetrainParams, ThresholdParams, shapes_train_params

    params = RetrainParams(
        data=str(dataset),
        train=shapes_train_params(img_size=32, epochs=2, batch_size=32),
        thresholds=ThresholdParams(policy="global"),
        home=str(home),
        fastpath_check_images=0,
    )
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        state = retrain(params, return_state=True)
        _send_to_this_server_now()
    assert state.is_completed(), state.message
    with stack.client() as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def _run_tag_cli(
    stack: PrefectStack, source: Path, out: Path, home: Path
) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "MULTITAG_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("PREFECT_LOGGING_EXTRA_LOGGERS", None)  # the CLI sets it, before prefect loads
    cmd = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]
    cmd += ["tag", str(source), "--out", str(out), "--shard-size", "8"]
    return subprocess.run(
        cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def ui_runs(
    prefect_stack: PrefectStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UiRuns]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from multitag import registry
    from multitag.data.shapes import make_shapes_dataset

    work = tmp_path_factory.mktemp("e2e-ui")
    home = work / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MULTITAG_HOME", str(home))
        mp.setenv("MULTITAG_STAGING", str(work / "staging"))
        mp.setenv("MULTITAG_CACHE_DIR", str(work / "cache"))
        dataset = make_shapes_dataset(work / DATASET, n_train=96, n_test=16, img_size=32, seed=5)
        retrain_run = _run_retrain(prefect_stack, dataset, home)
        champion = registry.get_champion(str(home))
        assert champion is not None, "the tiny retrain was not promoted"
        version = champion["version"]
        with open(os.path.join(os.fsencode(dataset / "test"), BAD_NAME), "wb") as f:
            f.write(b"not an image anyone can list")
        done = _run_tag_cli(prefect_stack, dataset / "test", work / "tags", home)
    assert done.returncode == 0, f"multitag tag failed:\n{done.stdout[-3000:]}\n{done.stderr}"
    with prefect_stack.client() as client:
        (tag_run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"tag-{TAG_DATASET}"]))
        )
    yield UiRuns(prefect_stack, retrain_run, tag_run, version, home)


def _artifacts(stack: PrefectStack, run_id: Any) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with stack.client() as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return {a.key: a for a in arts if a.key}


def test_api_has_what_the_pages_show(ui_runs: UiRuns) -> None:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from multitag import registry
    from tasks.artifacts import openable_url

    stack, version = ui_runs.stack, ui_runs.version
    with stack.client() as client:
        retrain_run = client.read_flow_run(ui_runs.retrain_run.id)
        tag_run = client.read_flow_run(ui_runs.tag_run.id)
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[tag_run.id]))
        )
    # Runs a person can filter by model and by dataset.
    assert {f"model:{version}", f"dataset:{DATASET}"} <= set(retrain_run.tags), retrain_run.tags
    assert {f"model:{version}", f"dataset:{TAG_DATASET}"} <= set(tag_run.tags), tag_run.tags

    # The retrain's artifacts carry its dataset; the report has the training curves and the
    # per-label precision-recall plot inlined (the UI cannot follow a file name).
    retrain_arts = _artifacts(stack, retrain_run.id)
    assert {
        f"{k}-{DATASET}" for k in ("training-progress", "training-metrics", "model-report")
    } <= set(retrain_arts), sorted(retrain_arts)
    assert float(retrain_arts[f"training-progress-{DATASET}"].data) == 100.0
    report = str(retrain_arts[f"model-report-{DATASET}"].data)
    for title in ("Loss and metrics per epoch", "Precision-recall per label (validation)"):
        assert f"## {title}\n\n![{title}](data:image/png;base64," in report, title
    folder = openable_url(registry.version_uri(str(ui_runs.home), version), folder=True)
    assert f"]({folder})" in str(retrain_arts[f"model-location-{DATASET}"].data)

    # The tag run (another process, the CLI): progress at 100 %, output and manifest links.
    tag_arts = _artifacts(stack, tag_run.id)
    for key in ("tagging-progress", "tagging-summary", "label-rates", "tags-output"):
        assert f"{key}-{TAG_DATASET}" in tag_arts, sorted(tag_arts)
    assert float(tag_arts[f"tagging-progress-{TAG_DATASET}"].data) == 100.0
    assert "](file:///" in str(tag_arts[f"tagging-manifest-{TAG_DATASET}"].data)

    # The library's own warning reached the run's logs from the CLI's process.
    skipped = [log for log in logs if log.name == "multitag.inference.sources"]
    assert any("not valid UTF-8" in log.message for log in skipped), [
        (log.name, log.message[:80]) for log in logs
    ]


def _png_ok(path: Path) -> None:
    """A real screenshot: a PNG of the window's size with more than a blank page's colours."""
    from PIL import Image

    assert path.stat().st_size > 20_000, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (1400, 900), (img.format, img.size)
        colours = img.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is None or len(colours) > 50, f"{path} is (nearly) blank"


# (run, artifact): the run's page, or the page of one of its artifacts (key without the
# dataset) with a text that shows its content was rendered, not only its frame.
PAGES = [
    ("tag_run", None, None),
    ("retrain_run", None, None),
    ("tag_run", "tagging-summary", "Tagging run"),
    ("retrain_run", "model-report", "Loss and metrics per epoch"),
]


@pytest.mark.parametrize(("which", "artifact", "text"), PAGES)
def test_pages_render(
    ui_runs: UiRuns,
    chromium: Path,
    tmp_path: Path,
    which: str,
    artifact: str | None,
    text: str | None,
) -> None:
    run = getattr(ui_runs, which)
    dataset = DATASET if which == "retrain_run" else TAG_DATASET
    if artifact is None:
        url, name = f"{ui_runs.stack.ui_url}/runs/flow-run/{run.id}", which.replace("_", "-")
    else:
        key = f"{artifact}-{dataset}"
        art = _artifacts(ui_runs.stack, run.id)[key]
        url, name = f"{ui_runs.stack.ui_url}/artifacts/artifact/{art.id}", key
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{name}.png"
    shot.unlink(missing_ok=True)
    run_chromium(chromium, url, tmp_path / "profile-shot", [f"--screenshot={shot}"])
    _png_ok(shot)

    dom = run_chromium(chromium, url, tmp_path / "profile-dom", ["--dump-dom"]).stdout
    shot.with_suffix(".html").write_text(dom)
    if artifact is None:  # the run page: its name and the tags it was given
        assert run.name in dom, f"run name {run.name!r} not in the page ({len(dom)} chars)"
        for tag in (f"model:{ui_runs.version}", f"dataset:{dataset}"):
            assert tag in dom, f"tag {tag!r} not on the run page"
    else:  # the artifact page: its key and its rendered markdown
        assert f"{artifact}-{dataset}" in dom, f"artifact key not on its page {url}"
        assert text is not None and text in dom, f"{text!r} not rendered on {url}"
