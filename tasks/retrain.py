"""Tasks of the retrain flow: each calls one library step, logs, publishes, returns a reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from multitag import registry, storage
from multitag.config import BASELINE_MARGIN, ThresholdParams, TrainParams
from multitag.data import contracts, datasets
from multitag.errors import RunFailedError
from multitag.training import reports, retraining
from tasks.artifacts import fmt, publish_link, publish_markdown, publish_table


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


@task(name="validate-contract")
def validate_contract(dataset_dir: str, report_dir: str) -> dict[str, Any]:
    """Fail before training, with every bad row in the UI and in a CSV next to the dataset."""
    logger = get_run_logger()
    report = contracts.validate_dataset(Path(dataset_dir))
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    csv_path = Path(report_dir) / "contract_report.csv"
    report.to_csv(csv_path)
    publish_markdown("contract-report", report.to_markdown(), "train.csv against its data contract")
    if not report.ok:
        publish_table(
            "contract-violations",
            [_violation_row(v) for v in report.errors[:1000]],
            f"{len(report.errors)} rows break the contract; full list in {csv_path}",
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


@task(name="train-model")
def train_model(dataset_dir: str, params: TrainParams) -> str:
    """Returns the staging folder; identical dataset + params reuse a finished one."""
    logger = get_run_logger()
    stage = retraining.staging_root() / retraining.stage_key(dataset_dir, params)
    problem = retraining.stage_problem(stage)
    if problem is None:
        logger.info("reusing finished training for the same data and parameters: %s", stage)
        return str(stage)
    if stage.exists():
        logger.warning("not reusing the training stage %s: %s; training again", stage, problem)

    def on_epoch(row: dict) -> None:
        logger.info("epoch %s: %s", row.get("epoch"), {k: fmt(v) for k, v in row.items()})

    summary = retraining.train_stage(dataset_dir, params, stage, on_epoch=on_epoch)
    publish_table(
        "training-metrics",
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
) -> str:
    version = retraining.register_stage(
        stage_dir,
        home,
        dataset=dataset,
        contract_summary=contract_summary,
        fastpath_check_images=fastpath_check_images,
    )
    info = registry.show_version(home, version)
    publish_markdown(
        "model-report", _report_markdown(info), f"model {version}: metrics, thresholds and plots"
    )
    _publish_fastpath(version, (info.get("metrics") or {}).get("fastpath"))
    get_run_logger().info("registered model version %s", version)
    return version


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
        for name in (reports.CURVES_PNG, reports.AP_PNG)
        if f"]({name})" in report
    }
    return reports.inline_images(report, pngs)


@task(name="promote-if-better", retries=2, retry_delay_seconds=[5, 30])
def promote_if_better(
    home: str | None,
    version: str,
    metric: str,
    force: bool,
    baseline_margin: float = BASELINE_MARGIN,
) -> dict[str, Any]:
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
    publish_link("model-location", uri, version, "registry folder of this model version")
    return d
