"""Deployments work: infra/prefect.yaml deployed to a real server, run by a real worker.

One scenario, checked from several sides: a `process` work pool is created from
infra/work-pools/process.json; `prefect deploy` reads infra/prefect.yaml as a user would, with
only the pool overridden on the command line; a `prefect worker` executes a tiny `retrain`
(shapes dataset, 1 epoch). Its promotion emits `multitag.model.promoted`, and the deployment
trigger in prefect.yaml starts `tag-images` with the promoted version (issue 18); then a
`prefect deployment run tag-images/tag-images --param source=...` runs it by hand, finding
nothing new. The tests read the events, the runs, their artifacts and the Parquet back over
the API and from disk, and load the run's page in headless Chromium.
"""

from __future__ import annotations

import http.server
import json
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from uuid import UUID

import pytest

from tests.e2e.harness import (
    INFRA,
    REPO_ROOT,
    TEST_OUTPUT,
    PrefectStack,
    run_chromium,
    tail,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

POOL = "e2e-process"
N_TRAIN, N_TEST, IMG_SIZE = 96, 16, 32
RETRAIN_TIMEOUT_S, TAG_TIMEOUT_S = 420.0, 300.0
TRIGGER_TIMEOUT_S = 60.0  # promotion event -> triggers service -> flow run created

# Artifact keys the flows publish (tasks/*.py); each run must show at least these in the UI.
# Keys carry the dataset's name (the `shapes` folder; the tag source `shapes/test`).
RETRAIN_ARTIFACTS = {
    "contract-report-shapes",
    "training-metrics-shapes",
    "threshold-table",
    "model-report-shapes",
    "promotion-decision",
}
TAG_ARTIFACTS = {"tagging-summary-test", "tagging-progress-test", "label-rates-test"}


@dataclass
class Scenario:
    """What the deployed runs left behind, for the tests to check."""

    stack: PrefectStack
    deployments: dict[str, Any]
    retrain_run: Any
    triggered_run: Any  # started by the trigger on `multitag.model.promoted`
    tag_run: Any  # started by hand afterwards: nothing new to tag
    home: Path
    dataset: Path
    tag_out: Path
    deploy_env: dict[str, str]


def tiny_retrain_params(dataset: Path) -> dict[str, Any]:
    """Overrides the weekly PASCAL/GPU defaults with a seconds-long CPU run on shapes."""
    return {
        "params": {
            "data": str(dataset),
            "train": {
                "arch": "shapes_cnn",
                "pretrained": False,
                "img_size": IMG_SIZE,
                "batch_size": 32,
                "epochs": 1,
                "freeze_epochs": 0,
                "device": "cpu",
            },
            "thresholds": {"min_positives": 1},
        }
    }


def deploy(stack: PrefectStack, code_dir: Path, prefect_file: Path, env: dict[str, str]) -> None:
    """`prefect deploy` each deployment of the file, redirecting only its work pool."""
    for name in ("retrain", "tag-images"):
        stack.cli(
            "--no-prompt",
            "deploy",
            "--name",
            name,
            "--pool",
            POOL,
            "--prefect-file",
            str(prefect_file),
            cwd=code_dir,
            env=env,
        )


def read_deployments(stack: PrefectStack) -> dict[str, Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with stack.client() as client:
        found = client.read_deployments(
            deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["retrain", "tag-images"])
            )
        )
    return {d.name: d for d in found}


def deployment_run_ids(stack: PrefectStack, deployment_id: UUID) -> set[UUID]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with stack.client() as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    return {r.id for r in runs}


def run_deployment(
    stack: PrefectStack,
    deployment_id: UUID,
    params: dict | None = None,
    flat: dict[str, str] | None = None,
) -> UUID:
    """`prefect deployment run` (`--params JSON` and/or `--param k=v`), then find the run it
    created through the API."""
    before = deployment_run_ids(stack, deployment_id)
    args = ["deployment", "run", "--id", str(deployment_id)]
    if params is not None:
        args += ["--params", json.dumps(params)]
    for key, value in (flat or {}).items():
        args += ["--param", f"{key}={value}"]
    stack.cli(*args)
    new = deployment_run_ids(stack, deployment_id) - before
    assert len(new) == 1, f"expected one new run of deployment {deployment_id}, found {len(new)}"
    return new.pop()


