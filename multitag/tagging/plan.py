"""A run's plan: which model, where the output goes, and which shards this run will tag.

`plan_run` lists the source, claims the images no epoch of the claim log holds yet (as the
next epoch, `multitag.tagging.claims`), and returns this run's new shards followed by the
unfinished shards of earlier (killed or concurrent) runs, as small `ShardSpec` references.
`prefetch_tagger` and `first_shard_uris` let `multitag tag` load its model and tag its first
images while Prefect's server boots.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from multitag import registry
from multitag.config import TagParams, get_settings
from multitag.inference.faults import TaggingError
from multitag.inference.loading import operating_point_for, tagger_for
from multitag.inference.sources import (
    SkippedFiles,
    SourceListing,
    default_dataset_name,
    list_source,
)
from multitag.inference.spec import ModelBaseline
from multitag.storage import is_local, join, read_json, remove_stale_temp_files
from multitag.tagging import headstart
from multitag.tagging.claims import (
    PLANS_DIR,
    ClaimLog,
    claim_epoch,
    no_retries,
    retry_candidates,
)
from multitag.tagging.output import part_name
from multitag.tagging.probe import check_output_store
from multitag.tagging.shards import ShardSpec

if TYPE_CHECKING:
    import pyarrow as pa

MANIFESTS_DIR = "_manifests"


@dataclass(frozen=True)
class RunPlan:
    """What a run will do; `shards` are its own new shards, then others' unfinished ones."""

    run_id: str
    source: str
    dataset: str
    dataset_uri: str
    partition_uri: str
    model_version: str
    shard_size: int
    shards: tuple[ShardSpec, ...]
    n_listed: int
    n_skipped: int  # listed images already in finished shards
    n_new: int  # images this run claimed
    n_resumed: int  # images of unfinished shards claimed by earlier runs
    epoch: int | None  # the epoch this run created, if it claimed anything
    baseline: ModelBaseline
    started_at: str
    plan_s: float
    params: dict[str, Any] = field(default_factory=dict)
    n_retried: int = 0  # images whose latest row was an error, claimed again (retry_errors)
    not_images: SkippedFiles = field(default_factory=SkippedFiles)  # by extension, not listed
    bad_names: SkippedFiles = field(default_factory=SkippedFiles)  # not UTF-8, not listed
    operating_point: dict[str, Any] = field(default_factory=dict)  # thresholds applied, why

    @property
    def n_pending(self) -> int:
        return sum(len(s.uris) for s in self.shards)


def resolve_model_version(params: TagParams) -> str:
    """The version to tag with: `params.model` (VERSION, NAME or NAME@VERSION, see
    `registry.resolve_model_ref`), else the champion when exactly one model name has one.

    A champion's pointer is checked against its version's SHA256SUMS here, since the version
    is then loaded by its id.
    """
    return registry.resolve_model_ref(params.home, params.model)


def prefetch_tagger(params: TagParams, *, head_start: bool = False) -> str | None:
    """Load the tagger a run of `params` will use into this process's cache (`tagger_for`).

    Why: the CLI calls it while Prefect's temporary server boots on the other core, so
    hashing the model's files, importing onnxruntime and building the session overlap a wait
    instead of delaying the first shard. Returns the version loaded, or None when loading
    failed: the run then repeats the same calls inside its tasks, where a failure is reported
    with the task's state and message (so nothing is cached and nothing is hidden).

    `head_start`: also start tagging, in a background thread, the images of a local source
    that the run's first shard will hold (`multitag.tagging.headstart`; its rows are written by that
    shard). Not for s3:// sources: their listing can be long, and the plan lists them anyway.
    """
    try:
        version = resolve_model_version(params)
        tagger = tagger_for(params, version)
    except Exception as exc:  # the flow makes the same calls and reports this failure
        logging.getLogger(__name__).debug("tagger prefetch failed (%s); the run retries it", exc)
        return None
    if head_start and is_local(params.source):
        headstart.start(tagger, functools.partial(first_shard_uris, params, version))
    return version


def first_shard_uris(params: TagParams, model_version: str) -> list[str]:
    """The images `plan_run` would put in this run's first shard, found without claiming.

    (The plan claims first: between this read and the plan another run may claim some of
    them; their rows are then never written, see `multitag.tagging.headstart`.)
    """
    _, partition, plans = output_uris(params, model_version)
    _, _, new, _ = _unclaimed(params.source, plans, partition)
    return [str(u) for u in new.slice(0, params.shard_size).to_pylist()]


