"""Prefect events the flows emit, so automations and deployment triggers can react to them.

Why events: "re-tag when a model is promoted" or "notify when label rates drift" are
reactions a user configures on the server (a deployment trigger in infra/prefect.yaml, an
automation), not code paths in the flows. Each event names a resource a trigger can match:

- `multitag.model.<version>` for `multitag.model.registered` and `multitag.model.promoted`,
  with the dataset it was trained on as a related resource (role `dataset`);
- `multitag.dataset.<name>` for `multitag.tagging.completed`, `multitag.drift.flagged` and
  `multitag.contract.failed`, with the model (role `model`) where there is one.

Prefect adds the flow run, task run, flow and deployment that emitted an event as further
related resources. Emitting never fails a run: an event is a notice about work already done,
so a server that cannot take it costs a warning in the log, not the work.
"""

from __future__ import annotations

import logging
from typing import Any

MODEL_REGISTERED = "multitag.model.registered"
MODEL_PROMOTED = "multitag.model.promoted"
TAGGING_COMPLETED = "multitag.tagging.completed"
DRIFT_FLAGGED = "multitag.drift.flagged"
CONTRACT_FAILED = "multitag.contract.failed"

logger = logging.getLogger(__name__)


def model_resource_id(version: str) -> str:
    return f"multitag.model.{version}"


def dataset_resource_id(name: str) -> str:
    return f"multitag.dataset.{name}"


def _model(version: str, role: str | None = None) -> dict[str, str]:
    resource = {"prefect.resource.id": model_resource_id(version), "prefect.resource.name": version}
    return resource | ({"prefect.resource.role": role} if role else {})


def _dataset(name: str, role: str | None = None) -> dict[str, str]:
    resource = {"prefect.resource.id": dataset_resource_id(name), "prefect.resource.name": name}
    return resource | ({"prefect.resource.role": role} if role else {})


def emit(
    event: str,
    resource: dict[str, str],
    payload: dict[str, Any],
    related: list[dict[str, str]] | None = None,
) -> Any:
    """`prefect.events.emit_event`, with any failure logged as a warning instead of raised.

    Returns the event sent, or None (not sent: no server to send to, or it failed).
    """
    try:
        from prefect.events import emit_event

        return emit_event(event=event, resource=resource, related=related, payload=payload)
    except Exception as e:  # an unreachable server, an oversized payload: never the run's fault
        _run_logger().warning("could not emit the event %s for %s: %s", event, resource, e)
        return None


def _run_logger() -> Any:
    """The run's logger inside a flow or task (the warning then shows on its page), else ours."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # MissingContextError: called outside a run
        return logger


def _metric_values(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The validation numbers a trigger or a person compares models by (numbers only)."""
    validation = (metrics or {}).get("validation") or {}
    keys = ("mAP", "accuracy_multi", "f1_micro", "f1_macro")
    return {k: validation[k] for k in keys if isinstance(validation.get(k), int | float)}


def emit_model_registered(
    version: str,
    dataset_name: str,
    *,
    model_name: str | None = None,
    uri: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> Any:
    """A new immutable version is in the registry (promoted or not)."""
    return emit(
        MODEL_REGISTERED,
        _model(version),
        {
            "version": version,
            "name": model_name or dataset_name,
            "dataset": dataset_name,
            "uri": uri,
            "metrics": _metric_values(metrics),
        },
        [_dataset(dataset_name, "dataset")],
    )


def emit_model_promoted(
    version: str,
    dataset_name: str,
    decision: dict[str, Any],
    *,
    model_name: str | None = None,
    uri: str | None = None,
) -> Any:
    """`version` became champion: what the re-tag trigger in infra/prefect.yaml waits for.

    Call it only when the gate promoted (`decision["promoted"]`); the payload carries both
    sides of the comparison so a notification can say why.
    """
    related = [_dataset(dataset_name, "dataset")]
    if decision.get("champion_version"):
        related.append(_model(str(decision["champion_version"]), "previous-champion"))
    keys = ("metric", "candidate_value", "champion_value", "champion_version", "forced")
    return emit(
        MODEL_PROMOTED,
        _model(version),
        {
            "version": version,
            "name": model_name or dataset_name,
            "dataset": dataset_name,
            "uri": uri,
            **{k: decision.get(k) for k in keys},
        },
        related,
    )


def emit_tagging_completed(summary: dict[str, Any]) -> Any:
    """A tagging run finished and wrote its manifest (`summary` is the manifest's dict)."""
    return emit(
        TAGGING_COMPLETED,
        _dataset(summary["dataset"]),
        {
            "run_id": summary["run_id"],
            "version": summary["model_version"],
            "source": summary["source"],
            "output_uri": summary["output_uri"],
            "manifest_uri": summary["manifest_uri"],
            **{k: summary[k] for k in ("listed", "tagged", "failed", "skipped")},
            "images_per_s": summary.get("images_per_s"),
            "drift_flagged": list(summary["drift"]["flagged"]),
        },
        [_model(summary["model_version"], "model")],
    )


def emit_drift_flagged(summary: dict[str, Any]) -> Any:
    """Label rates of a tagging run moved away from training prevalence (the drift rule).

    The payload has each flagged label's rate next to its training rate, so a notification
    can show the numbers without opening the manifest.
    """
    drift = summary["drift"]
    flagged = set(drift["flagged"])
    rates = [*drift["labels"], drift["none"]]
    return emit(
        DRIFT_FLAGGED,
        _dataset(summary["dataset"]),
        {
            "run_id": summary["run_id"],
            "version": summary["model_version"],
            "flagged": list(drift["flagged"]),
            "rates": {
                r["label"]: {"rate": r["rate"], "train_rate": r["train_rate"], "count": r["count"]}
                for r in rates
                if r["label"] in flagged
            },
            "n_images": drift["n_images"],
            "rule": drift["rule"],
            "manifest_uri": summary["manifest_uri"],
        },
        [_model(summary["model_version"], "model")],
    )


def emit_contract_failed(
    dataset_name: str,
    dataset_dir: str,
    report: dict[str, Any],
    report_uri: str,
    first_error: str | None = None,
) -> Any:
    """train.csv broke its data contract; the run fails right after this, before training.

    `report` is the contract report's summary; only its counts travel (label counts of a big
    vocabulary could outgrow an event), the full list is in `report_uri`.
    """
    keys = ("contract", "n_rows", "n_errors", "n_warnings", "errors_by_rule")
    return emit(
        CONTRACT_FAILED,
        _dataset(dataset_name),
        {
            "dataset": dataset_name,
            "dataset_dir": dataset_dir,
            "report_uri": report_uri,
            "first_error": first_error,
            **{k: report.get(k) for k in keys},
        },
    )