def wait_for_new_run(
    stack: PrefectStack, deployment_id: UUID, known: set[UUID], timeout_s: float
) -> UUID:
    """The run something else (a trigger) creates for the deployment, once it exists."""
    deadline = time.monotonic() + timeout_s
    while not (new := deployment_run_ids(stack, deployment_id) - known):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no run of deployment {deployment_id} within {timeout_s:.0f} s\n"
                f"{tail(stack.server_log)}"
            )
        time.sleep(1.0)
    assert len(new) == 1, f"expected one triggered run, found {len(new)}"
    return new.pop()


def read_events(stack: PrefectStack, prefix: str, wait_for: str, timeout_s: float = 30.0) -> list:
    """Events whose name starts with `prefix`, read back with POST /api/events/filter.

    The server stores events in batches, so poll until one named `wait_for` is there.
    """
    import httpx

    body = {"filter": {"event": {"prefix": [prefix]}, "order": "ASC"}, "limit": 50}  # the most
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.post(f"{stack.api_url}/events/filter", json=body, timeout=10)
        response.raise_for_status()
        found = response.json()["events"]
        if any(e["event"] == wait_for for e in found) or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def run_scenario(stack: PrefectStack, code_dir: Path, prefect_file: Path, work: Path) -> Scenario:
    """Pool -> deploy -> worker -> retrain -> tag, exactly as the README tells a user."""
    from multitag.data.shapes import make_shapes_dataset

    dataset = make_shapes_dataset(
        work / "shapes", n_train=N_TRAIN, n_test=N_TEST, img_size=IMG_SIZE, seed=7
    )
    home, tag_out = work / "home", work / "tags"
    stack.cli(
        "work-pool",
        "create",
        POOL,
        "--type",
        "process",
        "--base-job-template",
        str(INFRA / "work-pools" / "process.json"),
    )
    # Source and output are filled in from the deploying shell (`{{ $VAR }}` in prefect.yaml);
    # the code location is deliberately NOT set here, so the worker resolves it at run time.
    deploy_env = {"MULTITAG_TAG_SOURCE": str(dataset / "test"), "MULTITAG_TAG_OUT": str(tag_out)}
    deploy(stack, code_dir, prefect_file, deploy_env)
    deployments = read_deployments(stack)

    stack.start_worker(
        POOL,
        env={
            "MULTITAG_CODE_DIR": str(code_dir),
            "MULTITAG_HOME": str(home),
            "MULTITAG_STAGING": str(work / "staging"),
            "MULTITAG_CACHE_DIR": str(work / "cache"),
            "XDG_CACHE_HOME": str(work / "xdg-cache"),
        },
    )
    tag_deployment = deployments["tag-images"].id
    before = deployment_run_ids(stack, tag_deployment)
    retrain_id = run_deployment(stack, deployments["retrain"].id, tiny_retrain_params(dataset))
    retrain_run = stack.wait_for_flow_run(retrain_id, RETRAIN_TIMEOUT_S)
    state = retrain_run.state
    assert state.is_completed(), (
        f"retrain ended {state.name}: {state.message}\n{stack.worker_logs()}"
    )
    # The promotion's event makes the deployment trigger start tag-images, unasked.
    triggered_id = wait_for_new_run(stack, tag_deployment, before, TRIGGER_TIMEOUT_S)
    triggered_run = stack.wait_for_flow_run(triggered_id, TAG_TIMEOUT_S)
    # By hand, as infra/README.md shows: one flat parameter on the command line.
    tag_id = run_deployment(stack, tag_deployment, flat={"source": str(dataset / "test")})
    tag_run = stack.wait_for_flow_run(tag_id, TAG_TIMEOUT_S)
    return Scenario(
        stack, deployments, retrain_run, triggered_run, tag_run, home, dataset, tag_out, deploy_env
    )


