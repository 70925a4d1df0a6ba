"""Static checks of infra/: files parse and agree with each other, the flows and Prefect.

Fast (no server, no Docker): catches a typo in prefect.yaml, a job template that drifted from
the worker's, or a compose file naming a file that does not exist, before anyone deploys.
The slow test_deployments.py proves the same files work against a real server.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from tests.e2e.harness import INFRA, REPO_ROOT

PREFECT_YAML = INFRA / "prefect.yaml"
COMPOSE = INFRA / "docker-compose.yml"
POOLS = INFRA / "work-pools"
PLACEHOLDER = re.compile(r"{{\s*([\w.\-$]+)\s*}}")


@pytest.fixture(scope="module")
def prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


@pytest.fixture(scope="module")
def deployments(prefect_yaml: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in prefect_yaml["deployments"]}


def test_prefect_yaml_is_valid_for_the_installed_prefect(prefect_yaml: dict[str, Any]) -> None:
    import prefect
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig

    assert prefect_yaml["prefect-version"] == prefect.__version__
    model = PrefectYamlModel.model_validate(prefect_yaml)
    assert [d.name for d in model.deployments] == ["retrain", "tag-images"]
    for d in prefect_yaml["deployments"]:
        for schedule in d.get("schedules") or []:
            RawScheduleConfig.model_validate(schedule)  # extra="forbid": catches typos


def test_retrain_runs_weekly_on_the_gpu_pool_one_at_a_time(
    deployments: dict[str, dict[str, Any]],
) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    retrain = deployments["retrain"]
    assert retrain["entrypoint"] == "flows/retrain.py:retrain"
    assert retrain["work_pool"]["name"] == "gpu"
    (schedule,) = retrain["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.cron == "0 3 * * 1"  # Mondays 03:00: weekly
    ZoneInfo(schedule["timezone"])  # a real IANA zone, not a typo
    assert retrain["concurrency_limit"]["limit"] == 1
    assert retrain["concurrency_limit"]["collision_strategy"] == "ENQUEUE"


def test_tag_images_runs_on_the_cpu_pool_with_source_and_output(
    deployments: dict[str, dict[str, Any]],
) -> None:
    tag = deployments["tag-images"]
    assert tag["entrypoint"] == "flows/tag.py:tag_images"
    assert tag["work_pool"]["name"] == "cpu"
    params = tag["parameters"]  # flat: one per TagParams field (issue 18)
    assert params["source"] == "{{ $MULTITAG_TAG_SOURCE }}"
    assert params["out"] == "{{ $MULTITAG_TAG_OUT }}"


def test_tag_images_runs_every_few_minutes_and_on_promotion(
    deployments: dict[str, dict[str, Any]],
) -> None:
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from multitag.config import TagParams

    tag = deployments["tag-images"]
    (schedule,) = tag["schedules"]
    interval = IntervalSchedule(interval=schedule["interval"]).interval.total_seconds()
    assert 60 <= interval <= 3600 and schedule["active"] is True
    (raw,) = tag["triggers"]
    trigger = DeploymentEventTrigger.model_validate(raw)
    assert trigger.expect == {"multitag.model.promoted"}
    assert trigger.match.model_dump() == {"prefect.resource.id": "multitag.model.*"}
    assert trigger.posture.value == "Reactive" and trigger.threshold == 1
    # It sets flat parameters of the flow: the promoted version, templated from the event.
    assert trigger.parameters == {"model": "{{ event.payload.version }}"}
    assert set(trigger.parameters) <= set(TagParams.model_fields)


def test_drift_automation_file_is_a_valid_automation() -> None:
    """infra/automations/drift-notify.yaml, as `prefect automation create --from-file` reads it
    once `envsubst` has put a notification block's id in."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore

    text = (INFRA / "automations" / "drift-notify.yaml").read_text()
    assert "${MULTITAG_NOTIFY_BLOCK_ID}" in text
    block_id = "00000000-0000-4000-8000-000000000000"
    automation = AutomationCore.model_validate(
        yaml.safe_load(text.replace("${MULTITAG_NOTIFY_BLOCK_ID}", block_id))
    )
    assert automation.trigger.expect == {"multitag.drift.flagged"}  # type: ignore[union-attr]
    (action,) = automation.actions
    assert isinstance(action, SendNotification) and str(action.block_document_id) == block_id
    assert "event.payload.flagged" in action.body


