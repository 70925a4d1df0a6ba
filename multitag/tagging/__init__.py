"""Bulk tagging: list images, score them in batches, write Parquet shards exactly once.

The tag flow (`flows/tag.py`, the one runner: CLI, deployments and tests) calls, in order::

    plan = plan_run(params)                          # list source, claim new images, shard
    tagger = tagger_for(params, plan.model_version)  # once per process; cached
    results = [tag_shard(spec, tagger) for spec in plan.shards]   # one task per shard
    summary = summarize_run(plan, results)
    write_manifest(summary)

(`multitag tag` may have tagged its first shard's images already, while Prefect's server
booted: `tag_shard` takes those rows from `multitag.tagging.headstart` and writes them with the
rest.)

Layout under `out/<dataset>/` (out defaults to MULTITAG_HOME/tags)::

    model=<version>/part-<epoch>-<index>.parquet   the tags (data_contracts/tags_output.yaml)
    _plans/model=<version>/epoch-<epoch>.arrow     the claim log: which images each shard holds
    _manifests/<run-id>.json                       one per run: counts, shards, timings, drift
    (and `<out>/_probe/`, briefly: the conditional-write probe's object, deleted at once)

Exactly once, and why it holds
------------------------------
Every image is claimed by exactly one shard through an append-only claim log. A run lists
the source, reads every epoch file of the log and claims the images no epoch holds yet by
creating the next epoch file with an exclusive create (local: link(2), which fails if the
name exists; S3: PutObject with `If-None-Match: *`). The epoch number is the linearisation
point: if two runs race for epoch N, one create fails; the loser reads the winner's epoch,
drops those images from its own claim and tries epoch N+1. So no two epochs ever claim the
same (image, attempt), whatever each run listed (a bucket growing between two starts
included). Before its first claim a run probes the output store once (per root and
process): a store that lets a second exclusive create overwrite is refused
(`ConditionalWritesIgnoredError`) unless `single_writer` says only one run writes there.

A shard's Parquet file is also created exclusively and written whole (local: temp file,
fsync, link; S3: one PUT), so it exists completely or not at all. A shard that is claimed
but has no Parquet file (its run was killed, or is still running) is tagged by any later
run; if two runs tag it at once, the second create fails and its rows are dropped. Hence,
for one (dataset, model version) partition:

- an (image, attempt) appears in at most one Parquet file, under any interleaving of runs
  and kills;
- after a run completes without an exception, every image it listed has exactly one
  current row (its highest attempt; `current_rows`, `read_current`);
- a rerun tags only images with no finished shard, and reports the others as skipped.

Every write recognises its own earlier success: a retried task whose create landed but
whose answer was lost (the client's own retry then gets 412 / FileExistsError, or the task
retry finds the file) reads the file's run id (Parquet footer, epoch metadata, manifest)
and counts it as written, never as a lost race. S3's 409 ConditionalRequestConflict (two
conditional writes overlapped) is retried with backoff in `storage.write_bytes_atomic`.

Rows of images that fail to read or decode are written as error rows (facts about the
image); a run with `retry_errors` claims again, in a new epoch, the listed images whose
latest row is an error and whose every claim is finished, with `attempt` = previous + 1;
the new row supersedes the old (kept as history). Two retry runs cannot both retry an
image: the claim is an epoch like any other, and the loser drops what the winner claimed.
Read errors that may be transient (network, throttling) raise instead, so the shard fails
and is retried by the flow (or the next run).

Concurrent runs waste no correctness but may duplicate work on unfinished shards; runs
take their own shards first in order and others' unfinished shards in reverse order, so
two runs started together meet in the middle.

Listing and reading images live in `multitag.inference.sources`; the model side (input spec,
scorers, `Tagger`, `load_tagger`, the fast path's wiring) in `multitag.inference.tagger`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import logging
import posixpath
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from multitag.config import TagParams, get_settings
from multitag.inference.sources import (
    SkippedFiles,
    SourceListing,
    TaggingError,
    default_dataset_name,
    list_images,  # noqa: F401  (re-exported: callers list sources through this module)
    list_source,
)
from multitag.inference.tagger import ModelBaseline, Tagger, TagRow, tagger_for
from multitag.storage import (
    PROBE_DIR,
    exists,
    fs_and_path,
    honours_exclusive_create,
    is_local,
    join,
    read_bytes,
    read_json,
    remove_stale_temp_files,
    store_description,
    write_bytes_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:
    import pyarrow as pa


CONTRACT_VERSION = "1.1.0"  # data_contracts/tags_output.yaml
PLAN_FORMAT = "multitag-plan/1"
PLAN_FORMAT_RETRIES = "multitag-plan/2"  # an epoch with retries: `attempt` > 1 in some rows
PLANS_DIR = "_plans"
MANIFESTS_DIR = "_manifests"
NONE_LABEL = "(none)"  # the "no label above threshold" row in rate tables
_EPOCH_RE = re.compile(r"^epoch-(\d{6,})\.arrow$")
_PART_RE = re.compile(r"^part-(\d{6,}-\d{6,})\.parquet$")
_MAX_EPOCH_TRIES = 1000


# ================================================================================ output


@functools.lru_cache(maxsize=1)
def tags_schema() -> pa.Schema:
    """The Parquet schema of data_contracts/tags_output.yaml."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("image_uri", pa.string(), nullable=False),
            pa.field("labels", pa.list_(pa.string())),
            pa.field("scores", pa.map_(pa.string(), pa.float32())),
            pa.field("top_label", pa.string()),
            pa.field("top_score", pa.float32()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("model_version", pa.string(), nullable=False),
            pa.field("tagged_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("error", pa.string()),
            pa.field("attempt", pa.int32(), nullable=False),
        ],
        metadata={"multitag.contract": f"tags_output {CONTRACT_VERSION}"},
    )


