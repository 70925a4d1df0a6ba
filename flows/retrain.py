"""The retrain flow: acquire -> validate -> train -> thresholds -> register -> gate."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from multitag.config import RetrainParams, get_settings
from multitag.registry.naming import default_model_name
from multitag.storage import is_local
from multitag.training.retraining import staging_root
from tasks.artifacts import add_run_tags, route_library_logs
from tasks.retrain import (
    acquire_dataset,
    find_unchanged_model,
    promote_if_better,
    register_model,
    select_thresholds,
    train_model,
    validate_contract,
)


def _dataset_name(params: RetrainParams) -> str:
    return params.data.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tgz").removesuffix(".tar.gz")


def _no_new_data(version: str, home: str, dataset_dir: str) -> dict[str, Any]:
    """A scheduled retrain on data a version was already trained on: reuse it, train nothing."""
    reason = (
        f"no new data since {version}: same dataset content and parameters, so nothing was "
        "trained or registered (retrain_unchanged=True trains anyway)"
    )
    get_run_logger().info(reason)
    decision = {"promoted": False, "reason": reason, "candidate": version}
    return {
        "version": version,
        "decision": decision,
        "reused": True,
        "home": home,
        "dataset_dir": dataset_dir,
    }


@flow(
    name="retrain",
    flow_run_name="retrain-{params.train.arch}",
    log_prints=True,
    retries=0,
)
def retrain(params: RetrainParams) -> dict[str, Any]:
    """Train a candidate on the dataset and make it champion only if it beats the current one."""
    route_library_logs()
    add_run_tags(f"dataset:{_dataset_name(params)}")
    home = get_settings(params.home).home
    # Datasets are extracted where training reads them: on this worker's disk, even when the
    # registry root is an object store.
    data_home = home if is_local(home) else str(staging_root().parent)
    dataset_dir = acquire_dataset(params.data, data_home, params.data_sha256)
    contract = validate_contract(
        dataset_dir, report_dir=f"{dataset_dir}/_reports", dataset_name=_dataset_name(params)
    )
    if not params.retrain_unchanged:
        model_name = params.model_name or default_model_name(_dataset_name(params))
        done = find_unchanged_model(home, dataset_dir, params.train, params.thresholds, model_name)
        if done is not None:
            return _no_new_data(done, home, dataset_dir)
    stage = train_model(dataset_dir, params.train, dataset_name=_dataset_name(params), home=home)
    stage = select_thresholds(stage, params.thresholds)
    dataset = {"uri": params.data, "local_path": dataset_dir, "name": _dataset_name(params)}
    version = register_model(
        stage, home, dataset, contract, params.fastpath_check_images, params.model_name
    )
    add_run_tags(f"model:{version}")
    decision = promote_if_better(
        home,
        version,
        params.promote_metric,
        params.force_promote,
        params.baseline_margin,
        dataset_name=dataset["name"],
    )
    get_run_logger().info("model %s registered; promoted=%s", version, decision.get("promoted"))
    return {"version": version, "decision": decision, "home": home, "dataset_dir": dataset_dir}