def test_parameters_validate_against_the_flow_parameter_models(
    deployments: dict[str, dict[str, Any]],
) -> None:
    from multitag.config import PASCAL_2007_URL, RetrainParams, TagParams

    retrain = RetrainParams.model_validate(deployments["retrain"]["parameters"]["params"])
    assert retrain.data == PASCAL_2007_URL
    assert retrain.home is None  # the worker's MULTITAG_HOME
    tag_params = deployments["tag-images"]["parameters"]
    # As stored before `prefect deploy` fills the templates: refused, naming the variable.
    with pytest.raises(ValueError, match="MULTITAG_TAG_SOURCE"):
        TagParams.model_validate(tag_params)
    filled = {**tag_params, "source": "s3://photos/incoming", "out": "s3://tags"}
    tag = TagParams.model_validate(filled)
    assert tag.home is None


def test_anchors_share_one_definition(prefect_yaml: dict[str, Any]) -> None:
    """Aliases load as the very same object as their anchor: one place to change a pool."""
    text = PREFECT_YAML.read_text()
    assert "&gpu_pool" in text and "*gpu_pool" in text and "<<: *storage_params" in text
    defs = prefect_yaml["definitions"]
    by_name = {d["name"]: d for d in prefect_yaml["deployments"]}
    assert by_name["retrain"]["work_pool"] is defs["work_pools"]["gpu"]
    assert by_name["tag-images"]["work_pool"] is defs["work_pools"]["cpu"]
    runtime_env = defs["job_variables"]["runtime_env"]
    for pool in ("gpu", "cpu"):
        env = defs["work_pools"][pool]["job_variables"]["env"]
        assert runtime_env.items() <= env.items()
        assert env["OMP_WAIT_POLICY"] == "PASSIVE"


def _defined_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


@pytest.mark.parametrize("name", ["retrain", "tag-images"])
def test_entrypoints_exist(deployments: dict[str, dict[str, Any]], name: str) -> None:
    file, func = deployments[name]["entrypoint"].split(":")
    path = REPO_ROOT / file
    assert path.is_file(), f"{name}: entrypoint file {file} missing"
    assert func in _defined_functions(path), f"{name}: no function {func} in {file}"


def test_pull_step_sets_the_code_directory_from_the_environment(
    prefect_yaml: dict[str, Any],
) -> None:
    (step,) = prefect_yaml["pull"]
    assert step == {
        "prefect.deployments.steps.set_working_directory": {"directory": "{{ $MULTITAG_CODE_DIR }}"}
    }


# ---------------------------------------------------------------------------------------------
# Work-pool base job templates


def _installed_default_template(worker_type: str) -> dict[str, Any]:
    """What `prefect work-pool get-default-base-job-template --type T` prints, offline."""
    import prefect

    if worker_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    bundled = (
        Path(prefect.__file__).parent
        / "server/api/collections_data/views/aggregate-worker-metadata.json"
    )
    for collection in json.loads(bundled.read_text()).values():
        for worker in collection.values():
            if worker.get("type") == worker_type:
                return worker["default_base_job_configuration"]
    raise LookupError(worker_type)


TEMPLATES = {
    "process.json": "process",
    "gpu-docker.json": "docker",
    "gpu-kubernetes.json": "kubernetes",
    "cpu-kubernetes.json": "kubernetes",
}


def test_every_template_file_is_checked() -> None:
    assert {p.name for p in POOLS.glob("*.json")} == set(TEMPLATES)


@pytest.mark.parametrize(("file", "worker_type"), TEMPLATES.items())
def test_template_extends_the_workers_default(file: str, worker_type: str) -> None:
    ours = json.loads((POOLS / file).read_text())
    default = _installed_default_template(worker_type)
    assert set(ours) == {"job_configuration", "variables"}
    assert set(default["job_configuration"]) <= set(ours["job_configuration"])
    declared = set(ours["variables"]["properties"])
    assert set(default["variables"]["properties"]) <= declared
    used = set(PLACEHOLDER.findall(json.dumps(ours["job_configuration"])))
    assert used <= declared, f"{file}: placeholders without a variable: {used - declared}"
    env_default = ours["variables"]["properties"]["env"]["default"]
    assert env_default["OMP_WAIT_POLICY"] == "PASSIVE"


