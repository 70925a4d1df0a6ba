"""Tasks of the tag flow. One task per shard of images, never per image: the Prefect server
pays ~25 ms of CPU per task run, so a million images are ~1,000 shard tasks, not a million."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from multitag import tagging
from multitag.config import TagParams
from multitag.errors import InputError
from multitag.inference.faults import TransientReadError, UnreadableImageError
from multitag.inference.sources import local_path
from multitag.registry import RegistryError
from tasks import events
from tasks.artifacts import (
    batch_callback,
    dataset_key,
    fmt,
    publish_location,
    publish_markdown,
    publish_table,
)


class SourceNotFoundError(InputError, FileNotFoundError):
    """The source to tag does not exist (no such folder, no objects under the prefix).

    Why a class here: the library reports it as the FileNotFoundError it is; for the command
    it means the input could not be used (exit 2), not that the run failed. It stays a
    FileNotFoundError, so whatever catches that still does.
    """


@task(name="resolve-model", retries=2, retry_delay_seconds=[2, 10])
def resolve_model(params: TagParams) -> str:
    version = tagging.resolve_model_version(params)
    get_run_logger().info("tagging with model version %s", version)
    return version


def _retry_listing(task: Any, run: Any, state: Any) -> bool:
    """A missing or unreachable source fails fast: the S3 client already retried the call."""
    try:
        state.result()
    except (FileNotFoundError, tagging.TaggingError):
        return False
    except Exception:
        return True
    return False


@task(
    name="plan-tagging",
    retries=2,
    retry_delay_seconds=[2, 10],
    timeout_seconds=3600,
    retry_condition_fn=_retry_listing,
)
def plan_tagging(params: TagParams, model_version: str, run_id: str) -> tagging.RunPlan:
    """List the source and claim the images not yet tagged by this model version."""
    try:
        plan = tagging.plan_run(params, model_version=model_version, run_id=run_id)
    except FileNotFoundError as e:
        names = (params.source.rstrip("/"), local_path(params.source))
        if isinstance(e, SourceNotFoundError) or not any(n and n in str(e) for n in names):
            raise  # not the source's own absence (the listing names it in its message)
        raise SourceNotFoundError(str(e)) from e
    get_run_logger().info(
        "listed %d images: %d already tagged, %d new, %d resumed, %d error rows retried; "
        "%d shard(s) of <= %d",
        plan.n_listed,
        plan.n_skipped,
        plan.n_new,
        plan.n_resumed,
        plan.n_retried,
        len(plan.shards),
        plan.shard_size,
    )
    return plan


def is_weather(exc: BaseException) -> bool:
    """Whether a shard failed for a reason that may pass (network, credentials, throttling,
    a hung read cut by the shard timeout), so a retry can succeed.

    Facts about an image are error rows, never exceptions; what is left is weather or a
    mistake (a model that does not match the plan, a broken registry) that a retry repeats.
    botocore and aiohttp errors that s3fs lets through are all about reaching the store.
    """
    if isinstance(exc, UnreadableImageError):  # a fact about one image (if one escapes)
        return False
    if isinstance(exc, TransientReadError | OSError):  # TimeoutError, ConnectionError too
        return True
    if isinstance(exc, tagging.TaggingError | RegistryError):
        return False
    return any(c.__module__.split(".")[0] in ("botocore", "aiohttp") for c in type(exc).__mro__)


def _retry_weather(task: Any, run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry a shard only when it failed for weather."""
    try:
        state.result()
    except Exception as exc:
        return is_weather(exc)
    return False


# Backoff for weather: the flow sets the delays from `TagParams.shard_retry_delays_s`
# (default 5, 30, 120 s); jitter keeps the shards of a run (and of runs sharing a store) from
# retrying in lock step. A shard still failing after the last retry fails the run; its images
# stay untagged for the next run.
SHARD_RETRY_DEFAULTS_S = [5.0, 30.0, 120.0]
SHARD_RETRY_JITTER = 0.5


