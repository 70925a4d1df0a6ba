"""The tag flow: resolve the model, plan shards, tag them in parallel, write the manifest.

Why a subflow only for Dask: the task runner is chosen from the run's parameters, and a
flow's runner is fixed when it starts, so a Dask fan-out runs in a `tag-shards` subflow on a
DaskTaskRunner. On one machine the shards run in `tag-images` itself, on its thread pool,
`max_concurrency` at a time: a subflow costs a flow-run creation that Prefect's SQLite
server answered with a 503 (and a 2 s client retry) in 9 of 12 measured runs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from pydantic import ValidationError

from multitag import tagging
from multitag.config import TagParams
from multitag.errors import InputError, RunFailedError
from multitag.inference import tagger
from tasks import artifacts
from tasks.artifacts import (
    ProgressArtifact,
    TaggingProgress,
    add_run_tags,
    dataset_key,
    route_library_logs,
)
from tasks.tagging import plan_tagging, resolve_model, tag_shard, write_manifest


class ShardsFailedError(RunFailedError, RuntimeError):
    """A shard failed after its retries; the run's finished shards and manifest are kept.

    `__cause__` is the shard's own exception (e.g. the ConnectionError that outlasted them).
    """


class _NoWorkerThreadTimeoutWarning(logging.Filter):
    """Drop Prefect's warning that a timeout cannot interrupt a task in a worker thread.

    Why: Prefect delivers a sync task's timeout to its thread as an asynchronous exception,
    which lands when the thread next runs Python code. A shard's waits are all bounded polls
    (the decode pool in `Tagger._prepared_batches`, the head start's join, fsspec's loop), so
    the timeout does interrupt it; the warning would repeat once per shard, i.e. per 1,000
    images.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout of %s seconds configured for this task")


_TIMEOUT_WARNING_FILTER = _NoWorkerThreadTimeoutWarning()


def _quiet_worker_thread_timeout_warning() -> None:
    """Install the filter once, when a run starts (not at import: importing has no effects)."""
    task_logger = logging.getLogger("prefect.task_runs")
    if _TIMEOUT_WARNING_FILTER not in task_logger.filters:
        task_logger.addFilter(_TIMEOUT_WARNING_FILTER)


def dask_runner_for(params: TagParams) -> Any:
    """The Dask runner `params` asks for: a scheduler's address, or a local cluster.

    Without Dask the shards run on `tag-images`' own thread pool (see `_tag_all`).
    """
    from prefect_dask import DaskTaskRunner  # dask + distributed: ~1-2 s, only for Dask runs

    if params.dask_address:
        return DaskTaskRunner(address=params.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": params.dask_local_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
        }
    )


def _tag_run_name() -> str:
    """`tag-<dataset>`: the source's last path part, not a whole URI, heads the UI page."""
    params = flow_run.parameters
    name = params.get("dataset_name")
    return f"tag-{name or tagging.default_dataset_name(str(params.get('source') or ''))}"


@flow(name="tag-shards", flow_run_name="tag-shards-{run_id}")
def tag_shards(params: TagParams, model_version: str, run_id: str) -> dict[str, Any]:
    """Every shard on this flow's (Dask) runner at once; the scheduler spreads them."""
    return _tag_all(params, model_version, run_id, max_in_flight=None)


def _tag_all(
    params: TagParams, model_version: str, run_id: str, *, max_in_flight: int | None
) -> dict[str, Any]:
    """Plan and tag; the plan stays inside this run (it can hold a million URIs).

    `max_in_flight`: shards submitted at once (None: all), so a thread pool never holds more
    taggers' batches in memory than asked for.
    """
    logger = get_run_logger()
    plan = plan_tagging(params, model_version, run_id)
    # Moved per batch by this process's shard tasks, sent at most every PROGRESS_INTERVAL_S.
    progress = TaggingProgress(
        run_id,
        plan.n_pending,
        ProgressArtifact(
            dataset_key("tagging-progress", plan.dataset),
            f"images of run {run_id} ({plan.n_pending} to tag)",
        ),
    )
    # Shards on Dask run in other processes: wait for whole shards, not on a clock.
    wait_s = None if max_in_flight is None else artifacts.PROGRESS_INTERVAL_S
    delays = [float(d) for d in params.shard_retry_delays_s]
    shard_task = tag_shard.with_options(
        timeout_seconds=params.shard_timeout_s,
        retries=len(delays),
        retry_delay_seconds=delays or 0,
    )
    t0 = time.perf_counter()
    todo = iter(plan.shards)
    limit = max_in_flight or max(len(plan.shards), 1)
    pending: set[Any] = set()
    results: list[tagging.ShardResult] = []
    first_error: Exception | None = None
    while True:
        # After a shard failed for good (its retries spent), start no more: the cause (expired
        # credentials, a broken model) would fail them too, each after its own retries.
        while first_error is None and len(pending) < limit:
            if (spec := next(todo, None)) is None:
                break
            pending.add(shard_task.submit(spec, params, run_id))
        if not pending:
            break
        try:
            fut: Any = next(as_completed(list(pending), timeout=wait_s))
        except TimeoutError:  # no shard finished meanwhile: show the batches done so far
            progress.publish()
            continue
        pending.discard(fut)
        try:
            res = fut.result()
        except Exception as e:  # recorded in the manifest, re-raised after it is written
            first_error = first_error or e
            continue
        results.append(res)
        progress.shard_finished(res.shard_id, res.n_images)
        progress.publish()
        _print_progress(progress.done, plan.n_pending, time.perf_counter() - t0)
    progress.close()
    progress.publish(force=True)
    error = None if first_error is None else f"{type(first_error).__name__}: {first_error}"
    summary = write_manifest(plan, results, time.perf_counter() - t0, error)
    if first_error is not None:
        raise ShardsFailedError(
            f"{error} (finished shards are kept; rerun to tag the rest; "
            f"manifest {summary['manifest_uri']})"
        ) from first_error
    logger.info(
        "tagged %s, failed %s, skipped %s -> %s",
        summary["tagged"],
        summary["failed"],
        summary["skipped"],
        summary["output_uri"],
    )
    return summary


