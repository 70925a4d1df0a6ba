"""Tasks of the retrain flow: each calls one library step, logs, publishes, returns a reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from multitag import registry, storage
from multitag.config import BASELINE_MARGIN, ThresholdParams, TrainParams, get_settings
from multitag.data import contracts, datasets
from multitag.data.fingerprint import fingerprint_folder
from multitag.errors import RunFailedError
from multitag.registry.versions import find_version_trained_on
from multitag.training import checkpoints, reports, retraining
from tasks import events
from tasks.artifacts import (
    ProgressArtifact,
    dataset_key,
    fmt,
    publish_location,
    publish_markdown,
    publish_table,
)


class ContractViolationError(RunFailedError, RuntimeError):
    """train.csv broke its contract: retrying cannot help, so this is never retried."""


@task(
    name="acquire-dataset",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    timeout_seconds=3600,
    retry_condition_fn=lambda task, run, state: _is_transient(state),
    log_prints=False,  # the download progress bar belongs on the terminal, not in run logs
)
def acquire_dataset(url: str, home: str | None, sha256: str | None = None) -> str:
    path = datasets.acquire(url, home, sha256=sha256)
    get_run_logger().info("dataset ready at %s", path)
    return str(path)


def _is_transient(state: Any) -> bool:
    """Retry network trouble and truncated downloads, not 404s, bad layouts or unsafe archives."""
    try:
        state.result()
    except datasets.DatasetError as e:
        return bool(getattr(e, "retryable", False))
    except (OSError, TimeoutError):
        return True
    except Exception:
        return False
    return False


@task(name="find-unchanged-model")
def find_unchanged_model(
    home: str | None,
    dataset_dir: str,
    train: TrainParams,
    thresholds: ThresholdParams,
    model_name: str | None = None,
) -> str | None:
    """The version already trained on this dataset's content with these parameters, if any."""
    content = fingerprint_folder(dataset_dir).sha256
    version = find_version_trained_on(
        home,
        content,
        train_params=train.model_dump(mode="json"),
        threshold_params=thresholds.model_dump(mode="json"),
        name=model_name,
    )
    if version is not None:
        get_run_logger().info(
            "no new data since %s: dataset content %s and parameters are unchanged",
            version,
            content[:16],
        )
    return version


@task(name="validate-contract")
def validate_contract(
    dataset_dir: str, report_dir: str, dataset_name: str | None = None
) -> dict[str, Any]:
    """Fail before training, with every bad row in the UI and in a CSV next to the dataset.

    `dataset_name`: the name in the `multitag.contract.failed` event (default: the folder's).
    """
    logger = get_run_logger()
    report = contracts.validate_dataset(Path(dataset_dir))
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    csv_path = Path(report_dir) / "contract_report.csv"
    report.to_csv(csv_path)
    publish_markdown(
        dataset_key("contract-report", dataset_name),
        report.to_markdown(),
        "train.csv against its data contract",
    )
    if not report.ok:
        publish_table(
            "contract-violations",
            [_violation_row(v) for v in report.errors[:1000]],
            f"{len(report.errors)} rows break the contract; full list in {csv_path}",
        )
        events.emit_contract_failed(
            dataset_name or Path(dataset_dir).name,
            dataset_dir,
            report.summary(),
            str(csv_path),
            report.errors[0].message,
        )
        raise ContractViolationError(
            f"train.csv in {dataset_dir} breaks its data contract: {len(report.errors)} error(s), "
            f"first: {report.errors[0].message}. Full report: {csv_path}"
        )
    for w in report.warnings:
        logger.warning("contract warning: %s", w.message)
    logger.info(
        "contract holds: %d rows (%d train, %d valid)",
        report.n_rows,
        report.n_train,
        report.n_valid,
    )
    return report.summary()


def _violation_row(v: Any) -> dict[str, Any]:
    return {
        "line": v.line,
        "row": v.row,
        "column": v.column,
        "value": v.value,
        "rule": v.rule,
        "message": v.message,
        "hint": v.hint,
    }


def _retry_infrastructure(task: Any, run: Any, state: Any) -> bool:
    """Retry a node, network, storage or GPU failure (see checkpoints.is_infrastructure_failure);
    never bad input. Each retry resumes from the last epoch checkpoint, not from epoch 0."""
    try:
        state.result()
    except Exception as exc:
        return checkpoints.is_infrastructure_failure(exc)
    return False