def rows_to_table(
    rows: Sequence[TagRow], model_version: str, attempts: Sequence[int] = ()
) -> pa.Table:
    """Rows as an Arrow table of `tags_schema()`; `attempts` per row (empty: all first rows)."""
    import pyarrow as pa

    if attempts and len(attempts) != len(rows):
        raise ValueError(f"{len(attempts)} attempts for {len(rows)} rows")
    schema = tags_schema()
    columns = {
        "image_uri": [r.image_uri for r in rows],
        "labels": [r.labels for r in rows],
        "scores": [list(r.scores.items()) if r.scores is not None else None for r in rows],
        "top_label": [r.top_label for r in rows],
        "top_score": [r.top_score for r in rows],
        "width": [r.width for r in rows],
        "height": [r.height for r in rows],
        "model_version": [model_version] * len(rows),
        "tagged_at": [r.tagged_at for r in rows],
        "error": [r.error for r in rows],
        "attempt": list(attempts) if attempts else [1] * len(rows),
    }
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _parquet_bytes(table: pa.Table, metadata: Mapping[str, str]) -> bytes:
    import pyarrow.parquet as pq

    meta = {
        **(table.schema.metadata or {}),
        **{k.encode(): v.encode() for k, v in metadata.items()},
    }
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
    return buf.getvalue()


def validate_tags_table(table: pa.Table, *, model_version: str | None = None) -> list[str]:
    """Violations of data_contracts/tags_output.yaml's quality rules ("rule: what, where").

    Checks a whole partition read back (e.g. `pyarrow.dataset.dataset(partition)`); an empty
    list means the output honours the contract. Reports at most a few rows per rule.
    """
    import pyarrow.compute as pc

    problems: list[str] = []
    table = _with_attempt(table)
    keys = table.group_by(["image_uri", "attempt"]).aggregate([("image_uri", "count")])
    dup = keys.filter(pc.greater(keys.column("image_uri_count"), 1))
    if dup.num_rows:
        pairs = zip(*(dup.column(c).to_pylist()[:5] for c in ("image_uri", "attempt")), strict=True)
        examples = list(pairs)
        problems.append(
            f"unique_image_per_model: {dup.num_rows} (image, attempt) repeated, e.g. {examples}"
        )
    problems.extend(_attempt_problems(table))
    versions = pc.unique(table.column("model_version")).to_pylist()
    if len(versions) > 1 or (model_version is not None and versions not in ([model_version], [])):
        problems.append(f"one_model_per_partition: model_version values {versions[:5]}")
    for row in _iter_rows(table):
        problems.extend(_row_problems(row))
        if len(problems) >= 50:
            problems.append("... (stopped after 50 problems)")
            break
    return problems