def _unclaimed(
    source: str, plans: str, partition: str
) -> tuple[pa.Array, ClaimLog, pa.Array, SourceListing]:
    """The sorted listing of `source`, the claim log, the listed images no epoch holds, and
    the listing itself (it counts the files it left out)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    listed = list_source(source)
    listing = pa.array(listed.uris, type=pa.string())
    log = ClaimLog.read(plans, partition)
    new = listing.filter(pc.invert(pc.is_in(listing, value_set=log.claimed_uris())))
    return listing, log, new, listed


def read_baseline(home: str | None, version: str) -> ModelBaseline:
    """Training label prevalence recorded with a registered model (metrics.json)."""
    vdir = registry.version_uri(home, version)
    inference = read_json(join(vdir, registry.INFERENCE_FILE))
    metrics = read_json(join(vdir, registry.METRICS_FILE))
    return ModelBaseline.from_metrics(inference.get("vocab", []), metrics)


def output_uris(params: TagParams, model_version: str) -> tuple[str, str, str]:
    """(dataset uri, partition uri, claim-log uri) for these params and model version."""
    dataset = params.dataset_name or default_dataset_name(params.source)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", dataset):
        raise TaggingError(f"dataset_name {dataset!r} must be letters, digits, '.', '_', '-'")
    out = params.out or get_settings(params.home).tags
    dataset_uri = join(out, dataset)
    partition = join(dataset_uri, f"model={model_version}")
    return dataset_uri, partition, join(dataset_uri, PLANS_DIR, f"model={model_version}")


def new_run_id() -> str:
    """`20261128T123456.789Z-3fa9c2`: sorts by start time; the suffix keeps parallel runs apart."""
    now = datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def plan_run(
    params: TagParams,
    *,
    model_version: str | None = None,
    baseline: ModelBaseline | None = None,
    run_id: str | None = None,
) -> RunPlan:
    """List the source, claim the images no finished or planned shard holds, and shard them.

    Returns this run's new shards plus unfinished shards of earlier (killed or concurrent)
    runs, as references. See `multitag.tagging` for why this is exactly-once.
    """
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    run_id = run_id or new_run_id()
    version = model_version or resolve_model_version(params)
    baseline = baseline or read_baseline(params.home, version)
    point = operating_point_for(params, version)  # a bad --thresholds fails before claiming
    dataset_uri, partition, plans = output_uris(params, version)
    check_output_store(params)
    for folder in (partition, plans, join(dataset_uri, MANIFESTS_DIR)):
        remove_stale_temp_files(folder)

    import pyarrow as pa
    import pyarrow.compute as pc

    listing, log, new, listed = _unclaimed(params.source, plans, partition)
    finished = pc.is_in(listing, value_set=log.finished_uris())
    retry = retry_candidates(log, partition, listing) if params.retry_errors else no_retries()
    epoch, own = claim_epoch(plans, log, new, retry, params, run_id)
    own_ids = {c.shard_id for c in own}
    earlier = [c for c in log.unfinished() if c.shard_id not in own_ids]
    own += [c for c in earlier if log.planned_by(c.shard_id) == run_id]  # a retried plan's
    own_ids = {c.shard_id for c in own}
    orphans = sorted((c for c in earlier if c.shard_id not in own_ids), reverse=True)
    shards = tuple(
        ShardSpec(
            c.shard_id,
            join(partition, part_name(c.shard_id)),
            tuple(c.uris),
            version,
            run_id if c.shard_id in own_ids else log.planned_by(c.shard_id),
            tuple(c.attempts) if any(a != 1 for a in c.attempts) else (),
        )
        for c in [*own, *orphans]
    )
    n_retried = sum(a > 1 for c in own for a in c.attempts)
    pending = pa.array([u for c in [*own, *orphans] for u in c.uris], pa.string())
    n_skipped = int(pc.sum(pc.and_(finished, pc.invert(pc.is_in(listing, pending)))).as_py() or 0)
    return RunPlan(
        run_id=run_id,
        source=params.source,
        dataset=posixpath.basename(dataset_uri),
        dataset_uri=dataset_uri,
        partition_uri=partition,
        model_version=version,
        shard_size=params.shard_size,
        shards=shards,
        n_listed=len(listing),
        n_skipped=n_skipped,
        n_new=sum(len(c.uris) for c in own) - n_retried,
        n_resumed=sum(len(c.uris) for c in orphans),
        epoch=epoch,
        baseline=baseline,
        started_at=started.isoformat(),
        plan_s=round(time.perf_counter() - t0, 3),
        params=params.model_dump(mode="json"),
        n_retried=n_retried,
        not_images=listed.not_images,
        bad_names=listed.bad_names,
        operating_point=point,
    )