@task(
    name="train-model",
    retries=2,
    retry_delay_seconds=[30, 120],
    retry_condition_fn=_retry_infrastructure,
)
def train_model(
    dataset_dir: str,
    params: TrainParams,
    dataset_name: str | None = None,
    home: str | None = None,
) -> str:
    """Returns the staging folder; identical dataset + params reuse a finished one.

    Checkpoints every epoch under `<home>/checkpoints/<stage key>`: a retry, a re-created pod
    or a new run with the same data and parameters resumes at the next epoch.

    The UI shows `training-progress-<dataset>`, moved within each epoch (at most every
    `PROGRESS_INTERVAL_S`) and at each epoch's end, and `training-metrics-<dataset>`.
    """
    logger = get_run_logger()
    stage = retraining.staging_root() / retraining.stage_key(dataset_dir, params)
    problem = retraining.stage_problem(stage)
    if problem is None:
        logger.info("reusing finished training for the same data and parameters: %s", stage)
        return str(stage)
    if stage.exists():
        logger.warning("not reusing the training stage %s: %s; training again", stage, problem)

    n_epochs = max(params.epochs + (params.freeze_epochs if params.pretrained else 0), 1)
    progress = ProgressArtifact(
        dataset_key("training-progress", dataset_name),
        f"training {params.arch} for {n_epochs} epoch(s) on {dataset_name or dataset_dir}",
    )

    def on_epoch(row: dict) -> None:
        logger.info("epoch %s: %s", row.get("epoch"), {k: fmt(v) for k, v in row.items()})
        progress.set(100.0 * int(row.get("epoch") or 0) / n_epochs, force=True)

    def on_progress(fraction: float) -> None:
        progress.set(100.0 * fraction)

    location = checkpoints.checkpoint_location(get_settings(home).home, stage.name)
    summary = retraining.train_stage(
        dataset_dir, params, stage, on_epoch=on_epoch, on_progress=on_progress,
        checkpoint_dir=location,
    )  # fmt: skip
    if summary.get("resumed_at_epoch"):
        logger.info("resumed from the checkpoint at epoch %d", summary["resumed_at_epoch"])
    progress.set(100.0, force=True)
    publish_table(
        dataset_key("training-metrics", dataset_name),
        [{k: fmt(v) for k, v in r.items()} for r in summary["history"]],
        f"per-epoch metrics ({summary['device']}, {summary['wall_time_s']:.0f} s)",
    )
    return str(stage)


@task(name="select-thresholds")
def select_thresholds(stage_dir: str, params: ThresholdParams) -> str:
    result = retraining.threshold_stage(stage_dir, params)
    ts, ev = result["thresholds"], result["evaluation"]
    rows = [
        {
            "label": label,
            "threshold": fmt(ts["per_label"][label]),
            "support": ts["support"].get(label),
            **_label_metrics(ev["validation"], label),
        }
        for label in ts["vocab"]
    ]
    publish_table(
        "threshold-table",
        rows,
        f"policy={ts['policy']} objective={ts['objective']} "
        f"global={ts['global_threshold']:.4f} (chosen on validation)",
    )
    publish_markdown(
        "threshold-evaluation",
        _evaluation_markdown(ev),
        "chosen thresholds judged on validation and on held-out test images",
    )
    return stage_dir


def _label_metrics(evaluation: dict, label: str) -> dict[str, Any]:
    per = evaluation.get("per_label", {}).get(label, {})
    return {k: fmt(per.get(k)) for k in ("ap", "f1", "precision", "recall")}


def _evaluation_markdown(ev: dict) -> str:
    keys = ("accuracy_multi", "f1_micro", "f1_macro", "mAP", "none_rate")
    cols = [
        c for c in ("validation", "test", "test_global_policy", "test_best_global") if ev.get(c)
    ]
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(str(fmt(ev[c].get(k))) for c in cols) + " |")
    note = (
        "\n`test` is the chosen policy on held-out test images; `test_global_policy` is one "
        "global threshold chosen on validation, judged on test (the baseline to match); "
        "`test_best_global` is the global threshold picked on test itself (an upper bound).\n"
    )
    return "\n".join(lines) + ("\n" + note if "test_best_global" in cols else "\n")


@task(name="register-model", retries=2, retry_delay_seconds=[5, 30])
def register_model(
    stage_dir: str,
    home: str | None,
    dataset: dict,
    contract_summary: dict,
    fastpath_check_images: int = 1000,
    model_name: str | None = None,
) -> str:
    version = retraining.register_stage(
        stage_dir,
        home,
        dataset=dataset,
        contract_summary=contract_summary,
        fastpath_check_images=fastpath_check_images,
        model_name=model_name,
    )
    info = registry.show_version(home, version)
    publish_markdown(
        dataset_key("model-report", dataset.get("name")),
        _report_markdown(info) + _training_plots_markdown(stage_dir, info),
        f"model {version}: metrics, thresholds, training curves and precision-recall",
    )
    _publish_fastpath(version, (info.get("metrics") or {}).get("fastpath"))
    get_run_logger().info("registered model version %s", version)
    events.emit_model_registered(
        version,
        dataset["name"],
        model_name=_model_name(info),
        uri=info.get("uri"),
        metrics=info.get("metrics"),
    )
    return version


