"""The tag flow: resolve the model, plan shards, tag them in parallel, write the manifest.

Why a subflow only for Dask: the task runner is chosen from the run's parameters, and a
flow's runner is fixed when it starts, so a Dask fan-out runs in a `tag-shards` subflow on a
DaskTaskRunner. On one machine the shards run in `tag-images` itself, on its thread pool,
`max_concurrency` at a time: a subflow costs a flow-run creation that Prefect's SQLite
server answered with a 503 (and a 2 s client retry) in 9 of 12 measured runs.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from multitag import tagging
from multitag.config import TagParams
from tasks.tagging import plan_tagging, resolve_model, tag_shard, write_manifest


def dask_runner_for(params: TagParams) -> Any:
    """The Dask runner `params` asks for: a scheduler's address, or a local cluster.

    Without Dask the shards run on `tag-images`' own thread pool (see `_tag_all`).
    """
    from prefect_dask import DaskTaskRunner

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
    from prefect.runtime import flow_run

    params = flow_run.parameters.get("params") or {}
    source = params.get("source", "") if isinstance(params, dict) else params.source
    name = params.get("dataset_name") if isinstance(params, dict) else params.dataset_name
    return f"tag-{name or tagging.default_dataset_name(source)}"


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
    progress = create_progress_artifact(
        progress=0.0, key="tagging-progress", description=f"shards of run {run_id}"
    )
    t0 = time.perf_counter()
    todo = iter(plan.shards)
    limit = max_in_flight or max(len(plan.shards), 1)
    pending: set[Any] = set()
    results: list[tagging.ShardResult] = []
    error: str | None = None
    done_images, total = 0, max(plan.n_pending, 1)
    while True:
        while len(pending) < limit and (spec := next(todo, None)) is not None:
            pending.add(tag_shard.submit(spec, params, run_id))
        if not pending:
            break
        fut = next(as_completed(pending))
        pending.discard(fut)
        try:
            res = fut.result()
        except Exception as e:  # recorded in the manifest, re-raised after it is written
            error = error or f"{type(e).__name__}: {e}"
            continue
        results.append(res)
        done_images += res.n_images
        pct = 100.0 * done_images / total
        update_progress_artifact(artifact_id=progress, progress=pct)
        _print_progress(done_images, plan.n_pending, time.perf_counter() - t0)
    summary = write_manifest(plan, results, time.perf_counter() - t0, error)
    if error:
        raise RuntimeError(
            f"{error} (finished shards are kept; rerun to tag the rest; "
            f"manifest {summary['manifest_uri']})"
        )
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


@flow(name="tag-images", flow_run_name=_tag_run_name, log_prints=True)
def tag_images(params: TagParams) -> dict[str, Any]:
    """Tag every image under params.source exactly once per model version."""
    params = params.with_home_resolved()
    version = resolve_model(params)
    run_id = tagging.new_run_id()
    if params.on_dask:
        runner = dask_runner_for(params)
        summary = tag_shards.with_options(task_runner=runner)(params, version, run_id)
    else:
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