def _print_progress(done: int, total: int, elapsed: float) -> None:
    """A progress line on an interactive terminal; the UI has the progress artifact."""
    if not sys.stderr.isatty():
        return
    rate = done / elapsed if elapsed > 0 else 0.0
    end = "\n" if done >= total else ""
    sys.stderr.write(f"\rtagged {done}/{total} images ({rate:.1f}/s)" + end)
    sys.stderr.flush()


@contextmanager
def _shards_stop_on_sigterm() -> Iterator[None]:
    """SIGTERM stops the shards in progress first, then goes to Prefect's own handler.

    Why: Prefect turns SIGTERM into a TerminationSignal in the flow's thread, marks the run
    Crashed and re-sends the signal to the handler from before the run (the CLI's, or the
    default: exit). But first it shuts its task thread pool down *waiting* for the running
    tasks: a shard of a thousand images (or one stuck on a read) would hold a cancel for
    minutes. `tagger.request_stop` makes them end within half a second, unwritten; finished
    shards stay. Only in the main thread (where Python runs signal handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prefect_handler = signal.getsignal(signal.SIGTERM)

    def stop_shards(signum: int, frame: FrameType | None) -> None:
        tagger.request_stop()
        if callable(prefect_handler):
            prefect_handler(signum, frame)
        elif prefect_handler != signal.SIG_IGN:  # the default action: end the process
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    tagger.clear_stop()
    signal.signal(signal.SIGTERM, stop_shards)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is stop_shards and prefect_handler is not None:
            signal.signal(signal.SIGTERM, prefect_handler)


def tag_params(**values: Any) -> TagParams:
    """The flow's flat parameters as the one `TagParams` the tasks take.

    Why an `InputError`: a value the signature's types accept can still break a rule of the
    model (a batch size of 0, both operating points); the run then fails at once, naming the
    field, and the CLI exits 2 as for any unusable input.
    """
    try:
        return TagParams.model_validate(values)
    except ValidationError as e:
        raise InputError(f"bad tag-images parameters:\n{e}") from None


@flow(name="tag-images", flow_run_name=_tag_run_name, log_prints=True)
def tag_images(
    source: str,
    out: str | None = None,
    dataset_name: str | None = None,
    model: str | None = None,
    batch_size: int = 64,
    shard_size: int = 1000,
    precision: Literal["auto", "fp32", "bf16", "int8"] = "auto",
    max_concurrency: int = 1,
    shard_timeout_s: float = 3600,
    shard_retry_delays_s: Sequence[float] = (5.0, 30.0, 120.0),
    dask_address: str | None = None,
    dask_local_workers: int | None = None,
    home: str | None = None,
    retry_errors: bool = False,
    single_writer: bool = False,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    decode_workers: int | None = None,
    max_pixels: int | None = 89_478_485,
    max_bytes: int | None = 100 * 2**20,
    min_precision: float | None = None,
    thresholds_file: str | None = None,
) -> dict[str, Any]:
    """Tag every image under `source` exactly once per model version.

    Flat parameters, one per `TagParams` field with its name and default (a unit test holds
    them equal), so `prefect deployment run tag-images/... --param source=s3://...`, the UI's
    form and a trigger's templates (`model: "{{ event.payload.version }}"`) each set one
    field. Python callers with a `TagParams` call `tag_images(**params.model_dump())`.
    """
    _quiet_worker_thread_timeout_warning()
    route_library_logs()
    params = tag_params(
        source=source,
        out=out,
        dataset_name=dataset_name,
        model=model,
        batch_size=batch_size,
        shard_size=shard_size,
        precision=precision,
        max_concurrency=max_concurrency,
        shard_timeout_s=shard_timeout_s,
        shard_retry_delays_s=list(shard_retry_delays_s),
        dask_address=dask_address,
        dask_local_workers=dask_local_workers,
        home=home,
        retry_errors=retry_errors,
        single_writer=single_writer,
        device=device,
        decode_workers=decode_workers,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        min_precision=min_precision,
        thresholds_file=thresholds_file,
    ).with_home_resolved()
    version = resolve_model(params)
    dataset = params.dataset_name or tagging.default_dataset_name(params.source)
    add_run_tags(f"model:{version}", f"dataset:{dataset}")
    run_id = tagging.new_run_id()
    if params.on_dask:
        runner = dask_runner_for(params)
        summary = tag_shards.with_options(task_runner=runner)(params, version, run_id)
    else:
        with _shards_stop_on_sigterm():
            summary = _tag_all(params, version, run_id, max_in_flight=params.max_concurrency)
    return {
        "run_id": summary["run_id"],
        "model_version": summary["model_version"],
        "tagged": summary["tagged"],
        "failed": summary["failed"],
        "skipped": summary["skipped"],
        "images_per_s": summary["images_per_s"],
        "output": summary["output_uri"],
        "manifest": summary["manifest_uri"],
        "drift_flagged": summary["drift"]["flagged"],
        "scorers": summary.get("scorers", []),
    }


def tag_images_with(params: TagParams, **options: Any) -> Any:
    """`tag_images` on a `TagParams`, its fields as the flow's flat parameters.

    For callers that hold the validated model (the CLI's `_run_flow(command, flow, params)`);
    `options` are the flow call's own (`return_state=True`).
    """
    return tag_images(**params.model_dump(), **options)