def test_gpu_templates_request_exactly_one_gpu() -> None:
    docker = json.loads((POOLS / "gpu-docker.json").read_text())
    kwargs = docker["variables"]["properties"]["container_create_kwargs"]["default"]
    (request,) = kwargs["device_requests"]
    assert request["count"] == 1 and request["capabilities"] == [["gpu"]]
    assert docker["job_configuration"]["container_create_kwargs"] == "{{ container_create_kwargs }}"

    k8s = json.loads((POOLS / "gpu-kubernetes.json").read_text())
    pod = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert k8s["variables"]["properties"]["gpu_count"]["default"] == 1

    cpu = json.loads((POOLS / "cpu-kubernetes.json").read_text())
    cpu_limits = cpu["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(cpu_limits)


# ---------------------------------------------------------------------------------------------
# Compose file and Dockerfiles


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_brings_up_server_worker_and_s3(compose: dict[str, Any]) -> None:
    import prefect

    services = compose["services"]
    assert {"server", "worker", "minio", "create-bucket", "deploy"} <= set(services)
    assert services["server"]["image"].startswith(f"prefecthq/prefect:{prefect.__version__}-")
    assert services["server"]["command"][:3] == ["prefect", "server", "start"]
    assert "--pool" in services["worker"]["command"]
    assert services["worker"]["environment"]["PREFECT_API_URL"] == "http://server:4200/api"
    assert services["worker"]["environment"]["MULTITAG_HOME"].startswith("s3://")
    assert "mc mb" in " ".join(services["create-bucket"]["command"])
    assert services["worker"]["depends_on"]["create-bucket"] == {
        "condition": "service_completed_successfully"
    }
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1


def test_compose_refers_only_to_files_that_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
    deploy_cmd = " ".join(compose["services"]["deploy"]["command"])
    for path in re.findall(r"infra/[\w./-]+", deploy_cmd):
        assert (REPO_ROOT / path).is_file(), path


@pytest.mark.parametrize(
    ("dockerfile", "base"), [("Dockerfile.cpu", "python:3.11"), ("Dockerfile.cuda", "nvidia/cuda:")]
)
def test_dockerfiles_install_the_lock_and_the_project(dockerfile: str, base: str) -> None:
    text = (INFRA / dockerfile).read_text()
    assert base in text
    assert "COPY requirements.txt" in text
    assert re.search(r"pip install .*-r (/tmp/)?requirements(-cpu)?\.txt", text)
    assert re.search(r"pip install --no-deps .*-e \.", text)
    assert "OMP_WAIT_POLICY=PASSIVE" in text
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M)
    assert workdir and f"MULTITAG_CODE_DIR={workdir.group(1)}" in text
    assert (INFRA / f"{dockerfile}.dockerignore").read_text().count(".venv") == 1


@pytest.mark.parametrize(("file", "gpus"), [("gpu-kubernetes.json", 1), ("cpu-kubernetes.json", 0)])
def test_kubernetes_job_renders_from_the_defaults(file: str, gpus: int) -> None:
    """Fill the template the way a worker does (defaults, unset keys dropped): a whole Job."""
    from prefect.utilities.templating import apply_values

    template = json.loads((POOLS / file).read_text())
    defaults = {
        name: spec["default"]
        for name, spec in template["variables"]["properties"].items()
        if "default" in spec
    }
    rendered = apply_values(template["job_configuration"], defaults)
    assert "{{" not in json.dumps(rendered)
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
    assert container["image"].endswith(":cuda" if gpus else ":cpu")
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert rendered["namespace"] == "multitag"


# ---------------------------------------------------------------------------------------------
# Compose: services that let no one in (issue 15, item 10)

SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH|TOKEN|CREDENTIAL|PRIVATE|(?<!ACCESS_)KEY$")
INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")
ROOT_VARS = {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
THROWAWAY_SECRETS = {
    "MINIO_ROOT_PASSWORD": "throwaway-root-secret",
    "POSTGRES_PASSWORD": "throwaway-pg-secret",
    "PREFECT_AUTH_STRING": "admin:throwaway-prefect-secret",
    "MULTITAG_STORE_PASSWORD": "throwaway-store-secret",
}


class MissingVariable(LookupError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (`$$`, `${X}`, `${X:-d}`, `${X-d}`, `${X:?e}`, `${X?e}`).

    Mirrors the compose spec, so these tests see the values compose would pass to containers;
    a `:?`/`?` variable left unset raises like `docker compose config` does.
    """
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        unset_or_empty = not env.get(name) if op and op.startswith(":") else name not in env
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise MissingVariable(f"{name}: {arg}")
        return env.get(name, "")

    return INTERPOLATION.sub(one, value)


def variable_uses(compose_text: str) -> list[tuple[str, str | None, str]]:
    """Every `${NAME<op><arg>}` in the file: (name, operator or None, argument)."""
    return [
        (m.group(1), m.group(2), m.group(3) or "")
        for m in INTERPOLATION.finditer(compose_text)
        if m.group(1)
    ]


def _all_strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _all_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _all_strings(v)]
    return [value] if isinstance(value, str) else []


def _parse_port(entry: Any) -> tuple[str, str, str]:
    """(host_ip, published, target) of a compose `ports` entry, short or long syntax."""
    if isinstance(entry, dict):
        return str(entry.get("host_ip", "")), str(entry.get("published", "")), str(entry["target"])
    parts = str(entry).split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return "", parts[0], parts[1]
    return "", "", parts[0]


def test_published_ports_bind_to_loopback_unless_the_user_opens_them(
    compose: dict[str, Any],
) -> None:
    published = []
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", name
        for entry in service.get("ports", []):
            raw_ip = _parse_port(entry)[0] if isinstance(entry, dict) else str(entry)
            assert "${MULTITAG_BIND_ADDRESS:-127.0.0.1}" in raw_ip, f"{name}: {entry!r}"
            host_ip, port, target = _parse_port(interpolate(entry, {}))
            assert host_ip == "127.0.0.1", f"{name}: {entry!r} publishes beyond loopback"
            assert port and target, f"{name}: {entry!r} publishes a random host port"
            published.append((name, port))
            opened = _parse_port(interpolate(entry, {"MULTITAG_BIND_ADDRESS": "10.0.0.5"}))
            assert opened[0] == "10.0.0.5"  # the variable really opens it
    assert sorted(published) == [("minio", "9000"), ("minio", "9001"), ("server", "4200")]
    assert "postgres" not in {n for n, _ in published}
    assert "0.0.0.0:" not in COMPOSE.read_text()


def test_no_secret_has_a_default_and_every_secret_is_required(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    uses = variable_uses(text)
    secrets = {name for name, _, _ in uses if SECRET_NAME.search(name)}
    assert secrets == set(THROWAWAY_SECRETS)
    for name, op, _ in uses:
        if name in secrets:
            assert op == ":?", f"${{{name}}} must be ${{{name}:?...}} (required, no default)"
    # Secret-like settings are never literals: each one comes from a required variable.
    for sname, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.search(r"\$\{\w+:\?", str(value)), f"{sname}.{key} = {value!r}"


def test_compose_refuses_to_start_without_the_secrets_and_resolves_with_them(
    compose: dict[str, Any],
) -> None:
    for missing in THROWAWAY_SECRETS:
        env = {k: v for k, v in THROWAWAY_SECRETS.items() if k != missing}
        with pytest.raises(MissingVariable, match=missing):
            interpolate(compose, env)
    resolved = interpolate(compose, THROWAWAY_SECRETS)
    leftovers = [s for s in _all_strings(resolved) if "${" in s]
    assert not leftovers


def test_workers_get_a_store_user_never_the_root_credentials(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        used = {n for s in _all_strings(service) for n, _, _ in variable_uses(s)}
        if name in {"minio", "create-bucket"}:
            continue
        assert not used & ROOT_VARS, f"{name} sees MinIO's root credentials"
    env = {**THROWAWAY_SECRETS, "MINIO_ROOT_USER": "root-user"}
    for name in ("worker", "worker-gpu"):
        worker_env = interpolate(services[name]["environment"], env)
        assert worker_env["AWS_ACCESS_KEY_ID"] == "multitag-worker"
        assert worker_env["AWS_SECRET_ACCESS_KEY"] == THROWAWAY_SECRETS["MULTITAG_STORE_PASSWORD"]
        assert THROWAWAY_SECRETS["MINIO_ROOT_PASSWORD"] not in json.dumps(worker_env)
    # The setup job makes exactly that user and gives it exactly the worker policy.
    setup = services["create-bucket"]
    script = " ".join(setup["command"])
    assert 'mc admin user add local "$$MULTITAG_STORE_USER" "$$MULTITAG_STORE_PASSWORD"' in script
    assert 'mc admin policy attach local multitag-worker --user "$$MULTITAG_STORE_USER"' in script
    (mount,) = setup["configs"]
    assert mount["source"] == "worker-policy"
    assert f"mc admin policy create local multitag-worker {mount['target']}" in script


def test_the_worker_policy_grants_only_the_named_prefixes(compose: dict[str, Any]) -> None:
    content = interpolate(
        compose["configs"]["worker-policy"]["content"], {"MULTITAG_BUCKET": "photos"}
    )
    policy = json.loads(content)
    bucket = "arn:aws:s3:::photos"
    read_only = {f"{bucket}/incoming/*"}
    read_write = {f"{bucket}/home/models/*", f"{bucket}/home/tags/*", f"{bucket}/tags/*"}
    grants: dict[str, set[str]] = {}
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st
        for action in st["Action"]:
            assert action.startswith("s3:") and "*" not in action, action
            grants.setdefault(action, set()).update(st["Resource"])
        if "s3:ListBucket" in st["Action"]:
            prefixes = st["Condition"]["StringLike"]["s3:prefix"]
            assert all(p.split("/")[0] in {"incoming", "home", "tags"} for p in prefixes)
            assert all(
                p in {"home", "home/"}
                or p.startswith(("incoming", "home/models", "home/tags", "tags"))
                for p in prefixes
            )
    assert grants["s3:ListBucket"] == grants["s3:GetBucketLocation"] == {bucket}
    assert grants["s3:GetObject"] == read_only | read_write
    for write in ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
        assert grants[write] == read_write, write
    assert set(grants) == {
        "s3:ListBucket",
        "s3:GetBucketLocation",
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
    }
    # The prefixes are the ones the stack uses: the tag source/output and MULTITAG_HOME.
    services = interpolate(compose["services"], {**THROWAWAY_SECRETS, "MULTITAG_BUCKET": "photos"})
    assert services["deploy"]["environment"]["MULTITAG_TAG_SOURCE"] == "s3://photos/incoming/"
    assert services["deploy"]["environment"]["MULTITAG_TAG_OUT"] == "s3://photos/tags/"
    assert services["worker"]["environment"]["MULTITAG_HOME"] == "s3://photos/home"


def test_the_prefect_api_asks_every_client_for_the_auth_string(compose: dict[str, Any]) -> None:
    env = interpolate(compose["services"], THROWAWAY_SECRETS)
    auth = THROWAWAY_SECRETS["PREFECT_AUTH_STRING"]
    assert env["server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == auth
    for client in ("deploy", "worker", "worker-gpu"):
        assert env[client]["environment"]["PREFECT_API_AUTH_STRING"] == auth, client
    # The health check stays unauthenticated on purpose (Prefect exempts /api/health).
    assert "/api/health" in " ".join(compose["services"]["server"]["healthcheck"]["test"])


def test_docker_compose_config_refuses_without_secrets_and_accepts_them(tmp_path: Path) -> None:
    """Where a Docker CLI with compose exists, it agrees with the checks above."""
    import os
    import shutil
    import subprocess

    docker = shutil.which("docker")
    has_compose = (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    )
    if not has_compose:
        pytest.skip("no `docker compose` here; the static checks above still ran")
    base_env = {k: v for k, v in os.environ.items() if k not in THROWAWAY_SECRETS}
    cmd = [docker, "compose", "--env-file", os.devnull, "-f", str(COMPOSE), "config", "--quiet"]
    refused = subprocess.run(cmd, env=base_env, capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "infra/.env" in refused.stderr
    ok = subprocess.run(
        cmd, env={**base_env, **THROWAWAY_SECRETS}, capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stderr