def _with_attempt(table: pa.Table) -> pa.Table:
    """`table` with an `attempt` column: files of contract 1.0 (before retries) have none, and
    a dataset read with `tags_schema()` gives them nulls; either way they are first rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "attempt" not in table.column_names:
        return table.append_column("attempt", pa.array([1] * table.num_rows, pa.int32()))
    i = table.column_names.index("attempt")
    filled = pc.fill_null(table.column("attempt"), 1).cast(pa.int32())
    return table.set_column(i, pa.field("attempt", pa.int32(), nullable=False), filled)


def _attempt_problems(table: pa.Table) -> list[str]:
    """attempts_supersede_errors: an image's attempts are 1..n, and every row but the latest
    is an error row (a new attempt is claimed only for an image whose latest row failed)."""
    import pyarrow.compute as pc

    if table.num_rows and pc.min(table.column("attempt")).as_py() < 1:
        return ["attempts_supersede_errors: an attempt is below 1"]
    per = table.group_by("image_uri").aggregate([("attempt", "max"), ("attempt", "count_distinct")])
    gaps = per.filter(pc.not_equal(per.column("attempt_max"), per.column("attempt_count_distinct")))
    out = []
    if gaps.num_rows:
        out.append(
            f"attempts_supersede_errors: {gaps.num_rows} image(s) with missing attempts, "
            f"e.g. {gaps.column('image_uri').to_pylist()[:5]}"
        )
    current = current_rows(table)
    if current.num_rows < table.num_rows:
        is_current = pc.is_in(_row_keys(table), value_set=_row_keys(current))
        old = table.filter(pc.invert(is_current))
        bad = old.filter(pc.is_null(old.column("error")))
        if bad.num_rows:
            out.append(
                f"attempts_supersede_errors: {bad.num_rows} superseded row(s) without an error, "
                f"e.g. {bad.column('image_uri').to_pylist()[:5]}"
            )
    return out


def _row_keys(table: pa.Table) -> pa.Array:
    """`<attempt>:<image_uri>` per row: one value to match (image, attempt) pairs with is_in."""
    import pyarrow as pa
    import pyarrow.compute as pc

    attempt = pc.cast(table.column("attempt"), pa.string())
    return pc.binary_join_element_wise(attempt, table.column("image_uri"), ":").combine_chunks()


def current_rows(table: pa.Table) -> pa.Table:
    """One row per image: the row with its highest `attempt` (a retry supersedes an error).

    The pyarrow form of the contract's "current rows" query (DuckDB: `QUALIFY row_number()
    OVER (PARTITION BY image_uri ORDER BY coalesce(attempt, 1) DESC) = 1`). Rows come back
    sorted by image_uri. Rows without an `attempt` (contract 1.0 files) are first attempts.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _with_attempt(table)
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, [("image_uri", "ascending"), ("attempt", "descending")])
    ordered = table.take(order)
    uris = ordered.column("image_uri").combine_chunks()
    changed = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1))
    return ordered.filter(pa.concat_arrays([pa.array([True]), changed]))


def read_current(partition_uri: str) -> pa.Table:
    """The current rows of a model partition (`model=<version>/`): one per image."""
    import pyarrow.dataset as pads

    fs, path = fs_and_path(partition_uri)
    fs.invalidate_cache(path)
    files = [p for p in fs.find(path) if _PART_RE.match(posixpath.basename(p))]
    if not files:
        return tags_schema().empty_table()
    dataset = pads.dataset(files, schema=tags_schema(), filesystem=fs, format="parquet")
    return current_rows(dataset.to_table())


def _iter_rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    for batch in table.to_batches(max_chunksize=10_000):
        yield from batch.to_pylist()


def _row_problems(row: Mapping[str, Any]) -> list[str]:
    uri, error = row["image_uri"], row["error"]
    result_cols = ("labels", "scores", "top_label", "top_score")
    if error is not None:
        set_cols = [c for c in result_cols if row[c] is not None]
        return [f"error_xor_result: {uri} has an error and {set_cols}"] if set_cols else []
    missing = [c for c in (*result_cols, "width", "height") if row[c] is None]
    if missing:
        return [f"error_xor_result: {uri} has no error but lacks {missing}"]
    scores = dict(row["scores"])
    out = []
    if not all(0.0 <= v <= 1.0 for v in [*scores.values(), row["top_score"]]):
        out.append(f"scores_are_probabilities: {uri} has a score outside [0, 1]")
    labels = row["labels"]
    if any(lab not in scores for lab in labels) or any(
        scores[a] < scores[b] for a, b in itertools.pairwise(labels)
    ):
        out.append(f"labels_above_threshold_by_score: {uri} labels {labels} vs scores {scores}")
    if row["top_label"] not in scores or row["top_score"] != max(scores.values()):
        out.append(f"top_is_max: {uri} top {row['top_label']}={row['top_score']} vs {scores}")
    return out


# ================================================================================ plan


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: small (a list of URIs), picklable, enough to tag and write it."""

    shard_id: str
    part_uri: str
    uris: tuple[str, ...]
    model_version: str
    planned_by: str  # run id that claimed these images
    attempts: tuple[int, ...] = ()  # per uri, when some are retries (--retry-errors); () = all 1


class ConditionalWritesIgnoredError(TaggingError):
    """The output store overwrote an object created with `If-None-Match: *`.

    Exactly once rests on exclusive create; on such a store two runs could both claim an
    epoch or write a shard. Refused unless `TagParams.single_writer` says only one run writes.
    """


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

    @property
    def n_pending(self) -> int:
        return sum(len(s.uris) for s in self.shards)


def resolve_model_version(params: TagParams) -> str:
    """The version to tag with: params.model_version, else the registry champion."""
    from multitag import registry

    if params.model_version:
        uri = join(registry.version_uri(params.home, params.model_version), registry.SUMS_FILE)
        if not exists(uri):
            raise registry.VersionNotFoundError(
                f"model version {params.model_version} is not a complete version under "
                f"{registry.models_uri(params.home)} (`multitag models list` shows them)"
            )
        return params.model_version
    champion = registry.get_champion(params.home)
    if champion is None:
        raise registry.NoChampionError(
            f"no champion model under {registry.models_uri(params.home)}: pass --model VERSION "
            "or run `multitag retrain` first"
        )
    # The version is then loaded by id: check the pointer's model sha256 against it here.
    registry.check_champion_pointer(params.home, champion)
    return str(champion["version"])


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
        from multitag.tagging import headstart

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
) -> tuple[pa.Array, _ClaimLog, pa.Array, SourceListing]:
    """The sorted listing of `source`, the claim log, the listed images no epoch holds, and
    the listing itself (it counts the files it left out)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    listed = list_source(source)
    listing = pa.array(listed.uris, type=pa.string())
    log = _ClaimLog.read(plans, partition)
    new = listing.filter(pc.invert(pc.is_in(listing, value_set=log.claimed_uris())))
    return listing, log, new, listed


def read_baseline(home: str | None, version: str) -> ModelBaseline:
    """Training label prevalence recorded with a registered model (metrics.json)."""
    from multitag import registry

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
    runs, as references. See the module docstring for why this is exactly-once.
    """
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    run_id = run_id or new_run_id()
    version = model_version or resolve_model_version(params)
    baseline = baseline or read_baseline(params.home, version)
    dataset_uri, partition, plans = output_uris(params, version)
    if not params.single_writer:
        require_exclusive_create(params.out or get_settings(params.home).tags)
    for folder in (partition, plans, join(dataset_uri, MANIFESTS_DIR)):
        remove_stale_temp_files(folder)

    import pyarrow as pa
    import pyarrow.compute as pc

    listing, log, new, listed = _unclaimed(params.source, plans, partition)
    finished = pc.is_in(listing, value_set=log.finished_uris())
    retry = _retry_candidates(log, partition, listing) if params.retry_errors else _no_retries()
    epoch, own = _claim(plans, log, new, retry, params, run_id)
    own_ids = {c.shard_id for c in own}
    earlier = [c for c in log.unfinished() if c.shard_id not in own_ids]
    own += [c for c in earlier if log.planned_by(c.shard_id) == run_id]  # a retried plan's
    own_ids = {c.shard_id for c in own}
    orphans = sorted((c for c in earlier if c.shard_id not in own_ids), reverse=True)
    shards = tuple(
        ShardSpec(
            c.shard_id,
            join(partition, f"part-{c.shard_id}.parquet"),
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
    )


def require_exclusive_create(out_root: str) -> None:
    """Refuse an output store that overwrites on `If-None-Match: *` (probed once per root)."""
    if honours_exclusive_create(out_root):
        return
    raise ConditionalWritesIgnoredError(
        f"the output store {store_description(out_root)} does not honour exclusive create: "
        f"a probe object under {join(out_root, PROBE_DIR)} was created twice (the second "
        "PUT with `If-None-Match: *` overwrote it instead of failing), so two runs could "
        "claim or write the same images. Use a store that honours `If-None-Match: *` (AWS "
        "S3, MinIO, ...), or, if only one run at a time will ever write this output, pass "
        "--single-writer (TagParams.single_writer=True)."
    )


class Claim(NamedTuple):
    """One shard of a claim epoch: its id, its images and each image's attempt number."""

    shard_id: str
    uris: list[str]
    attempts: list[int]


def _no_retries() -> pa.Table:
    import pyarrow as pa

    return pa.table({"image_uri": pa.array([], pa.string()), "attempt": pa.array([], pa.int32())})


def _retry_candidates(log: _ClaimLog, partition: str, listing: pa.Array) -> pa.Table:
    """(image_uri, next attempt) of listed images whose latest row is an error, to claim again.

    Only images whose every claim is finished: an image in an unfinished shard (a retry in
    progress, or killed) is tagged by resuming that shard, never claimed twice. The rows are
    read from the finished shards the log saw, so the "latest" row is the latest one there.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    if not log.finished:
        return _no_retries()
    fs, _ = fs_and_path(partition)
    files = [fs_and_path(join(partition, f"part-{sid}.parquet"))[1] for sid in sorted(log.finished)]
    schema = pa.schema([tags_schema().field(n) for n in ("image_uri", "error", "attempt")])
    rows = pads.dataset(files, schema=schema, filesystem=fs, format="parquet").to_table()
    latest = current_rows(rows)
    failed = latest.filter(pc.is_valid(latest.column("error")))
    in_progress = pa.array([u for c in log.unfinished() for u in c.uris], pa.string())
    keep = pc.and_(
        pc.is_in(failed.column("image_uri"), value_set=listing),  # gone from the source: no
        pc.invert(pc.is_in(failed.column("image_uri"), value_set=in_progress)),
    )
    failed = failed.filter(keep)
    next_attempt = pc.add(failed.column("attempt"), 1).cast(pa.int32())
    return pa.table({"image_uri": failed.column("image_uri"), "attempt": next_attempt})


def _claim(
    plans: str, log: _ClaimLog, new: pa.Array, retry: pa.Table, params: TagParams, run_id: str
) -> tuple[int | None, list[Claim]]:
    """Claim `new` (first attempts) and `retry` as the next epoch; on a lost race, drop what
    the winner claimed and try the epoch after.

    Returns (the epoch created or None when nothing was left to claim, its shards). A retry
    is dropped when the winner's epoch holds that image: two runs never retry it both.
    """
    import pyarrow.compute as pc

    for _ in range(_MAX_EPOCH_TRIES):
        if len(new) == 0 and retry.num_rows == 0:
            return None, []
        candidate = log.next_epoch()
        try:
            claims = _write_epoch(plans, candidate, new, retry, params, run_id)
            return candidate, claims
        except FileExistsError:
            log.absorb(plans, candidate)  # a concurrent run won this epoch: take its claims out
            new = new.filter(pc.invert(pc.is_in(new, value_set=log.claimed_uris())))
            won = log.epochs[candidate].column("image_uri")
            retry = retry.filter(pc.invert(pc.is_in(retry.column("image_uri"), value_set=won)))
    raise TaggingError(f"could not claim an epoch in {plans} after {_MAX_EPOCH_TRIES} tries")


def _shard_id(epoch: int, index: int) -> str:
    return f"{epoch:06d}-{index:06d}"


def _epoch_uri(plans: str, epoch: int) -> str:
    return join(plans, f"epoch-{epoch:06d}.arrow")


def _epoch_table(
    epoch: int, new: pa.Array, retry: pa.Table, params: TagParams, run_id: str
) -> pa.Table:
    """The claim file's rows (shard, image_uri, attempt), sorted by image_uri."""
    import pyarrow as pa
    import pyarrow.compute as pc

    uris = pa.concat_arrays([new, retry.column("image_uri").combine_chunks()])
    attempts = pa.concat_arrays(
        [pa.array(np.ones(len(new), np.int32)), retry.column("attempt").combine_chunks()]
    )
    order = pc.sort_indices(uris)
    n = len(uris)
    index = pa.array(np.arange(n, dtype=np.int64) // params.shard_size, type=pa.int32())
    meta = {
        # Epochs with retries use format 2, which code from before retries refuses to read
        # (it would write the retried images' rows again as first attempts).
        "format": PLAN_FORMAT_RETRIES if retry.num_rows else PLAN_FORMAT,
        "run_id": run_id,
        "epoch": str(epoch),
        "source": params.source,
        "shard_size": str(params.shard_size),
        "created_at": datetime.now(UTC).isoformat(),
    }
    table = pa.table(
        {"shard": index, "image_uri": uris.take(order), "attempt": attempts.take(order)}
    )
    return table.replace_schema_metadata(meta)


def _write_epoch(
    plans: str, epoch: int, new: pa.Array, retry: pa.Table, params: TagParams, run_id: str
) -> list[Claim]:
    """Claim `new` and `retry` as epoch `epoch` (exclusive create); returns its shards.

    FileExistsError means another run won the epoch, unless the file holds this run's id:
    then our own create succeeded and its answer was lost (the client's retry of the PUT
    got 412), and the claims are ours.
    """
    import pyarrow as pa

    table = _epoch_table(epoch, new, retry, params, run_id)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    uri = _epoch_uri(plans, epoch)
    try:
        write_bytes_atomic(uri, sink.getvalue().to_pybytes(), exclusive=True)
    except FileExistsError:
        existing = _read_epoch(uri)
        if (existing.schema.metadata or {}).get(b"run_id") != run_id.encode():
            raise
        table = existing
    return _epoch_claims(epoch, table)


def _read_epoch(uri: str) -> pa.Table:
    import pyarrow as pa

    table = pa.ipc.open_file(pa.BufferReader(read_bytes(uri))).read_all()
    meta = table.schema.metadata or {}
    if meta.get(b"format") not in (PLAN_FORMAT.encode(), PLAN_FORMAT_RETRIES.encode()):
        raise TaggingError(f"{uri} is not a {PLAN_FORMAT} claim file")
    return table


def _epoch_claims(epoch: int, table: pa.Table, skip: Container[str] = frozenset()) -> list[Claim]:
    """The shards of one epoch's claim table not in `skip`, in shard order.

    (Claim files from before retries have no `attempt` column: all first attempts.)
    """
    shard = table.column("shard").to_numpy()
    order = np.argsort(shard, kind="stable")
    ids, starts = np.unique(shard[order], return_index=True)
    ends = [*starts[1:], len(order)]
    uris = table.column("image_uri")
    if "attempt" in table.column_names:
        attempts = table.column("attempt").to_numpy()
    else:
        attempts = np.ones(len(shard), np.int32)
    out = []
    for index, start, end in zip(ids, starts, ends, strict=True):
        rows = order[start:end]
        sid = _shard_id(epoch, int(index))
        if sid in skip:
            continue  # finished: its URIs are never turned into Python strings
        out.append(Claim(sid, uris.take(rows).to_pylist(), attempts[rows].tolist()))
    return out


class _ClaimLog:
    """Every epoch of a partition's claim log, and which of its shards are finished."""

    def __init__(self, finished: set[str]) -> None:
        self.finished = finished
        self.epochs: dict[int, pa.Table] = {}
        self.run_ids: dict[int, str] = {}

    @classmethod
    def read(cls, plans: str, partition: str) -> _ClaimLog:
        log = cls(_finished_shard_ids(partition))
        for epoch in _list_epochs(plans):
            log.absorb(plans, epoch)
        return log

    def absorb(self, plans: str, epoch: int) -> None:
        table = _read_epoch(_epoch_uri(plans, epoch))
        self.epochs[epoch] = table
        self.run_ids[epoch] = (table.schema.metadata or {}).get(b"run_id", b"?").decode()

    def next_epoch(self) -> int:
        return max(self.epochs, default=0) + 1

    def claimed_uris(self) -> pa.Array:
        """Every image any epoch claimed (an image claimed again for a retry appears twice)."""
        import pyarrow as pa

        chunks = [c for t in self.epochs.values() for c in t.column("image_uri").chunks]
        return pa.chunked_array(chunks, type=pa.string()).combine_chunks()

    def finished_uris(self) -> pa.Array:
        import pyarrow as pa
        import pyarrow.compute as pc

        done: dict[int, list[int]] = {}
        for sid in self.finished:
            epoch, index = (int(x) for x in sid.split("-"))
            done.setdefault(epoch, []).append(index)
        parts = []
        for epoch, table in self.epochs.items():
            value_set = pa.array(done.get(epoch, []), type=pa.int32())
            mask = pc.is_in(table.column("shard"), value_set=value_set)
            parts.extend(table.column("image_uri").filter(mask).chunks)
        return pa.chunked_array(parts, type=pa.string()).combine_chunks()

    def unfinished(self) -> list[Claim]:
        """Every claimed shard without a Parquet file, in id order."""
        return [
            c
            for epoch, table in sorted(self.epochs.items())
            for c in _epoch_claims(epoch, table, skip=self.finished)
        ]

    def planned_by(self, shard_id: str) -> str:
        return self.run_ids.get(int(shard_id.split("-")[0]), "?")


def _fresh_ls(uri: str) -> list[str]:
    """Names directly under uri, bypassing fsspec's listing cache (other runs write here)."""
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)
    try:
        return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def _list_epochs(plans: str) -> list[int]:
    return sorted(int(m.group(1)) for n in _fresh_ls(plans) if (m := _EPOCH_RE.match(n)))


def _finished_shard_ids(partition: str) -> set[str]:
    return {m.group(1) for n in _fresh_ls(partition) if (m := _PART_RE.match(n))}


def _fresh_exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)
    return fs.exists(path)


# ================================================================================ shards


@dataclass(frozen=True)
class ShardResult:
    """What happened to one shard; small, so a flow can collect thousands of them.

    status: "written" (this call wrote it, or an earlier try of this run's task did and
    its answer was lost: counted from the file), "exists" (already finished by another run,
    nothing done), "lost_race" (tagged, but another run wrote it first; rows dropped).
    """

    shard_id: str
    part_uri: str
    status: str
    n_images: int
    n_tagged: int = 0
    n_failed: int = 0
    n_none: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    scorer: str = ""  # which scorer tagged it and why (`Tagger.precision_choice`)
    n_head_start: int = 0  # of n_tagged + n_failed: tagged before the run began (headstart)
    n_retried: int = 0  # of n_images: retries of images whose latest row was an error
    n_retried_tagged: int = 0  # of n_retried: tagged this time (no error)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tag_shard(
    spec: ShardSpec,
    tagger: Tagger,
    *,
    run_id: str = "",
    on_batch: Callable[[int], None] | None = None,
) -> ShardResult:
    """Tag one shard and write its Parquet file whole, exactly once (see module docstring).

    Idempotent: a shard whose file exists is skipped without reading an image.
    """
    from multitag.tagging import headstart

    t0 = time.perf_counter()
    if tagger.model_version != spec.model_version:
        raise TaggingError(
            f"shard {spec.shard_id} belongs to model {spec.model_version} but the tagger holds "
            f"{tagger.model_version}"
        )
    ready, head_s = headstart.take(tagger, spec.uris)  # rows tagged while the server booted
    if _fresh_exists(spec.part_uri):
        own = _own_earlier_write(spec, run_id)  # a retried task whose write succeeded
        if own is None:
            return ShardResult(spec.shard_id, spec.part_uri, "exists", len(spec.uris))
        seconds = {"total_s": round(time.perf_counter() - t0, 4)}
        return _count_rows(spec, own, seconds, _scorer_of(own))
    rows: list[TagRow] = []
    prepare_s = model_s = 0.0
    todo = [u for u in spec.uris if u not in ready] if ready else spec.uris
    if ready and on_batch is not None:
        on_batch(len(ready))
    for batch in tagger.tag(todo, on_batch=on_batch):
        rows.extend(batch.rows)
        prepare_s += batch.prepare_s
        model_s += batch.model_s
    if ready:
        by_uri = {row.image_uri: row for row in rows} | ready
        rows = [by_uri[u] for u in spec.uris]
    t_write = time.perf_counter()
    written = _write_shard(spec, rows, run_id, tagger.scorer_note)
    t_end = time.perf_counter()
    seconds = {"prepare_s": prepare_s, "model_s": model_s, "write_s": t_end - t_write,
               "total_s": t_end - t0, "head_start_s": head_s}  # fmt: skip
    seconds = {k: round(v, 4) for k, v in seconds.items()}
    if written is None:
        return ShardResult(spec.shard_id, spec.part_uri, "lost_race", len(rows), seconds=seconds)
    return dataclasses.replace(
        _count_rows(spec, written, seconds, _scorer_of(written)), n_head_start=len(ready)
    )


def _write_shard(
    spec: ShardSpec, rows: Sequence[TagRow], run_id: str, scorer: str = ""
) -> pa.Table | None:
    """Exclusive create of the whole Parquet file; returns the rows the file now holds.

    None: another run wrote this shard first (our rows are dropped, "lost_race"). When the
    file exists but is this run's own earlier write (a retried task whose PUT succeeded and
    whose answer was lost, so the client's retry got 412), the file's rows are returned:
    the shard counts as written once, with what is stored, not what this attempt computed.
    """
    meta = {"multitag.shard_id": spec.shard_id, "multitag.run_id": run_id,
            "multitag.planned_by": spec.planned_by, "multitag.scorer": scorer}  # fmt: skip
    table = rows_to_table(rows, spec.model_version, spec.attempts)
    data = _parquet_bytes(table, meta)
    try:
        write_bytes_atomic(spec.part_uri, data, exclusive=True)
    except FileExistsError:
        return _own_earlier_write(spec, run_id)
    return table.replace_schema_metadata(
        {**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in meta.items()}}
    )


def _own_earlier_write(spec: ShardSpec, run_id: str) -> pa.Table | None:
    """The rows of `spec.part_uri` if this run (`run_id`) wrote that file, else None.

    Recognised by the Parquet footer's `multitag.run_id` and `multitag.shard_id`: run ids
    are unique per run, and a run tags a shard in one task at a time (Prefect retries it).
    An empty run_id (library calls without one) never matches.
    """
    import pyarrow.parquet as pq

    if not run_id:
        return None
    fs, path = fs_and_path(spec.part_uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = pf.schema_arrow.metadata or {}
        if meta.get(b"multitag.run_id") != run_id.encode():
            return None
        if meta.get(b"multitag.shard_id") != spec.shard_id.encode():
            return None
        names = [n for n in ("error", "labels", "attempt") if n in pf.schema_arrow.names]
        return pf.read(columns=names).replace_schema_metadata(meta)


def _scorer_of(table: pa.Table) -> str:
    return (table.schema.metadata or {}).get(b"multitag.scorer", b"").decode()


def _count_rows(
    spec: ShardSpec, table: pa.Table, seconds: dict[str, float], scorer: str = ""
) -> ShardResult:
    """A "written" result counted from the rows stored in the shard's file."""
    labels: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    n_none = n_failed = n_retried = n_retried_tagged = 0
    cols = ("error", "labels", "attempt")
    for r in _iter_rows(_with_attempt(table).select(cols)):
        retried = r["attempt"] > 1
        n_retried += retried
        if r["error"] is not None:
            n_failed += 1
            kinds[r["error"].split(":", 1)[0]] += 1
            continue
        n_retried_tagged += retried
        if r["labels"]:
            labels.update(r["labels"])
        else:
            n_none += 1
    return ShardResult(
        spec.shard_id,
        spec.part_uri,
        "written",
        table.num_rows,
        n_tagged=table.num_rows - n_failed,
        n_failed=n_failed,
        n_none=n_none,
        label_counts=dict(labels),
        error_kinds=dict(kinds),
        seconds=seconds,
        scorer=scorer,
        n_retried=n_retried,
        n_retried_tagged=n_retried_tagged,
    )


# ================================================================================ drift


@dataclass(frozen=True)
class DriftRule:
    """When a label's rate in a run has moved enough from training to flag it.

    Flagged when the run tagged at least `min_images` images, the rates differ by at least
    `min_abs_diff` (absolute), AND the rate of the label or of its absence changed by a
    factor of at least `min_ratio` either way. Looking at the absence too keeps the rule
    symmetric for common labels, which can never double: 2% -> 5% is not flagged (too
    small), 2% -> 30% is; 60% -> 75% is not (absence 40% -> 25%), 60% -> 90% is (absence
    40% -> 10%), 60% -> 20% is. A label never seen in training is flagged at `min_abs_diff`.
    """

    min_images: int = 100
    min_abs_diff: float = 0.10
    min_ratio: float = 2.0

    def flags(self, rate: float, train_rate: float | None, n_images: int) -> bool:
        if train_rate is None or n_images < self.min_images:
            return False
        if abs(rate - train_rate) < self.min_abs_diff:
            return False
        return self._moved(rate, train_rate) or self._moved(1.0 - rate, 1.0 - train_rate)

    def _moved(self, now: float, before: float) -> bool:
        if before <= 0:
            return now > 0
        ratio = now / before
        return ratio >= self.min_ratio or ratio <= 1.0 / self.min_ratio


@dataclass(frozen=True)
class LabelRate:
    label: str
    count: int
    rate: float | None  # share of this run's tagged (non-error) images
    train_rate: float | None
    flagged: bool


@dataclass(frozen=True)
class DriftReport:
    n_images: int
    baseline_available: bool
    note: str
    rule: dict[str, float]
    labels: list[LabelRate]
    none: LabelRate
    flagged: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_drift(
    label_counts: Mapping[str, int],
    n_none: int,
    n_images: int,
    baseline: ModelBaseline,
    rule: DriftRule | None = None,
) -> DriftReport:
    """Rates of each label and of "no label" in this run next to training prevalence."""
    rule = rule or DriftRule()
    prev = baseline.train_label_prevalence
    available = prev is not None

    def rate_of(count: int) -> float | None:
        return round(count / n_images, 6) if n_images else None

    def entry(label: str, count: int, train: float | None) -> LabelRate:
        rate = rate_of(count)
        flagged = rate is not None and rule.flags(rate, train, n_images)
        return LabelRate(label, count, rate, train, flagged)

    vocab = list(baseline.vocab) + sorted(set(label_counts) - set(baseline.vocab))
    labels = [entry(lab, int(label_counts.get(lab, 0)), (prev or {}).get(lab)) for lab in vocab]
    none = entry(NONE_LABEL, n_none, baseline.train_none_rate)
    if not available:
        note = (
            "the model's metrics.json has no train_label_prevalence: rates are shown "
            "without a training baseline and nothing is flagged"
        )
    elif n_images < rule.min_images:
        note = f"only {n_images} images tagged (< {rule.min_images}): too few to flag drift"
    else:
        note = "rates are shares of this run's tagged (non-error) images"
    flagged = [e.label for e in [*labels, none] if e.flagged]
    return DriftReport(n_images, available, note, asdict(rule), labels, none, flagged)


# ============================================================================ summary


@dataclass(frozen=True)
class TagSummary:
    """A run's outcome; `to_dict()` is the manifest."""

    run_id: str
    status: str  # "completed" or "failed"
    model_version: str
    source: str
    dataset: str
    output_uri: str
    manifest_uri: str
    listed: int
    tagged: int
    failed: int
    skipped: int
    resumed: int
    shards_written: int
    shards_skipped: int
    images_per_s: float | None
    started_at: str
    finished_at: str
    seconds: dict[str, float]
    error_kinds: dict[str, int]
    drift: DriftReport
    shards: list[ShardResult]
    params: dict[str, Any]
    error: str | None = None
    scorers: list[str] = field(default_factory=list)  # distinct `ShardResult.scorer` values
    retried: int = 0  # of tagged + failed: images whose latest row was an error, tagged again
    retried_tagged: int = 0  # of retried: tagged this time (the rest failed again)
    not_images: int = 0  # files left out of the listing for their extension (.txt, .mov)
    not_image_examples: list[str] = field(default_factory=list)  # the first few
    bad_names: int = 0  # local names that are not valid UTF-8: left out (rename to tag)
    bad_name_examples: list[str] = field(default_factory=list)  # shown with \x escapes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_text(self) -> str:
        """The few lines a person reads at the end of `multitag tag`."""
        rate = f"{self.images_per_s:.1f} images/s" if self.images_per_s else "n/a images/s"
        lines = [
            f"run {self.run_id} ({self.status}) with model {self.model_version}",
            f"listed {self.listed}: tagged {self.tagged}, failed {self.failed}, "
            f"skipped {self.skipped} (already tagged)"
            + (f", resumed {self.resumed} from earlier runs" if self.resumed else ""),
            f"{self.shards_written} shard(s) written, {rate}, "
            f"{self.seconds.get('total_s', 0.0):.1f} s",
            f"output:   {self.output_uri}",
            f"manifest: {self.manifest_uri}",
        ]
        lines += [f"scorer:   {s}" for s in self.scorers]
        if self.retried:
            lines.append(
                f"retried {self.retried} error row(s): {self.retried_tagged} now tagged, "
                f"{self.retried - self.retried_tagged} failed again"
            )
        if self.error_kinds:
            lines.append(
                "errors: " + ", ".join(f"{k} {v}" for k, v in sorted(self.error_kinds.items()))
            )
        if self.not_images:
            lines.append(f"not listed: {self.not_images} not images (by extension), e.g. "
                         f"{self.not_image_examples}")  # fmt: skip
        if self.bad_names:
            lines.append(f"not listed: {self.bad_names} names not valid UTF-8 (rename them to "
                         f"tag them), e.g. {self.bad_name_examples}")  # fmt: skip
        if self.drift.flagged:
            moved = {e.label: e for e in [*self.drift.labels, self.drift.none]}
            parts = [
                f"{lab} {moved[lab].rate:.2f} vs {moved[lab].train_rate:.2f} in training"
                for lab in self.drift.flagged
            ]
            lines.append("DRIFT: " + "; ".join(parts))
        elif self.drift.note:
            lines.append(f"drift: {self.drift.note}")
        if self.error:
            lines.append(f"ERROR: {self.error}")
        return "\n".join(lines)


def manifest_uri(plan: RunPlan) -> str:
    return join(plan.dataset_uri, MANIFESTS_DIR, f"{plan.run_id}.json")


def summarize_run(
    plan: RunPlan,
    results: Sequence[ShardResult],
    *,
    drift_rule: DriftRule | None = None,
    tag_s: float | None = None,
    error: str | None = None,
) -> TagSummary:
    """Fold shard results into the run's summary (counts, rates, drift, timings)."""
    finished = datetime.now(UTC)
    written = [r for r in results if r.status == "written"]
    others = [r for r in results if r.status != "written"]
    tagged = sum(r.n_tagged for r in written)
    failed = sum(r.n_failed for r in written)
    labels: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for r in written:
        labels.update(r.label_counts)
        kinds.update(r.error_kinds)
    n_none = sum(r.n_none for r in written)
    total_s = (finished - datetime.fromisoformat(plan.started_at)).total_seconds()
    tag_s = tag_s if tag_s is not None else max(total_s - plan.plan_s, 0.0)
    n_done = tagged + failed
    # Rows a head start tagged before the run began took time too (while the server booted).
    busy_s = tag_s + sum(r.seconds.get("head_start_s", 0.0) for r in written)
    return TagSummary(
        run_id=plan.run_id,
        status="failed" if error else "completed",
        model_version=plan.model_version,
        source=plan.source,
        dataset=plan.dataset,
        output_uri=plan.partition_uri,
        manifest_uri=manifest_uri(plan),
        listed=plan.n_listed,
        tagged=tagged,
        failed=failed,
        skipped=plan.n_skipped + sum(r.n_images for r in others),
        resumed=plan.n_resumed,
        shards_written=len(written),
        shards_skipped=len(others),
        images_per_s=round(n_done / busy_s, 2) if n_done and busy_s > 0 else None,
        started_at=plan.started_at,
        finished_at=finished.isoformat(),
        seconds={
            "plan_s": plan.plan_s,
            "tag_s": round(tag_s, 3),
            "total_s": round(total_s, 3),
            **_stage_seconds(written),
        },
        error_kinds=dict(kinds),
        drift=compute_drift(labels, n_none, tagged, plan.baseline, drift_rule),
        shards=list(results),
        params=plan.params,
        error=error,
        scorers=sorted({r.scorer for r in written if r.scorer}),
        retried=sum(r.n_retried for r in written),
        retried_tagged=sum(r.n_retried_tagged for r in written),
        not_images=plan.not_images.count,
        not_image_examples=plan.not_images.examples,
        bad_names=plan.bad_names.count,
        bad_name_examples=plan.bad_names.examples,
    )


def _stage_seconds(results: Iterable[ShardResult]) -> dict[str, float]:
    keys = ("prepare_s", "model_s", "write_s", "head_start_s")
    return {f"sum_{k}": round(sum(r.seconds.get(k, 0.0) for r in results), 3) for k in keys}


def write_manifest(summary: TagSummary) -> str:
    """Write `_manifests/<run-id>.json` (exclusive: a run id is written once); returns its URI.

    A manifest already there with this run's id is this run's own earlier write (a retried
    task whose answer was lost): success, and the stored one is kept.
    """
    try:
        write_json_atomic(summary.manifest_uri, summary.to_dict(), exclusive=True)
    except FileExistsError:
        if read_json(summary.manifest_uri).get("run_id") != summary.run_id:
            raise
    return summary.manifest_uri