def _model_name(info: dict[str, Any]) -> str | None:
    """The version's model name (version.json / metrics "name"); None: the dataset's."""
    return info.get("name") or (info.get("metrics") or {}).get("name")


def _publish_fastpath(version: str, summary: dict[str, Any] | None) -> None:
    """The export-time fast-path check in the UI: what `precision=auto` will run, and why."""
    if not summary:
        return
    if "error" in summary:
        get_run_logger().warning("model %s has no fast path: %s", version, summary["error"])
        return
    rows = [
        {"candidate": name, "agreement_with_fp32": fmt(agree),
         "images_per_s": summary["images_per_s"].get(name),
         "chosen": name == summary["chosen"]}
        for name, agree in summary["agreement"].items()
    ]  # fmt: skip
    publish_table(
        "fast-path-check",
        rows,
        f"model {version}: CPU fast paths checked on {summary['n_check']} validation images; "
        f"precision=auto runs {summary['chosen']}",
    )


def _report_markdown(info: dict) -> str:
    """The registry's report.md with its plots inlined, so they show in the Prefect UI."""
    report = info.get("report_md") or ""
    if not report:
        return f"Model {info.get('version')}: see the registry folder {info.get('uri')}"
    pngs = {
        name: storage.read_bytes(storage.join(info["uri"], name))
        for name in (reports.CURVES_PNG, reports.AP_PNG, reports.RELIABILITY_PNG)
        if f"]({name})" in report
    }
    return reports.inline_images(report, pngs)


def _training_plots_markdown(stage_dir: str, info: dict[str, Any]) -> str:
    """Loss/metric curves per epoch and per-label precision-recall on validation, inlined.

    Drawn from what the stage kept (history, validation scores); a plot that cannot be drawn
    is logged, never fails the task: the model is already registered, and a retry of this
    task would register it again.
    """
    from multitag.training import report_plots  # matplotlib: only when a report is drawn

    images: dict[str, bytes] = {}
    try:
        images["training_curves.png"] = report_plots.plot_training_curves(
            (info.get("metrics") or {}).get("history") or []
        )
        stage = Path(stage_dir)
        vocab = retraining.read_stage_json(stage, retraining.STAGE_TRAIN)["vocab"]
        with np.load(stage / retraining.STAGE_VALID) as preds:
            images["precision_recall.png"] = report_plots.plot_precision_recall(
                preds["probs"], preds["targets"], vocab
            )
    except (OSError, KeyError, ValueError) as exc:
        get_run_logger().warning("model report: a training plot was not drawn: %s", exc)
    titles = {"training_curves.png": "Loss and metrics per epoch",
              "precision_recall.png": "Precision-recall per label (validation)"}  # fmt: skip
    md = "".join(f"\n\n## {titles[name]}\n\n![{titles[name]}]({name})" for name in images)
    return reports.inline_images(md, images) + "\n" if images else ""


@task(name="promote-if-better", retries=2, retry_delay_seconds=[5, 30])
def promote_if_better(
    home: str | None,
    version: str,
    metric: str,
    force: bool,
    baseline_margin: float = BASELINE_MARGIN,
    dataset_name: str | None = None,
) -> dict[str, Any]:
    """The champion gate; a promotion emits `multitag.model.promoted` (for `dataset_name`)."""
    decision = registry.promote_if_better(
        home, version, metric, force=force, baseline_margin=baseline_margin
    )
    d = decision.to_dict() if hasattr(decision, "to_dict") else dict(decision.__dict__)
    publish_table(
        "promotion-decision",
        [{k: fmt(v) for k, v in d.items()}],
        "champion gate: promoted only if the candidate beats guessing by the margin "
        "and beats the champion",
    )
    get_run_logger().info("promotion: %s", d)
    uri = registry.version_uri(home, version)
    publish_location(
        dataset_key("model-location", dataset_name),
        uri,
        f"registry folder of model version {version}",
        folder=True,
    )
    if d.get("promoted"):  # only a real change of champion re-tags (infra/prefect.yaml)
        _announce_promotion(home, version, d, dataset_name, uri)
    return d


def _announce_promotion(
    home: str | None, version: str, decision: dict[str, Any], dataset_name: str | None, uri: str
) -> None:
    """Emit `multitag.model.promoted`; the promotion is done, so nothing here may fail it."""
    try:
        metrics = registry.show_version(home, version).get("metrics") or {}
    except Exception as e:  # the registry just answered; a hiccup now costs the names only
        get_run_logger().warning("model %s: names for the promotion event unread: %s", version, e)
        metrics = {}
    name = dataset_name or (metrics.get("dataset") or {}).get("name") or version
    events.emit_model_promoted(version, name, decision, model_name=metrics.get("name"), uri=uri)