@pytest.fixture(scope="module")
def scenario(prefect_stack: PrefectStack, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return run_scenario(
        prefect_stack, REPO_ROOT, INFRA / "prefect.yaml", tmp_path_factory.mktemp("e2e-work")
    )


def test_deployments_carry_the_yaml_settings(scenario: Scenario) -> None:
    retrain, tag = scenario.deployments["retrain"], scenario.deployments["tag-images"]
    assert retrain.work_pool_name == POOL and tag.work_pool_name == POOL  # the CLI override
    assert {"multitag", "training", "gpu"} <= set(retrain.tags)
    assert {"multitag", "tagging", "cpu"} <= set(tag.tags)

    (schedule,) = retrain.schedules
    assert schedule.schedule.cron == "0 3 * * 1"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert retrain.global_concurrency_limit is not None
    assert retrain.global_concurrency_limit.limit == 1
    assert retrain.concurrency_options.collision_strategy.value == "ENQUEUE"

    # Deploy-time templating filled in the tag source/output from the deploying shell (flat
    # parameters: one per TagParams field) ...
    assert tag.parameters["source"] == scenario.deploy_env["MULTITAG_TAG_SOURCE"]
    assert tag.parameters["out"] == scenario.deploy_env["MULTITAG_TAG_OUT"]
    # tag-images' schedule (stored; the e2e server's scheduler is off) ...
    (tag_schedule,) = tag.schedules
    assert tag_schedule.schedule.interval.total_seconds() == 900 and tag_schedule.active
    # ... while the code location stays a placeholder for the worker to resolve.
    (pull_step,) = retrain.pull_steps
    step = pull_step["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $MULTITAG_CODE_DIR }}"
    assert retrain.parameters["params"]["data"].endswith("pascal_2007.tgz")


def test_retrain_and_tag_runs_completed(scenario: Scenario) -> None:
    for run in (scenario.retrain_run, scenario.triggered_run, scenario.tag_run):
        assert run.state.is_completed(), (
            f"{run.name} ended {run.state.name}: {run.state.message}\n"
            f"{scenario.stack.worker_logs()}"
        )
    assert scenario.retrain_run.parameters["params"]["train"]["arch"] == "shapes_cnn"


def champion_version(home: Path) -> str:
    """The one version the registry marks champion (read through the registry's API)."""
    from multitag import registry

    (version,) = [r["version"] for r in registry.list_versions(str(home)) if r.get("is_champion")]
    return version


def _related_ids(event: dict[str, Any], role: str) -> list[str]:
    return [
        r["prefect.resource.id"] for r in event["related"] if r["prefect.resource.role"] == role
    ]


def test_promotion_event_triggered_the_retag_run(scenario: Scenario) -> None:
    """retrain promoted -> `multitag.model.promoted` on the server -> the deployment trigger
    started tag-images with the promoted version -> that run COMPLETED (issue 18 item 2)."""
    stack = scenario.stack
    champion = champion_version(scenario.home)
    found = read_events(stack, "multitag.", wait_for="multitag.tagging.completed")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in found:
        by_name.setdefault(event["event"], []).append(event)
    (registered,) = by_name["multitag.model.registered"]
    (promoted,) = by_name["multitag.model.promoted"]
    for event in (registered, promoted):
        assert event["resource"]["prefect.resource.id"] == f"multitag.model.{champion}"
        assert _related_ids(event, "dataset") == ["multitag.dataset.shapes"]
        # Prefect added the retrain run that emitted it.
        assert f"prefect.flow-run.{scenario.retrain_run.id}" in _related_ids(event, "flow-run")
    assert promoted["payload"]["version"] == champion
    assert set(registered["payload"]["metrics"]) >= {"mAP", "accuracy_multi"}

    run = scenario.triggered_run
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
    assert run.parameters["model"] == champion  # templated from the event's payload
    assert run.parameters["source"] == scenario.deploy_env["MULTITAG_TAG_SOURCE"]  # the default
    assert run.name == "tag-test"  # flow_run_name from the flat parameters
    # The automation the trigger became says which run it started, for this very event.
    executed = read_events(
        stack, "prefect.automation.action.executed", "prefect.automation.action.executed"
    )
    (ours,) = [e for e in executed if f"prefect.flow-run.{run.id}" in _related_ids(e, "flow-run")]
    assert _related_ids(ours, "triggering-event") == [f"prefect.event.{promoted['id']}"]

    # The re-tag run tagged every test image with the promoted model and said so.
    (completed,) = [
        e
        for e in by_name["multitag.tagging.completed"]
        if f"prefect.flow-run.{run.id}" in _related_ids(e, "flow-run")
    ]
    assert completed["resource"]["prefect.resource.id"] == "multitag.dataset.test"
    assert _related_ids(completed, "model") == [f"multitag.model.{champion}"]
    assert completed["payload"]["tagged"] == N_TEST and completed["payload"]["failed"] == 0


def test_a_run_by_hand_after_the_trigger_finds_nothing_new(scenario: Scenario) -> None:
    """`--param source=...` set one flat parameter; exactly once made the rerun cheap."""
    from tests.tag_runs import manifests

    run = scenario.tag_run
    assert run.parameters["source"] == str(scenario.dataset / "test")
    assert run.parameters.get("model") is None  # the champion, resolved at run time
    (first, second) = manifests(scenario.tag_out / "test")
    assert (first["tagged"], first["skipped"]) == (N_TEST, 0)
    assert (second["tagged"], second["skipped"]) == (0, N_TEST)


class _Inbox(http.server.BaseHTTPRequestHandler):
    """A webhook receiver on 127.0.0.1: what a chat or paging service would get."""

    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        type(self).received.append(json.loads(self.rfile.read(length) or b"{}"))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:  # quiet
        pass


def test_drift_automation_from_the_file_notifies(scenario: Scenario, tmp_path: Path) -> None:
    """infra/automations/drift-notify.yaml, created with `prefect automation create
    --from-file` as infra/README.md shows, sends its notification for a drift event.

    The event is the flow's own (`tasks.events.emit_drift_flagged`, in a process pointed at
    the server) on the re-tag run's manifest with one label marked drifted: whether the tiny
    e2e model's rates drift is up to its training, not to the automation.
    """
    import threading

    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.tag_runs import manifests

    stack = scenario.stack
    inbox = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Inbox)
    threading.Thread(target=inbox.serve_forever, daemon=True).start()
    try:
        block = CustomWebhookNotificationBlock(
            name="multitag-drift",
            url=f"http://127.0.0.1:{inbox.server_address[1]}/drift",
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
            allow_private_urls=True,  # the receiver is on loopback
        )
        with temporary_settings({PREFECT_API_URL: stack.api_url}):
            block_id = block.save("multitag-drift", overwrite=True)
        text = (INFRA / "automations" / "drift-notify.yaml").read_text()
        filled = tmp_path / "drift-notify.yaml"  # what `envsubst` writes
        filled.write_text(text.replace("${MULTITAG_NOTIFY_BLOCK_ID}", str(block_id)))
        stack.cli("automation", "create", "--from-file", str(filled))

        manifest = manifests(scenario.tag_out / "test")[0]
        label = manifest["drift"]["labels"][0]
        label["flagged"] = True
        manifest["drift"]["flagged"] = [label["label"]]
        emit = (
            "import json, sys; from tasks.events import emit_drift_flagged; "
            "from prefect.events.worker import EventsWorker; "
            "assert emit_drift_flagged(json.loads(sys.argv[1])) is not None; "
            "EventsWorker.drain_all()"
        )
        subprocess.run(
            [sys.executable, "-c", emit, json.dumps(manifest)],
            cwd=REPO_ROOT,
            env=stack.env,
            check=True,
            timeout=120,
        )
        deadline = time.monotonic() + 60
        while not _Inbox.received and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        inbox.shutdown()
        inbox.server_close()
    assert _Inbox.received, f"no notification within 60 s\n{tail(stack.server_log)}"
    (note,) = _Inbox.received
    assert note["subject"] == "multitag: drift in test"
    assert label["label"] in note["body"] and manifest["run_id"] in note["body"]
    assert f"training {label['train_rate']}" in note["body"]


def test_tag_run_wrote_parquet_with_the_champion(scenario: Scenario) -> None:
    import pyarrow.parquet as pq

    champion = {"version": champion_version(scenario.home)}
    shards = sorted(scenario.tag_out.rglob("*.parquet"))
    assert shards, f"no Parquet under {scenario.tag_out}"
    tables = [pq.read_table(shard) for shard in shards]
    expected_columns = {"image_uri", "labels", "scores", "top_label", "model_version", "error"}
    assert expected_columns <= set(tables[0].column_names)
    rows = [row for table in tables for row in table.to_pylist()]
    test_images = sorted(p.name for p in (scenario.dataset / "test").iterdir())
    assert sorted(Path(r["image_uri"]).name for r in rows) == test_images
    assert {r["model_version"] for r in rows} == {champion["version"]}
    assert all(r["error"] is None for r in rows)


def _run_and_subflow_ids(client: Any, flow_run_id: UUID) -> list[UUID]:
    """The run and every subflow below it: tag-images publishes from its `tag-shards` subflow."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    ids, frontier = [flow_run_id], [flow_run_id]
    while frontier:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)
            )
        )
        frontier = [c.id for c in children]
        ids += frontier
    return ids


def _artifact_keys(stack: PrefectStack, flow_run_id: UUID) -> set[str]:
    """Keys of the artifacts a person sees for this run (its subflows' included)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with stack.client() as client:
        run_ids = _run_and_subflow_ids(client, flow_run_id)
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
        )
    assert artifacts, f"flow run {flow_run_id} (and its subflows {run_ids[1:]}) has no artifacts"
    return {a.key for a in artifacts if a.key}


def test_runs_published_their_artifacts(scenario: Scenario) -> None:
    retrain_keys = _artifact_keys(scenario.stack, scenario.retrain_run.id)
    assert retrain_keys >= RETRAIN_ARTIFACTS, f"missing: {RETRAIN_ARTIFACTS - retrain_keys}"
    tag_keys = _artifact_keys(scenario.stack, scenario.tag_run.id)
    assert tag_keys >= TAG_ARTIFACTS, f"missing: {TAG_ARTIFACTS - tag_keys}"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_ui_shows_the_flow_run(scenario: Scenario, chromium: Path, tmp_path: Path) -> None:
    from PIL import Image

    run = scenario.tag_run
    url = f"{scenario.stack.ui_url}/runs/flow-run/{run.id}"
    TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = TEST_OUTPUT / "flow-run.png"
    shot.unlink(missing_ok=True)
    run_chromium(chromium, url, tmp_path / "profile-shot", [f"--screenshot={shot}"])
    assert _png_size(shot.read_bytes()) == (1400, 900)
    with Image.open(shot) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is None or len(colours) > 50, "screenshot is (nearly) blank"

    dom = run_chromium(chromium, url, tmp_path / "profile-dom", ["--dump-dom"]).stdout
    (TEST_OUTPUT / "flow-run.html").write_text(dom)
    assert run.name in dom, f"run name {run.name!r} not in the rendered page ({len(dom)} chars)"
    assert "Completed" in dom, "the run's state badge is not in the rendered page"


@pytest.mark.parametrize(
    ("file", "worker_type"),
    [
        ("gpu-docker.json", "docker"),
        ("gpu-kubernetes.json", "kubernetes"),
        ("cpu-kubernetes.json", "kubernetes"),
    ],
)
def test_server_accepts_the_container_pool_templates(
    prefect_stack: PrefectStack, file: str, worker_type: str
) -> None:
    """The server validates a base job template when a pool is created from it."""
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((INFRA / "work-pools" / file).read_text())
    name = f"check-{file.removesuffix('.json')}"
    with prefect_stack.client() as client:
        client.create_work_pool(
            WorkPoolCreate(name=name, type=worker_type, base_job_template=template)
        )
        pool = client.read_work_pool(name)
    assert pool.type == worker_type
    assert pool.base_job_template == template
