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

Modules (each one job; this package re-exports their public names)::

    output.py   the Parquet schema, rows to tables, shard file names, validation,
                current rows (reading the output back)
    claims.py   the claim log: epochs created exclusively, retries claimed again
    probe.py    refusing a store that ignores exclusive create; single-writer mode
    plan.py     RunPlan, plan_run, the model version, output URIs, run ids, the prefetch
    shards.py   ShardSpec, ShardResult, tag_shard (own-write recognition included)
    drift.py    label rates against training prevalence, the drift rule
    summary.py  TagSummary, summarize_run, write_manifest
    headstart.py  tagging the first shard's images while Prefect's server boots

Imports point down: plan -> claims, shards, probe -> output; summary -> plan, shards, drift.
pyarrow is imported inside the functions that use it: ~0.35 s of one core that `multitag tag`
would otherwise spend before its model prefetch, which imports this package.

Listing and reading images live in `multitag.inference.sources`; the model side in
`multitag.inference` (the input spec in `spec`, the `Tagger` in `tagger`, `load_tagger` and
`tagger_for` in `loading`, the scorers and the fast path's selection beside them).
"""

from multitag.inference.faults import TaggingError
from multitag.inference.loading import tagger_for
from multitag.inference.sources import (
    SkippedFiles,
    SourceListing,
    default_dataset_name,
    list_images,
    list_source,
)
from multitag.inference.spec import ModelBaseline
from multitag.inference.tagger import Tagger, TagRow
from multitag.tagging import headstart
from multitag.tagging.claims import PLAN_FORMAT, PLAN_FORMAT_RETRIES, PLANS_DIR, Claim
from multitag.tagging.drift import NONE_LABEL, DriftReport, DriftRule, LabelRate, compute_drift
from multitag.tagging.output import (
    CONTRACT_VERSION,
    current_rows,
    read_current,
    rows_to_table,
    tags_schema,
    validate_tags_table,
)
from multitag.tagging.plan import (
    MANIFESTS_DIR,
    RunPlan,
    first_shard_uris,
    new_run_id,
    output_uris,
    plan_run,
    prefetch_tagger,
    read_baseline,
    resolve_model_version,
)
from multitag.tagging.probe import ConditionalWritesIgnoredError, require_exclusive_create
from multitag.tagging.shards import ShardResult, ShardSpec, tag_shard
from multitag.tagging.summary import TagSummary, manifest_uri, summarize_run, write_manifest

__all__ = [
    "CONTRACT_VERSION",
    "MANIFESTS_DIR",
    "NONE_LABEL",
    "PLANS_DIR",
    "PLAN_FORMAT",
    "PLAN_FORMAT_RETRIES",
    "Claim",
    "ConditionalWritesIgnoredError",
    "DriftReport",
    "DriftRule",
    "LabelRate",
    "ModelBaseline",
    "RunPlan",
    "ShardResult",
    "ShardSpec",
    "SkippedFiles",
    "SourceListing",
    "TagRow",
    "TagSummary",
    "Tagger",
    "TaggingError",
    "compute_drift",
    "current_rows",
    "default_dataset_name",
    "first_shard_uris",
    "headstart",
    "list_images",
    "list_source",
    "manifest_uri",
    "new_run_id",
    "output_uris",
    "plan_run",
    "prefetch_tagger",
    "read_baseline",
    "read_current",
    "require_exclusive_create",
    "resolve_model_version",
    "rows_to_table",
    "summarize_run",
    "tag_shard",
    "tagger_for",
    "tags_schema",
    "validate_tags_table",
    "write_manifest",
]
