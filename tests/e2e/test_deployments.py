"""Deployments work: infra/prefect.yaml deployed to a real server, run by a real worker.

One scenario, checked from several sides: a `process` work pool is created from
infra/work-pools/process.json; `prefect deploy` reads infra/prefect.yaml as a user would, with
only the pool overridden on the command line; a `prefect worker` executes a tiny `retrain`
(shapes dataset, 1 epoch) and then `tag-images` on the shapes test folder. The tests then read
the runs, their artifacts and the Parquet back, and load the run's page in headless Chromium.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from tests.e2e.harness import INFRA, REPO_ROOT, TEST_OUTPUT, PrefectStack, run_chromium

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

POOL = "e2e-process"
N_TRAIN, N_TEST, IMG_SIZE = 96, 16, 32
RETRAIN_TIMEOUT_S, TAG_TIMEOUT_S = 420.0, 300.0

# Artifact keys the flows publish (tasks/*.py); each run must show at least these in the UI.
RETRAIN_ARTIFACTS = {
    "contract-report",
    "training-metrics",
    "threshold-table",
    "model-report",
    "promotion-decision",
}
TAG_ARTIFACTS = {"tagging-summary", "tagging-progress", "label-rates"}


@dataclass
class Scenario:
    """What the deployed runs left behind, for the tests to check."""

    stack: PrefectStack
    deployments: dict[str, Any]
    retrain_run: Any
    tag_run: Any
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


def run_deployment(stack: PrefectStack, deployment_id: UUID, params: dict | None = None) -> UUID:
    """`prefect deployment run`, then find the run it created through the API."""
    args = ["deployment", "run", "--id", str(deployment_id)]
    if params is not None:
        args += ["--params", json.dumps(params)]
    stack.cli(*args)
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with stack.client() as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    assert len(runs) == 1, f"expected one run of deployment {deployment_id}, found {len(runs)}"
    return runs[0].id


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
    retrain_id = run_deployment(stack, deployments["retrain"].id, tiny_retrain_params(dataset))
    retrain_run = stack.wait_for_flow_run(retrain_id, RETRAIN_TIMEOUT_S)
    state = retrain_run.state
    assert state.is_completed(), (
        f"retrain ended {state.name}: {state.message}\n{stack.worker_logs()}"
    )
    tag_id = run_deployment(stack, deployments["tag-images"].id)
    tag_run = stack.wait_for_flow_run(tag_id, TAG_TIMEOUT_S)
    return Scenario(stack, deployments, retrain_run, tag_run, home, dataset, tag_out, deploy_env)


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

    # Deploy-time templating filled in the tag source/output from the deploying shell ...
    assert tag.parameters["params"]["source"] == scenario.deploy_env["MULTITAG_TAG_SOURCE"]
    assert tag.parameters["params"]["out"] == scenario.deploy_env["MULTITAG_TAG_OUT"]
    # ... while the code location stays a placeholder for the worker to resolve.
    (pull_step,) = retrain.pull_steps
    step = pull_step["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $MULTITAG_CODE_DIR }}"
    assert retrain.parameters["params"]["data"].endswith("pascal_2007.tgz")


def test_retrain_and_tag_runs_completed(scenario: Scenario) -> None:
    for run in (scenario.retrain_run, scenario.tag_run):
        assert run.state.is_completed(), (
            f"{run.name} ended {run.state.name}: {run.state.message}\n"
            f"{scenario.stack.worker_logs()}"
        )
    assert scenario.retrain_run.parameters["params"]["train"]["arch"] == "shapes_cnn"


def test_tag_run_wrote_parquet_with_the_champion(scenario: Scenario) -> None:
    import pyarrow.parquet as pq

    champion = json.loads((scenario.home / "models" / "champion.json").read_text())
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