@task(
    name="tag-shard",
    retries=len(SHARD_RETRY_DEFAULTS_S),
    retry_delay_seconds=SHARD_RETRY_DEFAULTS_S,
    retry_jitter_factor=SHARD_RETRY_JITTER,
    retry_condition_fn=_retry_weather,
    task_run_name="tag-shard-{spec.shard_id}",
)
def tag_shard(spec: tagging.ShardSpec, params: TagParams, run_id: str) -> tagging.ShardResult:
    """Idempotent: a shard already written (by a retry or another run) is skipped.

    The flow sets its timeout (`params.shard_timeout_s`) with `with_options`.
    """
    tagger = tagging.tagger_for(params, spec.model_version)
    on_batch = batch_callback(run_id, spec.shard_id)  # the run's progress bar, per batch
    return tagging.tag_shard(spec, tagger, run_id=run_id, on_batch=on_batch)


@task(name="write-manifest", retries=2, retry_delay_seconds=[2, 10])
def write_manifest(
    plan: tagging.RunPlan, results: list[tagging.ShardResult], tag_s: float, error: str | None
) -> dict[str, Any]:
    """Written last, even when a shard failed, so every run leaves a record of what it did."""
    summary = tagging.summarize_run(plan, results, tag_s=tag_s, error=error)
    tagging.write_manifest(summary)
    publish_markdown(
        dataset_key("tagging-summary", summary.dataset),
        _summary_markdown(summary),
        f"tagging run {summary.run_id}: counts, speed, label rates and drift",
    )
    publish_table(
        dataset_key("label-rates", summary.dataset),
        _rate_rows(summary),
        "label rates vs training prevalence",
    )
    publish_location(
        dataset_key("tags-output", summary.dataset),
        summary.output_uri,
        f"Parquet output of model {summary.model_version}",
        folder=True,
    )
    publish_location(
        dataset_key("tagging-manifest", summary.dataset),
        summary.manifest_uri,
        f"manifest of run {summary.run_id}",
        folder=False,
    )
    record = summary.to_dict()
    _announce(record)
    return record


def _announce(record: dict[str, Any]) -> None:
    """`multitag.tagging.completed` for a run without a failed shard; `multitag.drift.flagged`
    whenever the tagged images' label rates drifted (a partial run's images are still facts)."""
    if record["error"] is None:
        events.emit_tagging_completed(record)
    if record["drift"]["flagged"]:
        events.emit_drift_flagged(record)


def _rate_rows(summary: tagging.TagSummary) -> list[dict[str, Any]]:
    d = summary.drift
    return [
        {
            "label": e.label,
            "count": e.count,
            "rate": fmt(e.rate),
            "train_rate": fmt(e.train_rate),
            "drift": "FLAGGED" if e.flagged else "",
        }
        for e in [*d.labels, d.none]
    ]


def _summary_markdown(s: tagging.TagSummary) -> str:
    rate = f"{s.images_per_s:.1f}" if s.images_per_s else "n/a"
    lines = [
        f"# Tagging run `{s.run_id}` — {s.status}",
        "",
        "| model | listed | tagged | failed | skipped | resumed | images/s | seconds |",
        "|---|---|---|---|---|---|---|---|",
        f"| `{s.model_version}` | {s.listed} | {s.tagged} | {s.failed} | {s.skipped} | "
        f"{s.resumed} | {rate} | {s.seconds.get('total_s', 0):.1f} |",
        "",
        f"- source: `{s.source}`",
        f"- output: `{s.output_uri}`",
        f"- manifest: `{s.manifest_uri}`",
    ]
    if s.error_kinds:
        lines.append(
            "- errors: " + ", ".join(f"{k}: {v}" for k, v in sorted(s.error_kinds.items()))
        )
    lines.append(f"- drift: {', '.join(s.drift.flagged) or 'nothing flagged'} ({s.drift.note})")
    if s.error:
        lines.append(f"- **run error**: {s.error}")
    return "\n".join(lines) + "\n"
